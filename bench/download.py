"""Download benchmark: our download stage vs img2dataset, side by side on the same machine.

Both download the same synthetic-web URL list (a mix of ~640, 1024 and 2048 px JPEGs plus a few
broken URLs) from the same nginx on 127.0.0.1, resize to 256 px keep_ratio, encode JPEG at the same
quality, on the same 2 cores. A third run, the floor, only decodes (DCT-scaled), resizes and encodes
the same files from memory with 2 processes: no network, no Parquet. Prints images/s, our ratio to
img2dataset and to the floor, and appends a dated block to bench/RESULTS.md.

Run: `.venv/bin/python bench/download.py [--n 5000]` (needs nginx: `apt-get install nginx-light`;
installs img2dataset into its own venv under bench/_work/ on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from _record import append_result  # noqa: E402  (bench/ is on sys.path when run as a script)

from dataengine.io.imaging import ImageOptions, process_image
from dataengine.testbed.synthweb import NoiseMix, build_synthweb, write_url_list

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work"
I2D_VENV = WORK / "img2dataset-venv"
IMAGE_SIZE, QUALITY = 256, 95
SHARD_ROWS = 250
# static-servable noise only: 404s, truncated and non-image bodies
BENCH_NOISE = NoiseMix(**{**{f: 0.0 for f in NoiseMix.__dataclass_fields__}, "http_404": 0.01, "truncated": 0.004,
                          "not_image": 0.004})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root: Path, port: int) -> subprocess.Popen:
    conf = WORK / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    types {{ image/jpeg jpg jpeg; image/png png; }}
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(WORK)], stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode() if proc.stderr else ''}")


def ensure_img2dataset() -> Path:
    """img2dataset in a venv of its own (its pins clash with ours); $IMG2DATASET names an existing one."""
    if os.environ.get("IMG2DATASET"):
        return Path(os.environ["IMG2DATASET"])
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return exe


def run_img2dataset(urls: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(ensure_img2dataset()), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "parquet", "--output_folder", str(out),
           "--processes_count", "2", "--thread_count", "32", "--image_size", str(IMAGE_SIZE),
           "--resize_mode", "keep_ratio", "--encode_quality", str(QUALITY), "--encode_format", "jpg",
           "--number_sample_per_shard", "1000", "--timeout", "10", "--retries", "0", "--enable_wandb", "False",
           "--disallowed_header_directives", "[]", "--compute_hash", "sha256"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def count_img2dataset(out: Path) -> int:
    return sum(s["successes"] for s in (json.loads(p.read_text()) for p in out.glob("*_stats.json")))


def run_ours(urls: Path, out: Path) -> tuple[float, float, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    spec = {
        "name": "bench", "input": {"path": str(urls), "shard_rows": SHARD_ROWS}, "output": str(out),
        "stages": [{"op": "download", "allow_private_networks": True, "threads": 8, "batch_size": 50,
                    "timeout": 10, "deadline": 20, "retries": 0, "image_size": IMAGE_SIZE,
                    "resize_mode": "keep_ratio", "encode_format": "jpeg", "encode_quality": QUALITY}],
    }
    spec_file = WORK / "bench-spec.json"
    spec_file.write_text(json.dumps(spec))
    started, started_at = time.perf_counter(), time.time()
    subprocess.run([sys.executable, "-m", "dataengine.cli", "run", str(spec_file)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "run.json").read_text())
    return wall, steady_rate(out), manifest["totals"]["kept"], first_commit(out) - started_at


def first_commit(run_dir: Path) -> float:
    """When the first shard committed (epoch seconds): its rows are in dataset/ from then on."""
    return min(json.loads(p.read_text())["committed_at"] for p in (run_dir / "_state" / "committed").glob("*.json"))


def steady_rate(run_dir: Path) -> float:
    """Rows/s between the first and the last shard commit: throughput once Ray and its workers are up."""
    markers = sorted((json.loads(p.read_text()) for p in (run_dir / "_state" / "committed").glob("*.json")),
                     key=lambda m: m["committed_at"])
    rows_after_first = sum(m["rows"] for m in markers[1:])
    return rows_after_first / (markers[-1]["committed_at"] - markers[0]["committed_at"])


def _floor_chunk(paths: list[str]) -> int:
    options = ImageOptions(image_size=IMAGE_SIZE, resize_mode="keep_ratio", encode_format="jpeg", encode_quality=QUALITY)
    blobs = [Path(p).read_bytes() for p in paths]
    done = 0
    for blob in blobs:
        try:
            process_image(blob, options)
            done += 1
        except Exception:  # noqa: BLE001 - broken files count as work done, like the downloaders' rejects
            pass
    return done


def run_floor(files: list[Path]) -> float:
    """Decode (DCT-scaled) + resize + encode every file, 2 processes, files pre-read in each worker."""
    chunks = [[str(p) for p in files[i::2]] for i in range(2)]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_floor_chunk, [c[:10] for c in chunks]))  # warm the workers
        started = time.perf_counter()
        list(pool.map(_floor_chunk, chunks))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    web = build_synthweb(WORK / f"web-{args.n}-{args.seed}", n=args.n, seed=args.seed, noise=BENCH_NOISE)
    port = free_port()
    nginx = start_nginx(web / "files", port)
    try:
        # nginx serves files/ at /, so /img/x.jpg and /truncated/x.jpg map 1:1; /missing/ is a real 404
        urls = write_url_list(web, f"http://127.0.0.1:{port}")
        n = pq.read_metadata(urls).num_rows
        ours_wall, ours_steady, ours_ok, fixed = run_ours(urls, WORK / "out-ours")
        i2d_wall = run_img2dataset(urls, WORK / "out-img2dataset")
        i2d_ok = count_img2dataset(WORK / "out-img2dataset")
    finally:
        nginx.terminate()
        nginx.wait()
    files = sorted((web / "files").rglob("*.jpg"))
    floor_wall = run_floor(files)

    rows = [("dataengine (end to end, incl. Ray start)", n / ours_wall, ours_ok),
            ("dataengine (steady state, between shard commits)", ours_steady, ours_ok),
            ("img2dataset (2 processes x 32 threads)", n / i2d_wall, i2d_ok),
            ("floor: decode+resize+encode only", len(files) / floor_wall, len(files))]
    lines = [f"{'run':<50}{'images/s':>10}{'ok':>7}"]
    lines += [f"{name:<50}{rate:>10.1f}{ok:>7}" for name, rate, ok in rows]
    lines.append(f"ratio to img2dataset (end to end, both): {rows[0][1] / rows[2][1]:.2f}x")
    lines.append(f"ratio to the floor: {rows[0][1] / rows[3][1]:.0%} end to end, {rows[1][1] / rows[3][1]:.0%} steady state")
    lines.append(f"dataengine fixed cost: {fixed:.1f} s from the command's start to its first committed shard "
                 f"(embedded Ray start, planning, worker start, the first shard's {SHARD_ROWS} rows)")
    report = "\n".join(lines)
    print(report)
    if not args.no_record:
        append_result(f"download, n={n}", report)


if __name__ == "__main__":
    main()
