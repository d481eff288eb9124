"""Draw scenes to pixels and encode them as JPEG.

A flat drawing compresses to a few KB, far from what a downloader sees on the web, so a faint gradient
and a fine noise texture are added: JPEG sizes then land near real photos (tens of KB at 640 px, about
half a MB at 2048 px), which matters for download and throughput benchmarks.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageOps

from dataengine.testbed.synthweb.scenes import BACKGROUNDS, COLOURS, Scene

_NOISE_AMPLITUDE = 7  # texture noise is uniform in [-a, a] grey levels
_TILE = (149, 163)  # odd, coprime sides so the tiling repeat is not on an 8x8 JPEG block grid
_GRADIENT = 28.0  # grey levels across the image at texture=1
_COLOUR_JITTER = 10

DUP_TRANSFORMS: tuple[str, ...] = ("resize", "reencode", "crop", "flip")


def _unit_polygon(kind: str) -> list[tuple[float, float]]:
    """Vertices in an arbitrary frame; they are stretched to fill the object's box."""
    if kind == "triangle":
        return [(0.0, 1.0), (1.0, 1.0), (0.5, 0.0)]
    if kind == "diamond":
        return [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    if kind == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    if kind == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    raise ValueError(f"no polygon for shape kind {kind!r}")


def _fit(points: list[tuple[float, float]], box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, sx, sy = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [(box[0] + (x - x0) / sx * (box[2] - box[0]), box[1] + (y - y0) / sy * (box[3] - box[1])) for x, y in points]


def _background(scene: Scene, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.texture <= 0:
        return Image.new("RGB", (width, height), tuple(int(v) for v in base))
    # a linear gradient in a random direction, like uneven lighting; computed on a coarse grid and
    # upsampled, which is exact for a linear ramp and several times cheaper at 2048 px
    angle = float(rng.uniform(0, 2 * math.pi))
    gw, gh = max(2, width // 8), max(2, height // 8)
    ramp_x = np.linspace(-0.5, 0.5, gw, dtype=np.float32) * math.cos(angle)
    ramp_y = np.linspace(-0.5, 0.5, gh, dtype=np.float32) * math.sin(angle)
    ramp = ramp_y[:, None] + ramp_x[None, :]
    shade = base[None, None, :] + (scene.texture * _GRADIENT) * ramp[:, :, None]
    coarse = Image.fromarray(np.clip(shade, 0, 255).astype(np.uint8), "RGB")
    return coarse.resize((width, height), Image.Resampling.BILINEAR)


def _noise(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Fine noise from a small random tile repeated: full-size random draws would dominate render time."""
    tile = rng.integers(0, 2 * _NOISE_AMPLITUDE + 1, size=(*_TILE, 3), dtype=np.uint8)
    reps = (-(-height // _TILE[0]), -(-width // _TILE[1]), 1)
    return Image.fromarray(np.ascontiguousarray(np.tile(tile, reps)[:height, :width]), "RGB")


def render_scene(scene: Scene, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` at `width` x `height`; `rng` drives gradient, colour jitter and texture only.

    Examples:
        >>> from dataengine.testbed.synthweb.scenes import generate_scene
        >>> scene = generate_scene(np.random.default_rng(0))
        >>> render_scene(scene, 64, 48, np.random.default_rng(1)).size
        (64, 48)
    """
    img = _background(scene, width, height, rng)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        rgb = np.array(COLOURS[obj.colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(rgb, 0, 255))
        box = (obj.box[0] * width, obj.box[1] * height, obj.box[2] * width, obj.box[3] * height)
        if obj.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_fit(_unit_polygon(obj.kind), box), fill=fill)
    return ImageChops.add(img, _noise(width, height, rng), scale=1.0, offset=-_NOISE_AMPLITUDE)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG bytes at `quality`, baseline, 4:2:0: what most web images are."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decoded RGB pixels of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def transform_image(
    img: Image.Image,
    transform: str,
    *,
    size: tuple[int, int] | None = None,
    crop: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """Apply a near-duplicate transform; "reencode" leaves pixels alone (the caller lowers quality).

    Args:
        img: the source image.
        transform: one of `DUP_TRANSFORMS`.
        size: target (width, height) for "resize".
        crop: pixel box (left, top, right, bottom) for "crop".
    """
    if transform == "resize":
        if size is None:
            raise ValueError("resize needs size")
        return img.resize(size, Image.Resampling.BILINEAR)
    if transform == "crop":
        if crop is None:
            raise ValueError("crop needs a crop box")
        return img.crop(crop)
    if transform == "flip":
        return ImageOps.mirror(img)
    if transform == "reencode":
        return img
    raise ValueError(f"unknown near-duplicate transform {transform!r}; expected one of {DUP_TRANSFORMS}")
