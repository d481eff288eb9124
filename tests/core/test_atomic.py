"""Atomic writes: a reader sees the old file or the new one, and a killed writer's temporaries are found."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.core.atomic import (
    ROW_GROUP_BYTES,
    ROW_GROUP_MAX_ROWS,
    ROW_GROUP_ROWS,
    TMP_SUFFIX,
    remove_stale_temporaries,
    write_parquet_atomic,
    write_text_atomic,
)


def test_text_is_replaced_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "state.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second ünïcode")
    assert path.read_text(encoding="utf-8") == "second ünïcode"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "part.parquet"
    write_parquet_atomic(pa.table({"a": [1, 2]}), path)
    unwritable = pa.table({"a": pa.array([{}], pa.struct([]))})  # Parquet cannot store a struct without fields
    with pytest.raises(pa.ArrowException):
        write_parquet_atomic(unwritable, path)
    assert pq.read_table(path).column("a").to_pylist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["part.parquet"]  # no temporary left behind


def test_rows_with_images_get_small_row_groups_so_a_reader_can_take_a_few_rows(tmp_path):
    path = tmp_path / "rows.parquet"
    image = b"\xff" * 64_000  # a small JPEG's worth: 256 rows are ~16 MB, over the byte target
    write_parquet_atomic(pa.table({"i": list(range(ROW_GROUP_ROWS * 2 + 1)),
                                   "image": [image] * (ROW_GROUP_ROWS * 2 + 1)}), path)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3 and meta.num_rows == ROW_GROUP_ROWS * 2 + 1


def test_caption_rows_get_row_groups_of_about_the_byte_target(tmp_path):
    path = tmp_path / "captions.parquet"
    n = 300_000
    table = pa.table({"caption": pa.array([f"a caption of about forty bytes, row {i:08d}" for i in range(n)])})
    write_parquet_atomic(table, path)
    meta = pq.ParquetFile(path).metadata
    per_row = table.nbytes / n
    expected = min(int(ROW_GROUP_BYTES // per_row), ROW_GROUP_MAX_ROWS)
    assert ROW_GROUP_ROWS < expected <= ROW_GROUP_MAX_ROWS
    assert meta.row_group(0).num_rows == expected and meta.num_rows == n
    assert meta.num_row_groups == -(-n // expected)


def test_stale_temporaries_are_removed_and_counted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f".x.parquet.0123456789ab{TMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / f".y.json.ba9876543210{TMP_SUFFIX}").write_text("half")
    (tmp_path / "kept.parquet").write_bytes(b"whole")
    assert remove_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["kept.parquet"]
    assert remove_stale_temporaries(tmp_path / "missing") == 0
