"""Scale benchmark (b): download -> dedup (pHash, a barrier) -> caption rules over distinct JPEGs.

N distinct 320x240 JPEGs (smooth random scenes, 1% planted near-copies: re-encoded at another quality)
are served by nginx on 127.0.0.1; `dataengine run` (a subprocess with its embedded Ray) downloads them,
dedups them (pHash: a barrier, decided across tasks above `exact_max_rows`) and filters the captions.
Printed per size: wall seconds, rows/s end to end and in steady state (between the first and last
shard commit of the last segment), the driver's peak RSS (the `dataengine run` process only, polled),
and the row accounting. The issue's goal: driver <= 1 GB and within 10% between the sizes.

Run: `.venv/bin/python bench/pipeline_scale.py [--sizes 20000 100000]` (needs nginx)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from _engine import run_dataengine  # noqa: E402  (bench/ is on sys.path when run as a script)
from _record import report  # noqa: E402
from download import free_port, start_nginx  # noqa: E402

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "pipeline_scale"
GOOD = ["a red circle next to a blue square", "two dogs running on a beach at sunset", "a bowl of fresh fruit"]
BAD = ["IMG_2041.JPG", "click here to buy now", "x"]


def make_images(n: int, folder: Path) -> None:
    """n distinct smooth 320x240 JPEGs; every 100th is a re-encoded copy of the one before it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    previous = None
    for i in range(n):
        path = folder / f"{i}.jpg"
        if path.exists():
            continue
        if i % 100 == 99 and previous is not None:
            cv2.imwrite(str(path), previous, [cv2.IMWRITE_JPEG_QUALITY, 70])
            continue
        a, b, c = rng.uniform(-1, 1, (3, 3))
        image = np.stack([127 + 120 * np.sin(a[0] * xx / 40 + a[1] * yy / 30 + a[2] * 6),
                          127 + 120 * np.sin(b[0] * xx / 25 + b[1] * yy / 45 + b[2] * 6),
                          127 + 120 * np.cos(c[0] * xx / 35 + c[1] * yy / 20 + c[2] * 6)], axis=2)
        x0, y0 = rng.integers(0, 280), rng.integers(0, 200)
        image[y0:y0 + 40, x0:x0 + 40] = rng.integers(0, 255, 3)
        previous = np.clip(image, 0, 255).astype(np.uint8)
        cv2.imwrite(str(path), previous, [cv2.IMWRITE_JPEG_QUALITY, 90])


def make_urls(n: int, base_url: str, path: Path) -> None:
    captions = [BAD[i % len(BAD)] if i % 7 == 0 else f"{GOOD[i % len(GOOD)]} {i}" for i in range(n)]
    pq.write_table(pa.table({"url": [f"{base_url}/{i}.jpg" for i in range(n)], "caption": captions}), path)


def run(urls: Path, out: Path) -> tuple[float, int]:
    """`dataengine run`; returns wall seconds and the driver's peak RSS in bytes."""
    shutil.rmtree(out, ignore_errors=True)
    spec = {"name": "pipeline-scale", "input": {"path": str(urls), "shard_rows": 1000}, "output": str(out),
            "stages": [{"op": "download", "allow_private_networks": True, "threads": 16, "batch_size": 100,
                        "timeout": 10, "deadline": 20, "retries": 0},
                       {"op": "dedup", "descriptor": "phash"},
                       {"op": "caption_rules_filter"}]}
    spec_path = out.parent / f"{out.name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return run_dataengine(spec_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    images = WORK / "www"
    make_images(max(args.sizes), images)
    port = free_port()
    nginx = start_nginx(images, port)
    lines = [f"{'images':>8}{'wall s':>9}{'rows/s':>9}{'driver MiB':>12}  kept / rejected (dedup, caption rules)"]
    peaks = []
    try:
        for n in args.sizes:
            urls = WORK / f"urls-{n}.parquet"
            make_urls(n, f"http://127.0.0.1:{port}", urls)
            seconds, peak = run(urls, WORK / f"run-{n}")
            manifest = json.loads((WORK / f"run-{n}" / "run.json").read_text())
            stages = {s["stage"]: s for s in manifest["stages"]}
            peaks.append(peak)
            lines.append(f"{n:>8,}{seconds:>9.1f}{n / seconds:>9.1f}{peak / 2**20:>12.0f}  "
                         f"{manifest['totals']['kept']} / {manifest['totals']['rejected']} "
                         f"({stages['dedup']['rejected']}, {stages['caption_rules_filter']['rejected']})")
            print(lines[-1], flush=True)
    finally:
        nginx.terminate()
    if len(peaks) > 1:
        lines.append(f"driver peak RSS, largest vs smallest size: {peaks[-1] / peaks[0]:.2f}x")
    report("scale (b): download -> dedup (pHash) -> caption rules, nginx on 127.0.0.1", lines, not args.no_record)


if __name__ == "__main__":
    main()
