"""Near-duplicate search over descriptors with FAISS, exact or partitioned, and greedy grouping.

Exact: one flat inner-product index and a range search at the cosine threshold; O(n^2) work, so
only below `exact_max_rows`. Partitioned (SemDeDup-style, made to scale): spherical k-means on a
sample, every vector stored in its nearest partition and searched as a query in up to `assign - 1`
more whose centroids are close enough to hold a duplicate (so a pair that straddles a border is still
compared), then an exact range search inside each partition. Memory per search is one partition.

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
    assign: int = 8  # nearest partitions searched; random 512-d, 1M: 4 -> recall 0.95, 6 -> 0.98, 8 -> 0.995
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


def partition_count(n: int, partitions: int | None) -> int:
    """k-means partitions for `n` vectors: the configured number, else about sqrt(n)."""
    return max(2, min(n, partitions or math.isqrt(n)))


def train_centroids(sample: np.ndarray, k: int, use_gpu: bool = False, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (k x d, unit rows) trained on `sample`."""
    faiss = _faiss()
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=20, spherical=True, seed=seed, gpu=bool(use_gpu))
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


def assign_partitions(vectors: np.ndarray, centroids: np.ndarray, assign: int,
                      threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each vector's home partition (its nearest centroid), and the (row, partition) placements where it
    is also searched as a query: among its `assign` nearest centroids, those close enough to hold a
    duplicate. If x is home in A and y, within distance eps of x, is home in B, then
    d(x, cB) <= d(y, cB) + eps <= d(y, cA) + eps <= d(x, cA) + 2 eps: farther partitions cannot hold one.
    Each vector is stored once (home) and copied only as a query, so a partition compares its homes with
    each other and with its queries, and a pair is found when either row is a query in the other's home."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    sims, parts = index.search(vectors, min(assign, len(centroids)))
    squared_norms = np.einsum("ij,ij->i", vectors, vectors)[:, None] + np.einsum("ij,ij->i", centroids, centroids)[parts]
    distance = np.sqrt(np.maximum(0.0, squared_norms - 2 * sims))
    eps = math.sqrt(max(0.0, 2 - 2 * threshold))
    near = distance[:, 1:] <= distance[:, :1] + 2 * eps + 1e-6
    rows, cols = np.nonzero(near)
    return parts[:, 0].astype(np.int64), rows.astype(np.int64), parts[:, 1:][rows, cols].astype(np.int64)


def search_partition(homes: np.ndarray, queries: np.ndarray, threshold: float, use_gpu: bool = False) -> np.ndarray:
    """Pairs (i, j) with cosine >= threshold among `homes` (i < j) and between a query and a home, in
    the index space of `homes` followed by `queries` (a query's index is len(homes) + its position)."""
    faiss = _faiss()
    if len(homes) == 0 or len(homes) + len(queries) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = _maybe_gpu(faiss.IndexFlatIP(homes.shape[1]), use_gpu)
    index.add(np.ascontiguousarray(homes, dtype=np.float32))
    both = np.ascontiguousarray(np.concatenate([homes, queries]) if len(queries) else homes, dtype=np.float32)
    # range_search keeps scores > radius; nudge down so ">= threshold" holds at float precision
    lims, _, ids = index.range_search(both, float(np.nextafter(np.float32(threshold), np.float32(-2))))
    rows = np.repeat(np.arange(len(both)), np.diff(lims).astype(np.int64))
    pairs = np.stack([ids.astype(np.int64), rows], axis=1)  # (home, home or query)
    return pairs[pairs[:, 0] < pairs[:, 1]]


def members(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """For each label 0..k-1, the (sorted) positions holding it."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(k)]


def partitioned_pairs(vectors: np.ndarray, config: SearchConfig, seed: int = 0) -> np.ndarray:
    """Pairs found by comparing each partition's home vectors with each other and with its queries
    (`assign_partitions`), in one process; the engine runs the same steps across tasks
    (`dataengine.engine.near_duplicates`)."""
    n = len(vectors)
    k = partition_count(n, config.partitions)
    sample = vectors[np.random.default_rng(seed).choice(n, size=min(n, 64 * k), replace=False)]
    centroids = train_centroids(sample, k, config.use_gpu, seed)
    home, query_rows, query_parts = assign_partitions(vectors, centroids, config.assign, config.threshold)
    homes, queries = members(home, k), members(query_parts, k)
    log.info("dedup: %d vectors in %d partitions (largest %d), %d query placements", n, k,
             max((len(h) for h in homes), default=0), len(query_rows))
    work = [(h, query_rows[q]) for h, q in zip(homes, queries) if len(h) and len(h) + len(q) > 1]
    local = parallel_map(search_partition, [(vectors[h], vectors[q], config.threshold) for h, q in work])
    found = [np.concatenate([h, q])[pairs] for (h, q), pairs in zip(work, local) if len(pairs)]
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.sort(np.concatenate(found), axis=1), axis=0)


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
