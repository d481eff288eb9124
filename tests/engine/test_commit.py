"""A shard's commit: every uid that entered the segment exactly once, its kept parts moved into
`dataset/` and its rejected parts into `rejected/` as written, and the marker as the commit point."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.core import columns as C
from dataengine.core.schemas import rejected_schema
from dataengine.engine.commit import AccountingError, clear_uncommitted, commit_shard, finish_commit
from dataengine.engine.parts import shed_rejected, write_alive
from dataengine.engine.segments import Segment

FINAL = Segment(0, (0,), None, final=True)
STAGES = ["download"]


def _shard(run, n=6):
    rows = pa.table({C.UID: [f"0-{i}" for i in range(n)], C.SHARD: ["000000"] * n, C.CAPTION: list("abcdef")[:n],
                     C.REJECT_STAGE: [None, "download"] * (n // 2), C.REJECT_REASON: [None, "http_404"] * (n // 2),
                     f"{C.STAGE_SECONDS_PREFIX}0": [1.0] * n})
    (run / "_shards").mkdir(parents=True)
    pq.write_table(rows.select([C.UID, C.SHARD, C.CAPTION]), run / "_shards" / "000000.parquet")
    return rows


def _write(run, rows, final=True):
    parts = str(FINAL.parts_dir(run))
    write_alive(shed_rejected(rows, parts), parts, final)


def test_a_complete_shard_commits_without_rewriting_its_rows(tmp_path):
    rows = _shard(tmp_path)
    _write(tmp_path, rows)
    kept_parts = {p.name: p.read_bytes() for p in FINAL.parts_dir(tmp_path).rglob("kept-*.parquet")}
    rejected_parts = {p.name: p.read_bytes() for p in FINAL.parts_dir(tmp_path).rglob("rejected-*.parquet")}
    marker = commit_shard(str(tmp_path), FINAL, "000000", ["_shards/000000.parquet"], None, 6, STAGES)
    assert marker is not None and (marker["rows"], marker["kept"], marker["rejected"]) == (6, 3, 3)
    assert marker["rejected_by_stage"] == {"download": {"http_404": 3}} and marker["seconds"] == {"download": 6.0}
    moved = {p.name.split("-")[-1]: p.read_bytes() for p in (tmp_path / "dataset").glob("part-000000-*.parquet")}
    assert sorted(moved.values()) == sorted(kept_parts.values())  # the very bytes the workers wrote
    assert [(tmp_path / f).read_bytes() for f in marker["rejected_files"]] == list(rejected_parts.values())
    rejected = pq.read_table(tmp_path / marker["rejected_files"][0])
    assert rejected.column(C.UID).to_pylist() == ["0-1", "0-3", "0-5"] and "_shard" not in rejected.column_names
    assert rejected.schema.remove_metadata() == rejected_schema().remove_metadata()
    assert json.loads(FINAL.marker(tmp_path, "000000").read_text()) == marker
    assert not FINAL.parts_dir(tmp_path).joinpath("000000").exists()


def test_rejected_parts_of_several_batches_are_gathered_into_one_file(tmp_path):
    rows = _shard(tmp_path)
    _write(tmp_path, rows.slice(0, 4))  # as a model stage's actor sheds rows: a part per batch
    _write(tmp_path, rows.slice(4))
    assert len(list(FINAL.parts_dir(tmp_path).rglob("rejected-*.parquet"))) == 2
    marker = commit_shard(str(tmp_path), FINAL, "000000", ["_shards/000000.parquet"], None, 6, STAGES)
    assert marker["rejected_files"] == ["rejected/part-000000-s0.parquet"] and marker["rejected_moves"] == []
    assert marker["rejected"] == 3 and marker["seconds"] == {"download": 6.0}
    rejected = pq.read_table(tmp_path / marker["rejected_files"][0])
    assert rejected.column(C.UID).to_pylist() == ["0-1", "0-3", "0-5"]
    assert rejected.schema.remove_metadata() == rejected_schema().remove_metadata()


def test_a_half_done_shard_is_not_committed_and_a_foreign_uid_is_an_error(tmp_path):
    rows = _shard(tmp_path)
    _write(tmp_path, rows.slice(1))  # row 0-0 never came back
    assert commit_shard(str(tmp_path), FINAL, "000000", ["_shards/000000.parquet"], None, 6, STAGES) is None
    assert not FINAL.marker(tmp_path, "000000").exists() and not (tmp_path / "dataset").exists()
    stranger = pa.table({C.UID: ["9-9"], C.SHARD: ["000000"], C.CAPTION: ["z"]})
    _write(tmp_path, pa.concat_tables([rows.slice(0, 1).select(stranger.column_names), stranger]))
    with pytest.raises(AccountingError, match=r"1 unexpected uids .*9-9"):
        commit_shard(str(tmp_path), FINAL, "000000", ["_shards/000000.parquet"], None, 6, STAGES)


def test_a_uid_written_twice_by_a_retry_is_kept_once(tmp_path):
    rows = _shard(tmp_path)
    _write(tmp_path, rows)
    _write(tmp_path, rows.slice(0, 3))  # a retry that batched differently: rows 0-0..0-2 again, other part names
    marker = commit_shard(str(tmp_path), FINAL, "000000", ["_shards/000000.parquet"], None, 6, STAGES)
    assert marker is not None and (marker["kept"], marker["rejected"]) == (3, 3)
    assert marker["seconds"] == {"download": 6.0}  # a part's footer counts only the rows left in it
    uids = [u for f in marker["dataset_files"] + marker["rejected_files"]
            for u in pq.read_table(tmp_path / f, columns=[C.UID]).column(C.UID).to_pylist()]
    assert sorted(uids) == [f"0-{i}" for i in range(6)]


def test_a_commit_killed_after_its_marker_is_finished_and_one_killed_before_is_cleared(tmp_path):
    rows = _shard(tmp_path)
    _write(tmp_path, rows)
    marker = commit_shard(str(tmp_path), FINAL, "000000", ["_shards/000000.parquet"], None, 6, STAGES)
    # as if killed right after the marker: the kept parts still in _parts, not yet in dataset/
    for src, dst in marker["moves"]:
        (tmp_path / src).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp_path / dst, tmp_path / src)
    finish_commit(tmp_path, FINAL, "000000", marker)
    assert all((tmp_path / dst).exists() for _, dst in marker["moves"])
    # a commit killed before its marker leaves at most the gathered rejected rows: they belong to no commit
    FINAL.marker(tmp_path, "000000").unlink()
    clear_uncommitted(tmp_path, FINAL, "000000")
    assert not list((tmp_path / "dataset").glob("part-000000-*")) and not list((tmp_path / "rejected").glob("*"))
