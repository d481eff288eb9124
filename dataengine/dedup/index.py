"""Near-duplicate search over descriptors with FAISS, exact or partitioned, and greedy grouping.

Exact: one flat inner-product index and a range search at the cosine threshold; O(n^2) work, so
only below `exact_max_rows`. Partitioned (SemDeDup-style, made to scale): spherical k-means on a
sample, every vector assigned to its `assign` nearest centroids (four by default, so a pair that
straddles a border is still compared), then an exact range search inside each partition, the
partitions searched in parallel Ray tasks when Ray is up. Memory per task is one partition.

Grouping is greedy, not transitive: rows are visited best first (highest priority score, then
smallest uid); a row with a kept neighbour above the threshold becomes that neighbour's duplicate,
otherwise it is kept. Chains (A~B, B~C, A!~C) therefore do not collapse into one group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from dataengine.core.raytools import parallel_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    threshold: float  # cosine similarity for vectors; for binary hashes: max Hamming distance
    exact_max_rows: int = 50_000
    partitions: int | None = None  # default: about sqrt(n)
    assign: int = 4  # partitions per vector; random 512-d, 100k: 3 -> recall 0.98, 4 -> 0.99, 6 -> 1.0
    use_gpu: bool = False


def _faiss():
    import faiss

    return faiss


def _maybe_gpu(index, use_gpu: bool):
    faiss = _faiss()
    if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def exact_pairs(vectors: np.ndarray, threshold: float, use_gpu: bool = False) -> np.ndarray:
    """All pairs (i < j) with cosine >= threshold; `vectors` are L2-normalised rows."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index = _maybe_gpu(index, use_gpu)
    index.add(vectors)
    # range_search keeps scores > radius; nudge down so ">= threshold" holds at float precision
    lims, _, ids = index.range_search(vectors, float(np.nextafter(np.float32(threshold), np.float32(-2))))
    rows = np.repeat(np.arange(len(vectors)), np.diff(lims).astype(np.int64))
    pairs = np.stack([rows, ids], axis=1)
    return pairs[pairs[:, 0] < pairs[:, 1]]


def partitioned_pairs(vectors: np.ndarray, config: SearchConfig, seed: int = 0) -> np.ndarray:
    """Pairs found by comparing only within k-means partitions (each vector in `assign` of them)."""
    faiss = _faiss()
    n, d = vectors.shape
    k = config.partitions or max(2, int(math.sqrt(n)))
    sample = vectors[np.random.default_rng(seed).choice(n, size=min(n, 64 * k), replace=False)]
    kmeans = faiss.Kmeans(d, k, niter=20, spherical=True, seed=seed, gpu=bool(config.use_gpu))
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    _, assigned = kmeans.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(config.assign, k))
    flat = assigned.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(k + 1))
    members = order // assigned.shape[1]  # row of each (row, partition) assignment
    groups = [np.sort(members[bounds[c]:bounds[c + 1]]) for c in range(k)]
    groups = [g for g in groups if len(g) > 1]
    log.info("dedup: %d vectors in %d partitions (largest %d)", n, len(groups), max((len(g) for g in groups), default=0))
    results = _search_partitions(vectors, groups, config.threshold)
    pairs = np.concatenate([r for r in results if len(r)], axis=0) if any(len(r) for r in results) else np.zeros((0, 2), np.int64)
    return np.unique(np.sort(pairs, axis=1), axis=0) if len(pairs) else pairs


def _search_partitions(vectors: np.ndarray, groups: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    """Exact search inside each partition, in parallel Ray tasks when Ray is up; global indices out."""
    local = parallel_map(exact_pairs, [(vectors[g], threshold) for g in groups])
    return [g[pairs] if len(pairs) else pairs for g, pairs in zip(groups, local)]


def near_duplicate_pairs(vectors: np.ndarray, config: SearchConfig) -> tuple[np.ndarray, str]:
    """Pairs above the threshold, exact below `exact_max_rows`, partitioned above."""
    if len(vectors) <= config.exact_max_rows:
        return exact_pairs(vectors, config.threshold, config.use_gpu), "exact"
    return partitioned_pairs(vectors, config), "partitioned"


def greedy_keep(n: int, pairs: np.ndarray, priority: np.ndarray, uids: list[str]) -> np.ndarray:
    """For each row, -1 if kept, else the index of the kept row it duplicates.

    Rows are visited by descending `priority`, ties by ascending uid.
    """
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in pairs:
        neighbours[int(a)].append(int(b))
        neighbours[int(b)].append(int(a))
    order = np.lexsort((np.asarray(uids, dtype=object), -priority))
    duplicate_of = np.full(n, -2, dtype=np.int64)  # -2: not visited yet
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    for i in order:
        kept = [j for j in neighbours[i] if duplicate_of[j] == -1]
        duplicate_of[i] = min(kept, key=lambda j: rank[j]) if kept else -1
    return duplicate_of
