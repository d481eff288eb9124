"""The engine's Ray adapter: actor reservations scaled so a small machine does not deadlock."""

from __future__ import annotations

from dataengine.engine.raydata import _actor_cpu_scale
from dataengine.ops.base import Step
from dataengine.ops.caption_rules import CaptionRulesConfig
from dataengine.ops.clip_score import ClipScoreConfig


def test_actor_reservations_leave_a_cpu_for_the_tasks(ray_local):
    clip = ClipScoreConfig(model="unused", min_score=0.2)
    rules = CaptionRulesConfig()
    cpus = ray_local.cluster_resources()["CPU"]
    assert _actor_cpu_scale([Step(0, rules)]) == 1.0  # no actor pools: nothing to scale
    two_pools = [Step(0, clip), Step(1, clip.model_copy(update={"name": "clip2"}))]
    assert _actor_cpu_scale(two_pools) == (cpus - 1) / 2  # each pool asks 1 CPU; together they leave one free
    assert _actor_cpu_scale([Step(0, clip.model_copy(update={"num_gpus": 1}))]) == 1.0  # GPU pools do not count
