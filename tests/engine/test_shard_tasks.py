"""A segment that needs no model: one plain Ray task per shard reads its rows (from a pointer into the
input), runs the steps, writes its parts and commits it; the driver gets one summary row per shard."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.engine.commit import ShardCommit, ShardCommits
from dataengine.engine.raydata import shard_tasks
from dataengine.engine.segments import plan_segments
from dataengine.io.inputs import InputSpec
from dataengine.io.shard_plan import plan_shards
from dataengine.ops.base import Step
from dataengine.ops.caption_rules import CaptionRulesConfig

CAPTIONS = ["a red circle next to a blue square", "IMG_2041.JPG", "two dogs on a beach", "x",
            "a bowl of fresh fruit on a table", "click here to buy now", "a small green star"]


def _plan(tmp_path, n):
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(n)], "caption": captions}),
                   tmp_path / "in.parquet", row_group_size=5)
    return plan_shards(InputSpec(path=str(tmp_path / "in.parquet"), shard_rows=4), tmp_path / "run"), captions


def _segment(run, shards):
    """The rules stage's only segment, committing in its tasks, and each shard's input files."""
    segment = plan_segments([CaptionRulesConfig()])[0]
    committing = ShardCommits(str(run), segment, ["caption_rules_filter"],
                              [ShardCommit(s.id, [str(s.path.relative_to(run))], None, s.rows, s.rows) for s in shards])
    return segment, committing, [[str(s.path)] for s in shards]


def test_each_shard_is_one_task_that_commits_it_and_every_row_lands_once(ray_local, tmp_path):
    shards, captions = _plan(tmp_path, 23)
    run = tmp_path / "run"
    segment, committing, inputs = _segment(run, shards)
    steps = [Step(0, CaptionRulesConfig(batch_size=3, concurrency=1))]
    summaries = pa.concat_tables(list(shard_tasks(inputs, steps, segment.parts_dir(run), True, committing)))
    assert sorted(summaries.column("shard").to_pylist()) == [s.id for s in shards]
    assert summaries.column("committed").to_pylist() == [True] * len(shards)
    assert sum(summaries.column("rows").to_pylist()) == 23
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((run / "dataset").glob("*.parquet"))])
    rejected = pa.concat_tables([pq.read_table(p) for p in sorted((run / "rejected").glob("*.parquet"))])
    uids = kept.column(C.UID).to_pylist() + rejected.column(C.UID).to_pylist()
    assert sorted(uids) == [f"0000-{i:010d}" for i in range(23)]
    by_uid = dict(zip(kept.column(C.UID).to_pylist(), kept.column(C.CAPTION).to_pylist()))
    assert all(by_uid[u] == captions[int(u[5:])] for u in by_uid)
    assert 0 < kept.num_rows < 23 and set(rejected.column(C.REJECT_STAGE).to_pylist()) == {"caption_rules_filter"}
    assert len(list((run / "rejected").glob("*.parquet"))) <= len(shards)  # one rejected part per shard at most


def test_a_stream_closed_early_cancels_its_tasks_and_a_rerun_finishes_the_rest(ray_local, tmp_path):
    shards, _ = _plan(tmp_path, 40)
    run = tmp_path / "run"
    segment, committing, inputs = _segment(run, shards)
    steps = [Step(0, CaptionRulesConfig(batch_size=3, concurrency=2))]
    stream = shard_tasks(inputs, steps, segment.parts_dir(run), True, committing)
    first = next(stream)
    stream.close()
    assert first.column("committed").to_pylist() == [True]
    committed = [committing.marker(s) is not None for s in committing.shards]
    time.sleep(1.0)  # the tasks under way were cancelled and waited for: none commits after close() returns
    assert [committing.marker(s) is not None for s in committing.shards] == committed
    again = pa.concat_tables(list(shard_tasks(inputs, steps, segment.parts_dir(run), True, committing)))
    assert sorted(again.column("shard").to_pylist()) == [s.id for s in shards]  # committed ones say so again
    files = list((run / "dataset").glob("*.parquet")) + list((run / "rejected").glob("*.parquet"))
    uids = [u for f in files for u in pq.read_table(f, columns=[C.UID]).column(C.UID).to_pylist()]
    assert sorted(uids) == [f"0000-{i:010d}" for i in range(40)]
