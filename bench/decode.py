"""Decode-path benchmark: which way of turning a downloaded JPEG into a 256px JPEG is fastest.

Measures, per image on ONE core, decode + resize (256, keep_ratio, INTER_AREA) + encode (JPEG q95)
for every decode path we could use, on synthetic photo-like JPEGs (shapes, gradients, noise), and
prints a table. The numbers justify the path `dataengine.io.imaging.process_image` takes.

Run: `.venv/bin/python bench/decode.py [--repeat 15] [--images 6]`
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

from dataengine.io.imaging import ImageOptions, process_image

try:
    import simplejpeg
except ImportError:  # optional: only benchmarked when installed
    simplejpeg = None

TARGET = 256
QUALITY = 95
SIZES = ((640, 480), (2048, 1536))

Path = Callable[[bytes], bytes]


def synthetic_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: gradient, filled shapes, sensor-like noise (entropy close to a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1
    )
    im = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(10, width // 3))
        y1 = y0 + int(rng.integers(10, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    arr = np.asarray(im).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _target(width: int, height: int) -> tuple[int, int]:
    scale = TARGET / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _cv2_finish(bgr: np.ndarray, width: int, height: int) -> bytes:
    resized = cv2.resize(bgr, _target(width, height), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()


def cv2_full(data: bytes) -> bytes:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return _cv2_finish(bgr, bgr.shape[1], bgr.shape[0])


def cv2_reduced(data: bytes) -> bytes:
    width, height = Image.open(io.BytesIO(data)).size  # header only
    need_w, need_h = _target(width, height)
    factor = 1
    for f in (8, 4, 2):
        if -(-width // f) >= need_w and -(-height // f) >= need_h:
            factor = f
            break
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    return _cv2_finish(bgr, width, height)


def _pil_finish(im: Image.Image, width: int, height: int) -> bytes:
    rgb = np.asarray(im.convert("RGB"))
    resized = cv2.resize(rgb, _target(width, height), interpolation=cv2.INTER_AREA)
    out = io.BytesIO()
    Image.fromarray(resized).save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def pil_full(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data))
    im.load()
    return _pil_finish(im, *im.size)


def pil_draft(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    im.draft("RGB", _target(width, height))
    im.load()
    return _pil_finish(im, width, height)


def simplejpeg_scaled(data: bytes) -> bytes:
    width, height = simplejpeg.decode_jpeg_header(data)[1::-1]
    need_w, need_h = _target(width, height)
    bgr = simplejpeg.decode_jpeg(data, "BGR", min_height=need_h, min_width=need_w)
    return _cv2_finish(bgr, width, height)


def ours(data: bytes) -> bytes:
    return process_image(data, _OPTIONS).data


_OPTIONS = ImageOptions(image_size=TARGET, resize_mode="keep_ratio", encode_quality=QUALITY)


def measure(paths: dict[str, Path], images: list[bytes], repeat: int) -> dict[str, float]:
    """Best over `repeat` rounds of the mean ms per image, per path.

    Rounds interleave the paths, so a busy neighbour or a clock change hits all of them alike;
    best-of rather than median because interference only ever adds time.
    """
    for path in paths.values():  # warm-up: lazy imports, plugin init, allocator
        for data in images:
            path(data)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeat):
        for name, path in paths.items():
            start = time.perf_counter()
            for data in images:
                path(data)
            best[name] = min(best[name], (time.perf_counter() - start) / len(images) * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--images", type=int, default=6, help="distinct images per size")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, honestly

    paths: dict[str, Path] = {
        "opencv full": cv2_full,
        "opencv IMREAD_REDUCED": cv2_reduced,
        "pillow full": pil_full,
        "pillow draft": pil_draft,
    }
    if simplejpeg is not None:
        paths["simplejpeg scaled"] = simplejpeg_scaled
    paths["process_image"] = ours

    corpora = {
        f"{w}x{h}": [synthetic_jpeg(w, h, seed) for seed in range(args.images)] for w, h in SIZES
    }
    header = f"{'path (ms/image, 1 core)':<24}" + "".join(f"{name:>12}" for name in corpora)
    print(header)
    print("-" * len(header))
    results = {size: measure(paths, imgs, args.repeat) for size, imgs in corpora.items()}
    for name in paths:
        cells = "".join(f"{results[size][name]:>12.2f}" for size in corpora)
        print(f"{name:<24}{cells}")
    sizes = ", ".join(
        f"{k}: {statistics.mean(len(d) for d in v) / 1024:.0f} KiB" for k, v in corpora.items()
    )
    print(f"\nmean input size: {sizes}; target {TARGET}px keep_ratio, JPEG q{QUALITY}")


if __name__ == "__main__":
    main()
