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

    from dataengine.engine.raydata import _task_cpu_cap
    from dataengine.engine.shard_tasks import IO_TASK_CPUS

    clip = ClipScoreConfig(model="unused", min_score=0.2)
    with mock.patch.object(ray_local, "cluster_resources", return_value={"CPU": 1.0}):
        scale = _actor_cpu_scale([Step(0, clip)])
        assert scale == 0.5 and _task_cpu_cap([Step(0, clip)], scale) == 0.5
    assert _task_cpu_cap([Step(0, CaptionRulesConfig())], 1.0) == float("inf")  # no actors: the stage's own ask
    with mock.patch.object(ray_local, "cluster_resources", return_value={"CPU": 1.0}):
        many = [Step(i, clip.model_copy(update={"name": f"c{i}"})) for i in range(4)]
        assert _task_cpu_cap(many, _actor_cpu_scale(many)) == 0.5  # four pools share the other half
        assert _task_cpu_cap(many, 1.0) == IO_TASK_CPUS  # unscaled pools would leave nothing: the floor


def test_steps_before_the_first_model_stage_run_in_the_read_task(ray_local, tmp_path):
    """Download/rules-like steps run where the shard is read; from the first model stage on, the
    stream's own operators (actor pools) take over. The fused task gives the unfused steps' rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataengine.core import columns as C
    from dataengine.core.schemas import sample_schema
    from dataengine.engine.parts import is_tally
    from dataengine.engine.raydata import _leading_task_steps
    from dataengine.engine.shard_tasks import read_and_run, run_task_step

    clip = ClipScoreConfig(model="unused", min_score=0.2)
    rules, decided = Step(0, CaptionRulesConfig(batch_size=3)), Step(2, CaptionRulesConfig(), decision={"x": 1})
    assert _leading_task_steps([rules, Step(1, clip), Step(2, CaptionRulesConfig())]) == [rules]
    assert _leading_task_steps([rules, decided]) == [rules, decided]  # applying a decision needs no model
    assert _leading_task_steps([Step(0, clip), rules]) == []
    captions = ["a red circle next to a blue square", "IMG_2041.JPG", "two dogs on a beach", "x", None,
                "a bowl of fresh fruit on a table", "click here to buy now"]
    shard = pa.table({C.UID: [f"u{i}" for i in range(7)], C.SHARD: ["s"] * 7, C.CAPTION: captions,
                      C.REJECT_STAGE: pa.nulls(7, pa.string()), C.REJECT_REASON: pa.nulls(7, pa.string())})
    pq.write_table(shard, tmp_path / "shard.parquet")
    files = pa.table({"files": [[str(tmp_path / "shard.parquet")]]})
    (tmp_path / "fused").mkdir(), (tmp_path / "alone").mkdir()
    fused = read_and_run(files, [rules], sample_schema(), str(tmp_path / "fused"), final=None)
    alone = run_task_step(shard, Step(0, CaptionRulesConfig(batch_size=7)), sample_schema(), str(tmp_path / "alone"))
    alive = [t.filter(pa.array(~is_tally(t))).column(C.UID).to_pylist() for t in (fused, alone)]
    assert alive[0] == alive[1] and 0 < len(alive[0]) < 7
    tallied = [sum(t.filter(pa.array(is_tally(t))).column(C.TALLY).to_pylist()) for t in (fused, alone)]
    assert tallied[0] == tallied[1] == 7 - len(alive[0])
    summary = read_and_run(files, [rules], sample_schema(), str(tmp_path / "written"), final=True)
    assert summary.column("rows").to_pylist() == [7]  # alive rows + the rejected ones' tally
    # three batches of 3 rows, one rejected part: a step's rejected rows leave the read task together
    assert len(list((tmp_path / "written" / "s").glob("rejected-*.parquet"))) == 1


def test_a_model_stage_preparing_in_tasks_has_its_own_task_pool_before_the_actors(ray_local, tmp_path, capsys):
    """Ray Data fuses a task into the next actor pool when their remote arguments match: the read task
    (its downloads, the model's CPU half) would run inside the model's actors. The plan keeps them apart."""
    from dataengine.engine.raydata import build_stream

    def physical_plan(steps):
        build_stream([["unused.parquet"]], steps, tmp_path, final=True).explain()
        return capsys.readouterr().out.split("Physical Plan (Optimized)")[1]

    rules = Step(0, CaptionRulesConfig())
    split = physical_plan([rules, Step(1, ClipScoreConfig(model="unused", prepare_in="tasks")),
                           Step(2, ClipScoreConfig(model="unused", name="again", prepare_in="tasks"))])
    assert "TaskPoolMapOperator[MapBatches(read_and_run)]" in split  # rules + the first stage's CPU half
    assert split.count("ActorPoolMapOperator[MapBatches(_StageActor)]") == 2
    assert "TaskPoolMapOperator[MapBatches(run_task_step)]" in split  # the second stage's CPU half
    whole = physical_plan([rules, Step(1, ClipScoreConfig(model="unused", prepare_in="actor"))])
    assert "TaskPoolMapOperator[MapBatches(read_and_run)]" in whole and "read_and_run)->" not in whole


def test_a_read_task_that_wrote_its_whole_shard_commits_it_and_a_retry_commits_nothing_twice(tmp_path):
    """No model stage in the segment: the read task commits its shard (no commit task, no round trip); a
    retried task finds the marker and returns the shard as committed without writing anything."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataengine.core import columns as C
    from dataengine.core.schemas import sample_schema
    from dataengine.engine.commit import ShardCommit, ShardCommits
    from dataengine.engine.segments import plan_segments
    from dataengine.engine.shard_tasks import SHARD_INDEX, read_and_run

    segment = plan_segments([CaptionRulesConfig()])[0]
    captions = ["a red circle next to a blue square", "IMG_2041.JPG", "two dogs on a beach", "x",
                "a bowl of fresh fruit on a table", "click here to buy now", "a small green star"]
    (tmp_path / "_shards").mkdir()
    pq.write_table(pa.table({C.UID: [f"u{i}" for i in range(7)], C.SHARD: ["s"] * 7, C.CAPTION: captions,
                             C.URL: [f"http://h/{i}.jpg" for i in range(7)]}), tmp_path / "_shards" / "s.parquet")
    committing = ShardCommits(str(tmp_path), segment, ["caption_rules_filter"],
                              [ShardCommit("s", ["_shards/s.parquet"], None, 7, 7)])
    batch = pa.table({"files": [[str(tmp_path / "_shards" / "s.parquet")]], SHARD_INDEX: [0]})
    rules = Step(0, CaptionRulesConfig(batch_size=3))
    first = read_and_run(batch, [rules], sample_schema(), str(segment.parts_dir(tmp_path)), segment.final, committing)
    assert first.column("committed").to_pylist() == [True] and first.column("rows").to_pylist() == [7]
    marker = segment.read_marker(tmp_path, "s")
    assert marker["rows"] == 7 and marker["kept"] + marker["rejected"] == 7 and 0 < marker["kept"] < 7
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "dataset").glob("*")} | \
        {p: p.stat().st_mtime_ns for p in (tmp_path / "rejected").glob("*")}
    assert len(written) == 2 and not (segment.parts_dir(tmp_path) / "s").exists()
    again = read_and_run(batch, [rules], sample_schema(), str(segment.parts_dir(tmp_path)), segment.final, committing)
    assert again.column("committed").to_pylist() == [True] and again.column("rows").to_pylist() == [7]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "dataset").glob("*")} | \
        {p: p.stat().st_mtime_ns for p in (tmp_path / "rejected").glob("*")} == written


def test_a_model_pool_sizes_itself_between_min_actors_and_concurrency_with_prepared_batches_queued():
    from dataengine.engine.raydata import _actor_pool

    config = ClipScoreConfig(model="unused", concurrency=4, min_actors=2, prepared_batches=6)
    fed = _actor_pool(Step(0, config, phase="infer"))
    assert (fed.min_size, fed.max_size, fed.max_tasks_in_flight_per_actor) == (2, 4, 6)
    whole = _actor_pool(Step(0, config.model_copy(update={"min_actors": None})))  # both halves in the actor
    assert (whole.min_size, whole.max_size) == (1, 4) and whole.max_tasks_in_flight_per_actor != 6
