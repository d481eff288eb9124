"""The engine's Ray adapter: parts written per shard under a name a retry reproduces, a summary per part
for the driver, and actor reservations scaled so a small machine does not deadlock."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.engine.raydata import (
    SUMMARY_PART,
    SUMMARY_REJECTED,
    SUMMARY_ROWS,
    SUMMARY_SHARD,
    _actor_cpu_scale,
    _write_parts,
)
from dataengine.ops.base import Step
from dataengine.ops.caption_rules import CaptionRulesConfig
from dataengine.ops.clip_score import ClipScoreConfig


def _batch() -> pa.Table:
    return pa.table({C.UID: ["0-3", "0-1", "1-0", "0-2"], C.SHARD: ["000000", "000000", "000001", "000000"],
                     C.REJECT_STAGE: [None, "download", None, "clip"],
                     C.REJECT_REASON: [None, "http_404", None, "low_clip_score"]})


def test_a_batch_becomes_one_part_per_shard_and_a_summary_row_each(tmp_path):
    summary = _write_parts(_batch(), str(tmp_path)).to_pylist()
    by_shard = {row[SUMMARY_SHARD]: row for row in summary}
    assert set(by_shard) == {"000000", "000001"}
    first = by_shard["000000"]
    assert first[SUMMARY_ROWS] == 3 and json.loads(first[SUMMARY_REJECTED]) == {"download": 1, "clip": 1}
    assert by_shard["000001"][SUMMARY_ROWS] == 1 and json.loads(by_shard["000001"][SUMMARY_REJECTED]) == {}
    part = pq.read_table(tmp_path / "000000" / f"{first[SUMMARY_PART]}.parquet")
    assert part.column(C.UID).to_pylist() == ["0-1", "0-2", "0-3"]  # sorted: the name is a hash of the uids


def test_a_retried_batch_overwrites_its_own_part(tmp_path):
    _write_parts(_batch(), str(tmp_path))
    _write_parts(_batch().take([3, 2, 1, 0]), str(tmp_path))  # the same rows in another order: a retry
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*.parquet")) == ["000000", "000001"]


def test_actor_reservations_leave_a_cpu_for_the_tasks(ray_local):
    clip = ClipScoreConfig(model="unused", min_score=0.2)
    rules = CaptionRulesConfig()
    cpus = ray_local.cluster_resources()["CPU"]
    assert _actor_cpu_scale([Step(0, rules)]) == 1.0  # no actor pools: nothing to scale
    two_pools = [Step(0, clip), Step(1, clip.model_copy(update={"name": "clip2"}))]
    assert _actor_cpu_scale(two_pools) == (cpus - 1) / 2  # each pool asks 1 CPU; together they leave one free
    assert _actor_cpu_scale([Step(0, clip.model_copy(update={"num_gpus": 1}))]) == 1.0  # GPU pools do not count
