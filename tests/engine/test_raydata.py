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


def test_tasks_fit_beside_the_actors_on_a_one_cpu_cluster(ray_local):
    """With one CPU, an actor holds half of it: a task asking for a whole CPU would wait forever."""
    from unittest import mock

    from dataengine.engine.raydata import IO_TASK_CPUS, _task_cpu_cap

    clip = ClipScoreConfig(model="unused", min_score=0.2)
    with mock.patch.object(ray_local, "cluster_resources", return_value={"CPU": 1.0}):
        scale = _actor_cpu_scale([Step(0, clip)])
        assert scale == 0.5 and _task_cpu_cap([Step(0, clip)], scale) == 0.5
    assert _task_cpu_cap([Step(0, CaptionRulesConfig())], 1.0) == float("inf")  # no actors: the stage's own ask
    with mock.patch.object(ray_local, "cluster_resources", return_value={"CPU": 1.0}):
        many = [Step(i, clip.model_copy(update={"name": f"c{i}"})) for i in range(4)]
        assert _task_cpu_cap(many, _actor_cpu_scale(many)) == 0.5  # four pools share the other half
        assert _task_cpu_cap(many, 1.0) == IO_TASK_CPUS  # unscaled pools would leave nothing: the floor
