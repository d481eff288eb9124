"""pHash near-duplicates by multi-index hashing: exactly the pairs an all-pairs comparison finds."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.dedup.descriptors import hamming
from dataengine.dedup.hamming import band_keys, bucket_pairs, near_pairs, within


def _codes(n=3000, nbytes=32, copies=200, flips=(0, 12), seed=0):
    """Random codes with planted copies, each with a few bits flipped."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    sources = rng.choice(n - copies, copies, replace=False)
    for k, src in enumerate(sources):
        copy = np.unpackbits(codes[src])
        copy[rng.choice(nbytes * 8, rng.integers(*flips), replace=False)] ^= 1
        codes[n - copies + k] = np.packbits(copy)
    return codes


def _all_pairs(codes, r):
    """Every pair compared (descriptors.hamming, one row against the rest at a time)."""
    pairs = [(i, i + 1 + j) for i in range(len(codes) - 1)
             for j in np.flatnonzero(hamming(codes[i:i + 1], codes[i + 1:])[0] <= r)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("r", [0, 4, 10, 20])
def test_the_same_pairs_as_comparing_every_pair(r):
    codes = _codes()
    found = near_pairs(codes, r)
    expected = _all_pairs(codes, r)
    assert len(expected) > 0 or r == 0
    assert np.array_equal(found, expected)


def test_64_bit_codes_and_wide_radii_fall_back_to_all_pairs():
    codes = _codes(n=400, nbytes=8, copies=40, flips=(0, 6))
    for r in (3, 6, 30):  # 64 bits / (r + 1) bands: 16, 9 (< 12: all pairs), 2 bits
        assert np.array_equal(near_pairs(codes, r), _all_pairs(codes, r))


def test_bands_are_disjoint_and_bucket_pairs_pairs_equal_keys():
    bits = np.unpackbits(_codes(n=50, copies=5), axis=1)
    keys = band_keys(bits, 11)
    assert len(keys) == 11 and all(k.dtype == np.uint64 for k in keys)
    assert sorted(bucket_pairs(np.array([5, 3, 5, 5, 3], dtype=np.uint64)).tolist()) == [[0, 2], [0, 3], [1, 4], [2, 3]]


def test_colour_layouts_after_the_hash_veto_pairs_and_leave_the_rest():
    codes = _codes(n=1500, copies=150)
    plain = near_pairs(codes, 10)
    rng = np.random.default_rng(4)
    colours = rng.integers(0, 240, (len(codes), 12), dtype=np.uint8)
    for k, (a, b) in enumerate(plain):  # most copies keep their colours (within 2); every tenth is recoloured
        colours[b] = 255 - colours[a] if k % 10 == 0 else colours[a] + rng.integers(0, 3, 12, dtype=np.uint8)
    with_colour = np.concatenate([codes, colours], axis=1)
    assert np.array_equal(near_pairs(with_colour, 10, hash_bytes=32), plain)  # no tolerance: colours ignored
    found = near_pairs(with_colour, 10, hash_bytes=32, colour_tolerance=4)
    assert len(plain) > 100 and np.array_equal(found, np.delete(plain, np.arange(0, len(plain), 10), axis=0))
    assert within(with_colour, plain, 10, 32, 4).sum() == len(found)
    assert within(with_colour, plain, 10).sum() < len(plain)  # without hash_bytes every byte counts as bits
