"""Near-duplicate binary codes (pHash) without comparing all pairs: multi-index hashing.

Two codes within `r` differing bits agree exactly on at least one of `r + 1` disjoint bands of their
bits (pigeonhole), so the pairs that share a band value are a superset of the answer: each band is a
bucketing, candidates are the pairs inside a bucket, and each candidate is checked by its full Hamming
distance. The answer is exactly the all-pairs search's, at the cost of the candidates instead of n^2
(Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing", CVPR 2012). With many bits
allowed to differ the bands get too narrow to separate anything; then the all-pairs search is used.

A code may carry a colour layout after its `hash_bytes` hash bytes (`descriptors.colour_layout`); with
a `colour_tolerance`, a pair is near only if also every one of those bytes differs by at most that much.
The bands are cut from the hash bytes alone, so the candidates, and the guarantee, are unchanged.
"""

from __future__ import annotations

import numpy as np

#: narrower bands than this bucket random codes too coarsely to save anything over all pairs
MIN_BAND_BITS = 12
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def band_keys(bits: np.ndarray, bands: int) -> list[np.ndarray]:
    """One integer key per code for each of `bands` disjoint, nearly equal bit ranges (bits: n x B, 0/1)."""
    edges = np.linspace(0, bits.shape[1], bands + 1).astype(int)
    keys = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        weights = np.left_shift(np.uint64(1), np.arange(hi - lo, dtype=np.uint64))
        keys.append(bits[:, lo:hi].astype(np.uint64) @ weights)
    return keys


def bucket_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs (i < j) of rows with equal keys."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    chunks = []
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = np.sort(order[start:start + size])
        i, j = np.triu_indices(size, k=1)
        chunks.append(np.stack([members[i], members[j]], axis=1))
    return np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.int64)


def within(codes: np.ndarray, pairs: np.ndarray, max_distance: float, hash_bytes: int | None = None,
           colour_tolerance: int | None = None) -> np.ndarray:
    """Which `pairs` are near: at most `max_distance` differing bits in the first `hash_bytes` bytes of
    their codes (all of them by default) and, with `colour_tolerance`, no byte after those further apart
    than it."""
    hash_bytes = hash_bytes or codes.shape[1]
    near = distances(codes[:, :hash_bytes], pairs) <= max_distance
    if colour_tolerance is not None and codes.shape[1] > hash_bytes:
        hits = np.flatnonzero(near)
        for k in range(0, len(hits), 1 << 16):  # a chunk of pairs' colours at a time: 2 x 65536 x 192 x 2 bytes
            p = pairs[hits[k:k + (1 << 16)]]
            near[hits[k:k + (1 << 16)]] = colour_gaps(codes[p[:, 0]], codes[p[:, 1]], hash_bytes) <= colour_tolerance
    return near


def colour_gaps(a: np.ndarray, b: np.ndarray, hash_bytes: int) -> np.ndarray:
    """Row by row, the largest difference between the colour-layout bytes (those after `hash_bytes`) of
    codes `a` and `b`."""
    return np.abs(a[:, hash_bytes:].astype(np.int16) - b[:, hash_bytes:]).max(axis=1)


def distances(codes: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Hamming distance of each pair of codes (uint8 rows)."""
    out = np.empty(len(pairs), dtype=np.int32)
    for k in range(0, len(pairs), chunk):
        p = pairs[k:k + chunk]
        out[k:k + chunk] = _POPCOUNT[codes[p[:, 0]] ^ codes[p[:, 1]]].sum(axis=1, dtype=np.int32)
    return out


def near_pairs(codes: np.ndarray, max_distance: int, hash_bytes: int | None = None,
               colour_tolerance: int | None = None) -> np.ndarray:
    """All pairs (i < j) of codes within `max_distance` bits (and `colour_tolerance`: see `within`),
    sorted; the same as comparing every pair."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    hashed = codes[:, :hash_bytes or codes.shape[1]]  # a colour layout after the hash takes no part in banding
    n, width = codes.shape[0], hashed.shape[1] * 8
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    bands = max(max_distance + 1, -(-width // 64))  # more bands than r + 1 keep the guarantee; keys fit 64 bits
    if width // bands < MIN_BAND_BITS:
        i, j = np.triu_indices(n, k=1)
        candidates = np.stack([i, j], axis=1)
    else:
        bits = np.unpackbits(hashed, axis=1)
        found = [bucket_pairs(keys) for keys in band_keys(bits, bands)]
        candidates = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), dtype=np.int64)
    if not len(candidates):
        return np.zeros((0, 2), dtype=np.int64)
    return candidates[within(codes, candidates, max_distance, hash_bytes, colour_tolerance)].astype(np.int64)
