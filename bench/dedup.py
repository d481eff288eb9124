"""Dedup benchmark: exact vs partitioned near-duplicate search on random 512-d vectors.

Random unit vectors (the hard case for clustering: no structure to exploit) with planted near-
duplicates (a copy plus noise, cosine ~0.95 to its source). For each size, each method runs in a
fresh process so its peak RSS is its own; recall is the share of planted pairs found. Exact search
at 1M would take hours here (100k already takes minutes), so 1M runs partitioned only.

Run: `.venv/bin/python bench/dedup.py [--sizes 100000 1000000] [--no-record]`
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import numpy as np
from _record import append_result  # noqa: E402  (bench/ is on sys.path when run as a script)

DIM, THRESHOLD, NOISE = 512, 0.9, 0.014  # noise 0.014 per dim on 512-d -> cosine ~0.95


def planted(n: int, copies: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n - copies, DIM), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.choice(n - copies, copies, replace=False)
    dup = base[src] + NOISE * rng.standard_normal((copies, DIM), dtype=np.float32)
    dup /= np.linalg.norm(dup, axis=1, keepdims=True)
    return np.concatenate([base, dup]), {(int(s), n - copies + i) for i, s in enumerate(src)}


def _run(method: str, n: int, queue: mp.Queue) -> None:
    import faiss

    from dataengine.dedup.index import SearchConfig, exact_pairs, partitioned_pairs

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    vectors, truth = planted(n, copies=max(100, n // 1000))
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if method == "exact":
        pairs = exact_pairs(vectors, THRESHOLD)
    else:
        pairs = partitioned_pairs(vectors, SearchConfig(threshold=THRESHOLD))
    seconds = time.perf_counter() - started
    found = {tuple(p) for p in pairs.tolist()}
    queue.put({"method": method, "n": n, "seconds": seconds, "recall": len(truth & found) / len(truth),
               "extra_pairs": len(found - truth), "vectors_mb": vectors.nbytes / 2**20,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_before_mb": start_rss / 1024})


def measure(method: str, n: int) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, n, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--exact-max", type=int, default=100_000, help="largest size the exact search runs at")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        for method in (["exact"] if n <= args.exact_max else []) + ["partitioned"]:
            result = measure(method, n)
            rows.append(result)
            print(f"{method:<12}{n:>9} vectors: {result['seconds']:8.1f} s, recall {result['recall']:.3f}, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB (vectors {result['vectors_mb']:.0f} MB)", flush=True)
    lines = [f"{'method':<12}{'vectors':>10}{'seconds':>10}{'recall':>8}{'peak RSS MB':>13}{'vectors MB':>12}"]
    lines += [f"{r['method']:<12}{r['n']:>10}{r['seconds']:>10.1f}{r['recall']:>8.3f}{r['peak_rss_mb']:>13.0f}"
              f"{r['vectors_mb']:>12.0f}" for r in rows]
    by = {(r["method"], r["n"]): r for r in rows}
    for n in args.sizes:
        if ("exact", n) in by:
            lines.append(f"at {n}: partitioned takes {by[('partitioned', n)]['seconds'] / by[('exact', n)]['seconds']:.1%} "
                         f"of the exact time")
    report = "\n".join(lines)
    print(report)
    if not args.no_record:
        append_result(f"dedup, {DIM}-d, threshold {THRESHOLD}", report)


if __name__ == "__main__":
    main()
