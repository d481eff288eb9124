"""What workers write: rejected rows leave the stream at once (a tally row per shard and stage stands
in for them), alive rows are written per shard at the end, under names a retry reproduces."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.schemas import sample_schema
from dataengine.engine.parts import (
    COUNTERS_METADATA,
    SUMMARY_PART,
    SUMMARY_REJECTED,
    SUMMARY_ROWS,
    SUMMARY_SHARD,
    is_tally,
    part_counters,
    shed_rejected,
    write_alive,
)


def _batch() -> pa.Table:
    return pa.table({C.UID: ["0-3", "0-1", "1-0", "0-2", "1-1"],
                     C.SHARD: ["000000", "000000", "000001", "000000", "000001"],
                     C.CAPTION: ["a", "b", "c", "d", "e"],
                     C.REJECT_STAGE: [None, "download", None, "clip", "download"],
                     C.REJECT_REASON: [None, "http_404", None, "low_clip_score", "timeout"],
                     f"{C.STAGE_SECONDS_PREFIX}0": [0.5, 0.25, 0.5, 0.5, 0.25]})


def test_rejected_rows_leave_the_stream_and_a_tally_stands_in(tmp_path):
    out = shed_rejected(_batch(), str(tmp_path))
    tally = is_tally(out)
    assert out.filter(pa.array(~tally)).column(C.UID).to_pylist() == ["0-3", "1-0"]  # only alive rows travel on
    tallies = {(r[C.SHARD], r[C.REJECT_STAGE]): r for r in out.filter(pa.array(tally)).to_pylist()}
    assert {k: r[C.TALLY] for k, r in tallies.items()} == {("000000", "download"): 1, ("000000", "clip"): 1,
                                                          ("000001", "download"): 1}
    assert tallies[("000000", "clip")][f"{C.STAGE_SECONDS_PREFIX}0"] == 0.5  # the shed rows' busy time travels on
    shed = {p.parent.name: pq.read_table(p) for p in tmp_path.rglob("rejected-*.parquet")}
    assert sorted(shed["000000"].column(C.UID).to_pylist()) == ["0-1", "0-2"]
    assert shed["000001"].column(C.REJECT_REASON).to_pylist() == ["timeout"]
    again = shed_rejected(out, str(tmp_path))  # a later stage: earlier tallies pass through, nothing is rewritten
    assert again.num_rows == out.num_rows and len(list(tmp_path.rglob("*.parquet"))) == 2


def test_alive_rows_are_written_per_shard_with_a_summary_counting_the_tallies(tmp_path):
    summary = write_alive(shed_rejected(_batch(), str(tmp_path)), str(tmp_path), final=True).to_pylist()
    by_shard = {row[SUMMARY_SHARD]: row for row in summary}
    assert by_shard["000000"][SUMMARY_ROWS] == 3 and json.loads(by_shard["000000"][SUMMARY_REJECTED]) == \
        {"download": 1, "clip": 1}
    assert by_shard["000001"][SUMMARY_ROWS] == 2
    kept = tmp_path / "000000" / by_shard["000000"][SUMMARY_PART]
    table = pq.read_table(kept)
    assert table.column(C.UID).to_pylist() == ["0-3"]
    assert pq.read_schema(kept).remove_metadata() == sample_schema().remove_metadata()  # final: the dataset's schema
    counters = json.loads(pq.read_schema(kept).metadata[COUNTERS_METADATA])
    assert counters == {"seconds": {"0": 0.5}, "batches": {}} == part_counters(kept)


def test_a_retried_batch_overwrites_its_own_parts(tmp_path):
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]):  # the same rows in another order: a retry
        write_alive(shed_rejected(_batch().take(order), str(tmp_path)), str(tmp_path), final=False)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    assert len(names) == 4  # per shard one rows- part and one rejected- part, not twice
    assert sum(n.split("/")[1].startswith("rows-") for n in names) == 2
