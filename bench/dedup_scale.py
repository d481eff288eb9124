"""Scale benchmark (c): dedup decided across tasks, as the engine runs it after a barrier.

Random unit 512-d vectors (the hard case: no clusters to exploit) with 0.1% planted near-duplicates
(cosine ~0.95, threshold 0.9), and random 256-bit pHash codes with 2% planted copies (0-10 bits
flipped, radius 10), written as a segment's kept part files (10k rows, a shard each). The decision
runs in a fresh driver process with an embedded Ray (2 CPUs): `engine.near_duplicates.decide`, the
path `dataengine run` takes above `exact_max_rows`. Printed: seconds, the driver's peak RSS (its own
process, not the Ray workers), the temporary disk its placements took, and recall of the planted pairs
(a pair is caught when both rows end in one group). For pHash the groups are checked against the
all-pairs answer (one process, `dedup.hamming.near_pairs` + greedy keeping), whose time is printed for
the ratio.

Run: `.venv/bin/python bench/dedup_scale.py [--vectors 1000000 2000000] [--codes 1000000]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)
from phash import RADIUS  # noqa: E402
from phash import planted as planted_codes  # noqa: E402

from dataengine.core import columns as C

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "dedup_scale"
DIM, THRESHOLD, NOISE = 512, 0.9, 0.014  # noise 0.014 per dim on 512-d -> cosine ~0.95
FILE_ROWS = 10_000

DRIVER = """
import json, sys, time
import ray
from dataengine.core.raytools import QUIET_WORKERS
from dataengine.engine import near_duplicates
from dataengine.ops.dedup import Dedup, DedupConfig
files, out, config = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env=QUIET_WORKERS)
started = time.perf_counter()
decision = near_duplicates.decide(Dedup.near_duplicates(DedupConfig(**config)), files, __import__("pathlib").Path(out))
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's (the bench's) memory
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024,
                  "decision": {k: v for k, v in decision.items() if k != "rejected"}}))
"""


def write_parts(folder: Path, column: str, descriptors: pa.Array) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(0, len(descriptors), FILE_ROWS):
        rows = range(k, min(k + FILE_ROWS, len(descriptors)))
        path = folder / f"part-{k // FILE_ROWS:05d}.parquet"
        pq.write_table(pa.table({C.UID: [f"{i:09d}" for i in rows], C.SHARD: [f"{k // FILE_ROWS:05d}"] * len(rows),
                                 column: descriptors.slice(k, len(rows))}), path)
        files.append(str(path))
    return files


def planted_vectors(n: int, seed: int = 0) -> tuple[pa.Array, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    copies = max(100, n // 1000)
    base = rng.standard_normal((n, DIM), dtype=np.float32)
    src = rng.choice(n - copies, copies, replace=False)
    base[n - copies:] = base[src] + NOISE * np.linalg.norm(base[src], axis=1, keepdims=True) * \
        rng.standard_normal((copies, DIM), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    array = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * DIM, DIM, dtype=np.int32)), pa.array(base.ravel()))
    return array, [(int(s), n - copies + i) for i, s in enumerate(src)]


def decide(files: list[str], out: Path, config: dict) -> dict:
    """The decision in a fresh driver process; the disk its placements took, polled."""
    work = out.with_name(out.name + ".work")
    peak_disk = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            with contextlib.suppress(OSError):  # files come and go (renamed into place, removed at the end)
                peak_disk[0] = max(peak_disk[0], sum(p.stat().st_size for p in work.rglob("*") if p.is_file()))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([files, str(out), config])],
                          capture_output=True, text=True)
    done.set()
    watcher.join()
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["disk_gb"] = peak_disk[0] / 2**30
    return result


def groups(out: Path) -> dict[int, int]:
    """Row -> the row it was grouped under (its kept row), for rejected rows."""
    table = pa.concat_tables([pq.read_table(p) for p in out.glob("*.parquet")]) if any(out.glob("*.parquet")) else None
    if table is None:
        return {}
    return {int(u): int(r.removeprefix("duplicate_of:"))
            for u, r in zip(table.column(C.UID).to_pylist(), table.column(C.REJECT_REASON).to_pylist())}


def recall(planted: list[tuple[int, int]], grouped: dict[int, int]) -> float:
    return sum(grouped.get(a, a) == grouped.get(b, b) for a, b in planted) / len(planted)


def all_pairs_groups(codes: np.ndarray) -> tuple[dict[int, int], float]:
    from dataengine.dedup.hamming import near_pairs
    from dataengine.dedup.index import greedy_keep

    started = time.perf_counter()
    pairs = near_pairs(codes, RADIUS)
    uids = [f"{i:09d}" for i in range(len(codes))]
    duplicate_of = greedy_keep(len(codes), pairs, np.zeros(len(codes)), uids)
    seconds = time.perf_counter() - started
    return {int(i): int(duplicate_of[i]) for i in np.flatnonzero(duplicate_of >= 0)}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, nargs="*", default=[1_000_000, 2_000_000])
    parser.add_argument("--codes", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    lines = [f"{'descriptor':<11}{'rows':>10}{'seconds':>9}{'driver MB':>11}{'disk GB':>9}{'recall':>8}  notes"]
    for n in args.vectors:
        shutil.rmtree(WORK, ignore_errors=True)
        array, planted = planted_vectors(n)
        files = write_parts(WORK / "parts", C.SSCD_EMBEDDING, array)
        del array
        out = WORK / "decision"
        r = decide(files, out, {"descriptor": "sscd", "threshold": THRESHOLD, "exact_max_rows": 50_000})
        d = r["decision"]
        lines.append(f"{'512-d':<11}{n:>10}{r['seconds']:>9.1f}{r['peak_rss_mb']:>11.0f}{r['disk_gb']:>9.1f}"
                     f"{recall(planted, groups(out)):>8.3f}  {d['partitions']} partitions, {d['buckets']} buckets, "
                     f"{d['placements'] / n:.1f} placements/row, {d['pairs']} pairs")
        print(lines[-1], flush=True)
    for n in args.codes:
        shutil.rmtree(WORK, ignore_errors=True)
        codes, planted = planted_codes(n)  # bench/phash.py's codes: 2% copies, 0-10 bits flipped
        array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(codes.tobytes())])
        files = write_parts(WORK / "parts", C.PHASH, array.cast(pa.binary()))
        out = WORK / "decision"
        r = decide(files, out, {"descriptor": "phash", "max_hamming": RADIUS, "exact_max_rows": 50_000})
        grouped = groups(out)
        exact, exact_seconds = all_pairs_groups(codes)
        same = "same groups as all pairs" if grouped == exact else f"DIFFERENT groups ({len(grouped)} vs {len(exact)})"
        lines.append(f"{'pHash-256':<11}{n:>10}{r['seconds']:>9.1f}{r['peak_rss_mb']:>11.0f}{r['disk_gb']:>9.1f}"
                     f"{recall(planted, grouped):>8.3f}  {same}; one process: {exact_seconds:.1f} s "
                     f"(multi-index hashing; all pairs at 1M: see the pHash bench)")
        print(lines[-1], flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    report("Dedup decided across tasks (bench/dedup_scale.py)", lines, not args.no_record)


if __name__ == "__main__":
    main()
