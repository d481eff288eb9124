"""Near-duplicate decisions (dedup) made across tasks over descriptors they read from the part files;
the driver sees file names and counts.

Vectors (cosine): a task trains k-means centroids on a sample of the files; one task per chunk of files
places each row in its nearest partition and, as a query, in the nearby ones that can hold a duplicate
(`dedup.index.assign_partitions`), and writes the placements into bucket files (a bucket is a set of
whole partitions); one task per bucket searches its partitions exactly. Binary codes (Hamming): the
partitions are multi-index hashing's (band, band value) buckets (`dedup.hamming`): codes within r bits
share one of r + 1 bands, and each candidate is checked by its full distance, so the pairs are exactly
the all-pairs search's. Then one task groups the pairs: only rows with a pair take part, and greedy
keeping over them alone gives the result it gives over all rows (a row's fate depends on its neighbours
only). The decision, uid -> reason, is written as Parquet per shard (`engine/rejections.py`).

Disk: vectors are written once per placement (at most `assign` times), under `<decision>.work/`, removed
when the decision is saved. Memory: a task holds one chunk, one bucket, or the pairs.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core import raytools
from dataengine.core.atomic import write_parquet_atomic
from dataengine.dedup.descriptors import descriptor_matrix
from dataengine.dedup.hamming import MIN_BAND_BITS, band_keys, bucket_pairs, within
from dataengine.dedup.index import (
    assign_partitions,
    greedy_keep,
    members,
    partition_count,
    search_partition,
    train_centroids,
)
from dataengine.engine.parts import read_columns
from dataengine.engine.rejections import PARQUET, REJECTED, write_rejected
from dataengine.ops.base import NearDuplicates

#: files whose footers one task reads
FILES_PER_TASK = 64
#: the placement bytes one placing task writes (it holds about three times this)
PLACE_BYTES = 256 << 20
#: the descriptor bytes one search task holds (its bucket)
BUCKET_BYTES = 256 << 20
SAMPLE_PER_CENTROID = 64
PAIR_COLUMNS = ["a", "b"]  # global row numbers of a pair, a < b


def decide(spec: NearDuplicates, files: list[str], out_dir: Path) -> dict[str, Any] | None:
    """The grouping of `files`' rows under `spec`, rejected uids written per shard under `out_dir`; None
    at or below `exact_max_rows` rows (one task's `Op.decide` is quicker there)."""
    groups = [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
    shapes = raytools.get([raytools.submit(_file_shapes, group, spec.column, num_cpus=0.25) for group in groups])
    rows_per_file = [rows for group_rows, _ in shapes for rows in group_rows]
    n = sum(rows_per_file)
    width = max((w for _, w in shapes), default=0)
    if n <= spec.exact_max_rows or width == 0 or (spec.metric == "hamming" and _bands(spec, width) is None):
        return None
    if spec.one_task_only:
        raise ValueError(f"dedup: {spec.one_task_only} is decided in one task, up to exact_max_rows rows "
                         f"({spec.exact_max_rows:,}), and this stage has {n:,}: raise exact_max_rows (that task holds "
                         f"every row's descriptors) or turn {spec.one_task_only} off")
    work = out_dir.with_name(out_dir.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    k = 0
    if spec.metric == "cosine":
        k = partition_count(n, spec.partitions)
        raytools.get(raytools.submit(_train, files, spec.column, k, min(n, SAMPLE_PER_CENTROID * k), str(work)))
        copies, row_bytes = spec.assign, 4 * width + 64
    else:
        copies, row_bytes = _bands(spec, width) or 1, width + 80
    buckets = max(1, math.ceil(n * copies * row_bytes / BUCKET_BYTES))
    chunks, chunk_rows = _chunks(files, rows_per_file, max(1, PLACE_BYTES // (copies * row_bytes)))
    bases = np.cumsum([0] + chunk_rows)[:-1].tolist()
    placed = raytools.get([raytools.submit(_place, spec, chunk, int(base), c, str(work), buckets)
                           for c, (chunk, base) in enumerate(zip(chunks, bases))])
    found = raytools.get([raytools.submit(_search, spec, str(work), b) for b in range(buckets)])
    grouped = raytools.get(raytools.submit(_group, str(work), len(chunks), buckets, str(out_dir)))
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": n, "pairs": grouped["pairs"], "method": "partitioned", REJECTED: {PARQUET: out_dir.name},
            "contaminated": sum(s for _, s in placed), "duplicates": grouped["duplicates"],
            "partitions": k, "chunks": len(chunks), "buckets": buckets, "placements": sum(p for p, _ in placed),
            "candidate_pairs": int(sum(found))}


def _bands(spec: NearDuplicates, width: int) -> int | None:
    """Multi-index hashing's band count for codes of `width` bytes; None where the bands would be too
    narrow to separate anything (then one task compares all pairs)."""
    bits = (spec.hash_bytes or width) * 8
    bands = max(int(spec.threshold) + 1, -(-bits // 64))
    return bands if bits // bands >= MIN_BAND_BITS else None


def _file_shapes(files: list[str], column: str) -> tuple[list[int], int]:
    """Rows of each file (from its footer) and the descriptor width (first row's: bytes or floats)."""
    rows, width = [], 0
    for f in files:
        meta = pq.read_metadata(f)
        rows.append(meta.num_rows)
        if not width and meta.num_rows and column in meta.schema.to_arrow_schema().names:
            head = pq.ParquetFile(f).read_row_group(0, columns=[column]).column(column).drop_null()
            width = descriptor_matrix(head.slice(0, 1)).shape[1] if len(head) else 0
    return rows, width


def _chunks(files: list[str], rows_per_file: list[int], target_rows: int) -> tuple[list[list[str]], list[int]]:
    """Consecutive files in chunks of about `target_rows` rows (a placing task's share), and their rows."""
    chunks: list[list[str]] = [[]]
    rows = [0]
    for f, n in zip(files, rows_per_file):
        if chunks[-1] and rows[-1] + n > target_rows:
            chunks.append([])
            rows.append(0)
        chunks[-1].append(f)
        rows[-1] += n
    return chunks, rows


def _read(files: list[str], columns: list[str]) -> pa.Table:
    """`columns` of `files`; one absent from every file (no `clip_score` at all) comes back null."""
    table = read_columns(files, columns)
    for c in columns:
        if c not in table.column_names:
            table = table.append_column(c, pa.nulls(table.num_rows, pa.float64()))
    return table


def _train(files: list[str], column: str, k: int, sample_rows: int, work: str) -> None:
    """k-means centroids from about `sample_rows` rows of randomly chosen files, saved for the placers."""
    rng = np.random.default_rng(0)
    picked, rows = [], 0
    for i in rng.permutation(len(files)):
        picked.append(files[i])
        rows += pq.read_metadata(files[i]).num_rows
        if rows >= 2 * sample_rows:
            break
    vectors = descriptor_matrix(_read(picked, [column]).column(column).drop_null())
    sample = vectors[rng.choice(len(vectors), size=min(len(vectors), sample_rows), replace=False)]
    np.save(Path(work) / "centroids.npy", train_centroids(sample, min(k, len(sample))))


def _place(spec: NearDuplicates, files: list[str], base: int, chunk: int, work: str, buckets: int) -> tuple[int, int]:
    """Write each row of `files` (global numbers from `base`) into the buckets of its partitions; rows
    `screen` rejects go to their own file instead. Returns (placements, screened rows)."""
    table = _read(files, [C.UID, C.SHARD, spec.column] + ([spec.priority] if spec.priority else []))
    table = table.append_column("row", pa.array(np.arange(base, base + table.num_rows, dtype=np.int64)))
    table = table.filter(pc.is_valid(table.column(spec.column)))
    if not table.num_rows:  # rows without a descriptor have no near duplicates
        return 0, 0
    data = descriptor_matrix(table.column(spec.column))
    screened = spec.screen(table.column(C.UID).to_pylist(), data) if spec.screen and table.num_rows else {}
    if screened:
        hit = pc.is_in(table.column(C.UID), pa.array(list(screened), pa.string()))
        rejected = table.filter(hit).select([C.UID, C.SHARD])
        write_parquet_atomic(rejected.append_column(C.REJECT_REASON, pa.array(
            [screened[u] for u in rejected.column(C.UID).to_pylist()], pa.string())), Path(work) / f"screened-{chunk}.parquet")
        keep = pc.invert(hit)
        table, data = table.filter(keep), data[np.asarray(keep)]
    priority = np.nan_to_num(np.asarray(table.column(spec.priority).to_numpy(zero_copy_only=False), dtype=np.float64),
                             nan=-np.inf) if spec.priority else np.zeros(table.num_rows)
    rows = pa.table({"row": table.column("row"), C.UID: table.column(C.UID), C.SHARD: table.column(C.SHARD),
                     "priority": pa.array(priority)})
    if spec.metric == "cosine":
        centroids = np.load(Path(work) / "centroids.npy")
        home, query_rows, query_parts = assign_partitions(data, centroids, spec.assign, spec.threshold)
        index = np.concatenate([np.arange(len(home)), query_rows])
        keys = np.concatenate([home, query_parts])
        extra = {"partition": keys, "home": np.arange(len(index)) < len(home)}
        bucket = keys % buckets
    else:
        hashed = data[:, :spec.hash_bytes or data.shape[1]]  # a colour layout after the hash takes no part in banding
        bands = band_keys(np.unpackbits(hashed, axis=1), _bands(spec, data.shape[1]) or 1)
        index = np.tile(np.arange(len(data)), len(bands))
        band = np.repeat(np.arange(len(bands), dtype=np.int64), len(data))
        keys = np.concatenate(bands) if bands else np.zeros(0, np.uint64)
        extra = {"band": band, "key": keys}
        mixed = (keys ^ (band.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))) * np.uint64(0xBF58476D1CE4E5B9)
        bucket = ((mixed >> np.uint64(33)) % np.uint64(buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")  # placements grouped by bucket: each bucket's file is a slice
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    descriptor = np.ascontiguousarray(data[index[order]])  # raw bytes: Parquet writes fixed-size binary fast
    placed = rows.take(pa.array(index[order]))
    for name, values in extra.items():
        placed = placed.append_column(name, pa.array(values[order]))
    placed = placed.append_column("descriptor", pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(descriptor[0].nbytes if len(descriptor) else 1), len(descriptor),
        [None, pa.py_buffer(descriptor.tobytes())]))
    for b in range(buckets):
        if bounds[b + 1] > bounds[b]:
            write_parquet_atomic(placed.slice(bounds[b], bounds[b + 1] - bounds[b]),
                                 Path(work) / f"bucket-{b}" / f"chunk-{chunk}.parquet", compression="none",
                                 row_group_size=1 << 20)
    return len(index), len(screened)


def _search(spec: NearDuplicates, work: str, bucket: int) -> int:
    """The near pairs inside each partition of one bucket, written as global row numbers with both
    rows' uid, shard and priority (what grouping needs). Returns the candidate pairs checked."""
    folder = Path(work) / f"bucket-{bucket}"
    files = sorted(str(p) for p in folder.glob("chunk-*.parquet"))
    found: list[np.ndarray] = []
    candidates = 0
    if files:
        table = pa.concat_tables([pq.read_table(f) for f in files])
        if spec.metric == "cosine":
            vectors = descriptor_matrix(table.column("descriptor")).view(np.float32)
            home = table.column("home").to_numpy(zero_copy_only=False)
            partition = table.column("partition").to_numpy()
            for members in _groups(partition):
                homes, queries = members[home[members]], members[~home[members]]
                pairs = search_partition(vectors[homes], vectors[queries], spec.threshold)
                candidates += len(homes) * (len(homes) - 1) // 2 + len(homes) * len(queries)
                if len(pairs):
                    found.append(np.concatenate([homes, queries])[pairs])
        else:
            codes = descriptor_matrix(table.column("descriptor"))
            band, key = table.column("band").to_numpy(), table.column("key").to_numpy()
            for members in _groups(band):
                pairs = members[bucket_pairs(key[members])]
                candidates += len(pairs)
                if len(pairs):
                    found.append(pairs[within(codes, pairs, spec.threshold, spec.hash_bytes, spec.colour_tolerance)])
        local = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
        rows = table.column("row").to_numpy()
        glob = np.sort(rows[local], axis=1)
        keep = np.unique(glob, axis=0, return_index=True)[1] if len(glob) else np.zeros(0, np.int64)
        local = np.take_along_axis(local, np.argsort(rows[local], axis=1), axis=1)[keep]
        ends = {end: table.select(["row", C.UID, C.SHARD, "priority"]).take(pa.array(local[:, i]))
                for i, end in enumerate(PAIR_COLUMNS)}
        out = pa.table({f"{end}_{name}": ends[end].column(name) for end in PAIR_COLUMNS
                        for name in ("row", C.UID, C.SHARD, "priority")})
    else:
        out = pa.table({f"{end}_row": pa.array([], pa.int64()) for end in PAIR_COLUMNS})
    write_parquet_atomic(out, Path(work) / f"pairs-{bucket}.parquet")
    return candidates


def _groups(labels: np.ndarray) -> list[np.ndarray]:
    """Positions sharing each label (small non-negative integers), groups of two or more."""
    return [m for m in members(labels, int(labels.max()) + 1 if len(labels) else 0) if len(m) > 1]


def _group(work: str, chunks: int, buckets: int, out_dir: str) -> dict[str, int]:
    """Greedy keeping over the rows that have a pair; every rejection (screened, duplicate) written per
    shard under `out_dir`. Returns the distinct pairs and the duplicates rejected."""
    tables = [pq.read_table(Path(work) / f"pairs-{b}.parquet") for b in range(buckets)]
    pairs = pa.concat_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables) else None
    rejected = [pq.read_table(p) for p in sorted(Path(work).glob("screened-*.parquet"))]
    duplicates = 0
    distinct = 0
    if pairs is not None:
        a, b = pairs.column("a_row").to_numpy(), pairs.column("b_row").to_numpy()
        first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)[1]
        pairs = pairs.take(pa.array(first))
        distinct = pairs.num_rows
        ends = [pairs.select([f"{e}_row", f"{e}_{C.UID}", f"{e}_{C.SHARD}", f"{e}_priority"])
                .rename_columns(["row", C.UID, C.SHARD, "priority"]) for e in PAIR_COLUMNS]
        nodes = pa.concat_tables(ends)
        row_numbers, first_seen, local = np.unique(nodes.column("row").to_numpy(), return_index=True, return_inverse=True)
        nodes = nodes.take(pa.array(first_seen))
        uids = nodes.column(C.UID).to_pylist()
        edges = local.reshape(2, -1).T
        duplicate_of = greedy_keep(len(row_numbers), edges, nodes.column("priority").to_numpy(), uids)
        lost = np.flatnonzero(duplicate_of >= 0)
        duplicates = len(lost)
        rejected.append(pa.table({C.UID: pa.array([uids[i] for i in lost], pa.string()),
                                  C.SHARD: nodes.column(C.SHARD).take(pa.array(lost)),
                                  C.REJECT_REASON: pa.array([f"duplicate_of:{uids[duplicate_of[i]]}" for i in lost],
                                                            pa.string())}))
    write_rejected(pa.concat_tables(rejected) if rejected else None, Path(out_dir))
    return {"pairs": distinct, "duplicates": duplicates}
