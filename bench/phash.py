"""pHash near-duplicate search: multi-index hashing (ours) vs comparing all pairs (FAISS binary flat).

Random 256-bit codes with 2% planted copies (0-10 bits flipped), radius 10 bits (the dedup op's
default). At sizes both can run, the pairs must be identical and the time ratio is printed; at the
largest size only ours runs, and its growth against the smaller sizes shows how it scales (all pairs
grow as n^2). Appends the report to bench/RESULTS.md.

Run: `.venv/bin/python bench/phash.py [--both 20000 50000] [--ours 1000000]`
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)

from dataengine.dedup.hamming import near_pairs

RADIUS = 10


def planted(n: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Random 256-bit codes, the last 2% copies of others with 0-10 bits flipped; and the (source, copy) pairs."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    copies = n // 50
    sources = rng.choice(n - copies, copies, replace=False)
    for k, src in enumerate(sources):
        bits = np.unpackbits(codes[src])
        bits[rng.choice(256, rng.integers(0, RADIUS + 1), replace=False)] ^= 1
        codes[n - copies + k] = np.packbits(bits)
    return codes, [(int(src), n - copies + k) for k, src in enumerate(sources)]


def all_pairs(codes: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexBinaryFlat(256)
    index.add(codes)
    lims, _, ids = index.range_search(codes, RADIUS + 1)
    rows = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
    pairs = np.stack([rows, ids], axis=1)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--both", type=int, nargs="*", default=[20_000, 50_000])
    parser.add_argument("--ours", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    lines = [f"{'codes':>10} {'pairs':>8} {'ours s':>8} {'all pairs s':>12} {'ratio':>7}  same pairs"]
    for n in args.both:
        codes, _ = planted(n)
        ours, t_ours = timed(near_pairs, codes, RADIUS)
        theirs, t_all = timed(all_pairs, codes)
        lines.append(f"{n:>10,} {len(ours):>8,} {t_ours:>8.2f} {t_all:>12.2f} {t_all / t_ours:>6.1f}x  "
                     f"{np.array_equal(ours, theirs)}")
        print(lines[-1], flush=True)
    for n in args.ours:
        codes, _ = planted(n)
        ours, t_ours = timed(near_pairs, codes, RADIUS)
        lines.append(f"{n:>10,} {len(ours):>8,} {t_ours:>8.2f} {'-':>12} {'-':>7}  (all pairs not run: n^2)")
        print(lines[-1], flush=True)
    report("pHash near-duplicates: multi-index hashing vs all pairs, radius 10 of 256 bits", lines,
           record=not args.no_record)


if __name__ == "__main__":
    main()
