"""Near-duplicate decisions across tasks give the groups one process's exact search gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dataengine.core import columns as C
from dataengine.engine import near_duplicates
from dataengine.ops.dedup import Dedup, DedupConfig


def _write(tmp_path, column, descriptors, scores, per_file=500):
    """Part files of `per_file` rows, a shard each, the way a segment's kept parts look."""
    files = []
    for k in range(0, len(descriptors), per_file):
        rows = range(k, min(k + per_file, len(descriptors)))
        path = tmp_path / "parts" / f"part-{k}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({C.UID: [f"u{i:05d}" for i in rows], C.SHARD: [f"s{k // per_file:03d}"] * len(rows),
                                 column: descriptors[k:k + per_file],
                                 C.CLIP_SCORE: pa.array(scores[k:k + per_file], pa.float32())}), path)
        files.append(str(path))
    return files


def _saved(out_dir):
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("*.parquet"))])
    return dict(zip(table.column(C.UID).to_pylist(), table.column(C.REJECT_REASON).to_pylist()))


def _one_process(files, config):
    table = pa.concat_tables([pq.read_table(f) for f in files]).drop_columns([C.SHARD])
    return Dedup.decide(config.model_copy(update={"exact_max_rows": 10**9}), table)["rejected"]


def _planted_vectors(n=3000, d=32, copies=90, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    src = rng.choice(n, copies, replace=False)
    x[rng.choice(np.setdiff1d(np.arange(n), src), copies, replace=False)] = x[src] + 0.03 * rng.normal(size=(copies, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def small_tasks(monkeypatch):
    """Several chunks and buckets on test-sized data."""
    monkeypatch.setattr(near_duplicates, "FILES_PER_TASK", 2)
    monkeypatch.setattr(near_duplicates, "PLACE_BYTES", 500_000)
    monkeypatch.setattr(near_duplicates, "BUCKET_BYTES", 200_000)


def test_vector_groups_across_tasks_equal_the_exact_search(ray_local, tmp_path, small_tasks):
    vectors = _planted_vectors()
    scores = np.random.default_rng(1).random(len(vectors)).astype(np.float32)
    scores[::7] = np.nan  # rows without a score rank last
    files = _write(tmp_path, C.SSCD_EMBEDDING, pa.array(list(vectors), pa.list_(pa.float32())), scores)
    config = DedupConfig(descriptor="sscd", threshold=0.9, exact_max_rows=100, partitions=12)
    decision = near_duplicates.decide(Dedup.near_duplicates(config), files, tmp_path / "decision")
    assert decision["method"] == "partitioned" and decision["rows"] == len(vectors)
    assert decision["chunks"] > 1 and decision["buckets"] > 1 and decision["placements"] > len(vectors)
    expected = _one_process(files, config)
    assert len(expected) == 90 and _saved(tmp_path / "decision") == expected
    assert decision["duplicates"] == 90 and decision["rejected"] == {"parquet": "decision"}
    assert not (tmp_path / "decision.work").exists()  # the placements are removed once decided


def test_hash_groups_across_tasks_equal_all_pairs(ray_local, tmp_path, small_tasks):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(2000, 32), dtype=np.uint8)
    for i in range(0, 300, 3):  # chains and families: codes 1-12 bits from code i
        for j, bits in ((i + 1, 4), (i + 2, 12)):
            codes[j] = codes[i]
            flip = rng.choice(256, bits, replace=False)
            np.bitwise_xor.at(codes[j], flip // 8, (1 << (flip % 8)).astype(np.uint8))
    files = _write(tmp_path, C.PHASH, pa.array([bytes(c) for c in codes], pa.binary()),
                   rng.random(len(codes)).astype(np.float32))
    config = DedupConfig(descriptor="phash", max_hamming=10, exact_max_rows=100)
    decision = near_duplicates.decide(Dedup.near_duplicates(config), files, tmp_path / "decision")
    assert decision["method"] == "partitioned" and decision["chunks"] > 1 and decision["buckets"] > 1
    expected = _one_process(files, config)
    assert len(expected) == 100 and _saved(tmp_path / "decision") == expected


def test_hash_groups_with_colour_layouts_across_tasks_equal_one_process(ray_local, tmp_path, small_tasks):
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(1200, 32), dtype=np.uint8)
    colours = rng.integers(0, 190, size=(1200, 192), dtype=np.uint8)
    for i in range(0, 300, 2):  # a copy 3 bits away; every third one recoloured
        codes[i + 1] = codes[i]
        codes[i + 1, 0] ^= 0b111
        colours[i + 1] = colours[i] + (rng.integers(0, 3, 192) if i % 3 else np.full(192, 60)).astype(np.uint8)
    files = _write(tmp_path, C.PHASH, pa.array([bytes(c) + bytes(k) for c, k in zip(codes, colours)], pa.binary()),
                   rng.random(len(codes)).astype(np.float32))
    config = DedupConfig(descriptor="phash", max_hamming=10, colour_tolerance=8, exact_max_rows=100)
    decision = near_duplicates.decide(Dedup.near_duplicates(config), files, tmp_path / "decision")
    assert decision["method"] == "partitioned" and decision["chunks"] > 1 and decision["buckets"] > 1
    expected = _one_process(files, config)
    assert len(expected) == 100 and _saved(tmp_path / "decision") == expected  # 150 copies, 50 recoloured
    assert len(_one_process(files, config.model_copy(update={"colour_tolerance": None}))) == 150


def test_at_or_below_exact_max_rows_the_one_task_decides(ray_local, tmp_path):
    files = _write(tmp_path, C.SSCD_EMBEDDING, pa.array(list(_planted_vectors(n=300, copies=5)), pa.list_(pa.float32())),
                   np.zeros(300, np.float32))
    assert near_duplicates.decide(Dedup.near_duplicates(DedupConfig(exact_max_rows=300)), files, tmp_path / "d") is None


def test_crops_above_exact_max_rows_is_a_clear_error(ray_local, tmp_path):
    """Crop verification runs in one task: past its rows the decision stops with the fields to change, not
    with pairs silently missing."""
    files = _write(tmp_path, C.SSCD_EMBEDDING, pa.array(list(_planted_vectors(n=300, copies=5)), pa.list_(pa.float32())),
                   np.zeros(300, np.float32))
    spec = Dedup.near_duplicates(DedupConfig(exact_max_rows=299, crops=True))
    with pytest.raises(ValueError, match=r"crops is decided in one task, up to exact_max_rows rows \(299\), and this "
                                         r"stage has 300: raise exact_max_rows"):
        near_duplicates.decide(spec, files, tmp_path / "d")
    assert near_duplicates.decide(Dedup.near_duplicates(DedupConfig(exact_max_rows=300, crops=True)), files,
                                  tmp_path / "d") is None


def test_rows_without_a_descriptor_take_no_part(ray_local, tmp_path, small_tasks):
    vectors = _planted_vectors(n=600, copies=10)
    descriptors = pa.array(list(vectors) + [None] * 500, pa.list_(pa.float32()))  # 2nd file half, 3rd file all null
    files = _write(tmp_path, C.SSCD_EMBEDDING, descriptors, np.zeros(1100, np.float32))
    config = DedupConfig(descriptor="sscd", threshold=0.9, exact_max_rows=100, partitions=4)
    decision = near_duplicates.decide(Dedup.near_duplicates(config), files, tmp_path / "decision")
    assert decision["rows"] == 1100 and decision["placements"] <= 600 * config.assign
    table = pa.concat_tables([pq.read_table(f) for f in files[:2]]).drop_columns([C.SHARD])
    table = table.filter(pc.is_valid(table.column(C.SSCD_EMBEDDING)))
    expected = Dedup.decide(config.model_copy(update={"exact_max_rows": 10**9}), table)["rejected"]
    assert len(expected) == 10 and _saved(tmp_path / "decision") == expected
