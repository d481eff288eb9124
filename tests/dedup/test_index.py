"""The FAISS search: planted pairs found, exact == partitioned, greedy grouping, GPU switch falls back."""

from __future__ import annotations

import numpy as np

from dataengine.dedup.index import SearchConfig, exact_pairs, greedy_keep, partitioned_pairs


def _planted(n=3000, d=32, copies=60, noise=0.03, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, copies, replace=False)
    y = x[src] + noise * rng.normal(size=(copies, d)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return np.concatenate([x, y]), {(int(s), n + i) for i, s in enumerate(src)}


def test_exact_search_finds_every_planted_pair_and_nothing_else():
    vectors, planted = _planted()
    pairs = {tuple(p) for p in exact_pairs(vectors, 0.9).tolist()}
    assert pairs == planted


def test_partitioned_search_gives_the_same_groups_as_exact():
    vectors, planted = _planted(seed=1)
    exact = exact_pairs(vectors, 0.9)
    parted = partitioned_pairs(vectors, SearchConfig(threshold=0.9, partitions=20, assign=3))
    uids = [f"{i:06d}" for i in range(len(vectors))]
    prio = np.zeros(len(vectors))
    assert np.array_equal(greedy_keep(len(vectors), exact, prio, uids), greedy_keep(len(vectors), parted, prio, uids))
    assert {tuple(p) for p in parted.tolist()} == planted


def test_greedy_keeps_the_best_and_does_not_chain():
    # 0~1 and 1~2 but not 0~2: 1 has the best score, so 0 and 2 both become its duplicates;
    # 3~4 tie on score: the smaller uid is kept
    pairs = np.array([[0, 1], [1, 2], [3, 4]])
    keep = greedy_keep(5, pairs, np.array([0.5, 0.9, 0.1, 0.3, 0.3]), ["a", "b", "c", "d", "e"])
    assert keep.tolist() == [1, -1, 1, -1, 3]
    keep = greedy_keep(3, np.array([[0, 1], [1, 2]]), np.array([0.9, 0.5, 0.8]), ["a", "b", "c"])
    assert keep.tolist() == [-1, 0, -1]  # 2 is kept: its only neighbour (1) was not kept


def test_gpu_index_switch_falls_back_to_the_cpu_index_without_a_gpu():
    vectors, planted = _planted(n=500, copies=10, seed=2)
    assert {tuple(p) for p in exact_pairs(vectors, 0.9, use_gpu=True).tolist()} == planted
    parted = partitioned_pairs(vectors, SearchConfig(threshold=0.9, partitions=5, use_gpu=True))
    assert {tuple(p) for p in parted.tolist()} == planted
