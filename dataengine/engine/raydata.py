"""The engine's Ray adapter: the Ray session, and a pipeline's stages as one Ray Data stream.

Every `ray.init` and every stage's `map_batches` and compute-strategy knob lives here, so a Ray upgrade
that renames one (as `concurrency` became `compute`) touches this file and `core/raytools.py` (the Ray
helpers the layers below the engine use) only.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data

import dataengine
from dataengine.core import raytools
from dataengine.core.raytools import QUIET_WORKERS
from dataengine.core.schemas import sample_schema
from dataengine.engine.commit import ShardCommits
from dataengine.engine.parts import shed_rejected, write_alive
from dataengine.engine.shard_tasks import (
    IO_TASK_CPUS,
    SHARD_FILES,
    SHARD_INDEX,
    read_and_run,
    run_task_step,
    shard_task,
)
from dataengine.engine.spec import ResourcesSpec
from dataengine.ops import get_op
from dataengine.ops.base import INFER, PREPARE, RayLLMStage, Step, run_step, split_steps

log = logging.getLogger(__name__)



#: the embedded Ray's workers do all of a local run's work, so they run at the priority of the command
#: that started them (Ray's default, nice 15, is for clusters whose daemons must win over the work: on 2
#: cores any other process, the driver included, preempted the workers ~30:1)
EMBEDDED_SYSTEM_CONFIG = {"worker_niceness": 0}


@contextlib.contextmanager
def ray_session(address: str | None, resources: ResourcesSpec) -> Iterator[None]:
    """Use the Ray already initialised in this process, connect to `address`, or start an embedded one."""
    if ray.is_initialized():
        yield
        return
    common = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        ray.init(address=address, **common)  # a Ray job (`dataengine submit`): its runtime env ships the code
    elif address:
        # workers on other machines import dataengine from this checkout
        package_dir = str(Path(dataengine.__file__).resolve().parent)
        ray.init(address=address, runtime_env={"py_modules": [package_dir], **QUIET_WORKERS}, **common)
    else:
        ray.init(
            address="local", num_cpus=resources.num_cpus or os.cpu_count(), num_gpus=resources.num_gpus,
            object_store_memory=resources.object_store_memory, include_dashboard=False, runtime_env=QUIET_WORKERS,
            _system_config=EMBEDDED_SYSTEM_CONFIG, **common,
        )
    try:
        yield
    finally:
        ray.shutdown()


class _StageActor:
    """Actor body for stateful (model) ops: the op, and its model, are built once per actor."""

    def __init__(self, step: Step, schema: pa.Schema, parts_dir: str) -> None:
        self.step, self.schema, self.parts_dir = step, schema, parts_dir
        self.op = get_op(step.config.op)(step.config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        _maybe_crash()
        return shed_rejected(run_step(self.step, self.op, batch, self.schema, count_batch=True), self.parts_dir)


#: Ray Data fuses a task into the actor pool after it when their remote arguments match (on a CPU-only
#: cluster they do: one CPU each), and the read task (its downloads, the CPU half of a model stage) would
#: then run inside the model's actors, as many at once as there are actors, instead of in tasks that scale
#: with the cluster's CPUs. `max_calls: 0` (worker processes reused without limit: Ray's default for CPU
#: tasks) changes nothing else and makes the arguments differ (tests/engine/test_raydata.py checks the plan)
UNFUSED_TASK = {"max_calls": 0}

CRASH_ENV = "DATAENGINE_FAULT_ACTOR_CRASH"  # fault injection for tests: a marker path; crash once


def _maybe_crash() -> None:
    """Kill this actor's process mid-batch, once per marker file (tests of Ray Data's actor restarts)."""
    marker = os.environ.get(CRASH_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


def _needs_actor(step: Step) -> bool:
    """A model stage's model half (or the whole stage, not split), or an LLM stage."""
    op = get_op(step.config.op)
    return step.decision is None and step.phase != PREPARE and (op.stateful or op.ray_llm_stage(step.config) is not None)


def _leading_task_steps(steps: list[Step]) -> list[Step]:
    """The steps before the first model or LLM stage's actors (the first model stage's CPU half
    included): they run in the task that reads the shard."""
    fused = []
    for step in steps:
        if _needs_actor(step):
            break
        fused.append(step)
    return fused


def stream_pipeline(inputs: list[list[str]], steps: list[Step], parts_dir: Path, final: bool,
                    committing: ShardCommits | None = None) -> Iterator[dict]:
    """Run the steps over the shards (each a list of files); yield one summary row per part written
    (shard, rows back, rejected per stage, and whether the shard was committed where it was written).
    Rows never come to the driver: tasks read the shards, and workers write rejected rows as they fall
    out (`parts.shed_rejected`) and the alive rows at the end (`parts.write_alive`) under `parts_dir`.
    A segment whose every step runs in the read task is plain Ray tasks, one per shard (`shard_tasks`);
    one with model or LLM stages is a Ray Data stream (`build_stream`)."""
    split = split_steps(steps)
    if len(_leading_task_steps(split)) == len(split):
        summaries: Iterator[pa.Table] = shard_tasks(inputs, split, parts_dir, final, committing)
    else:
        summaries = build_stream(inputs, steps, parts_dir, final, committing).iter_batches(
            batch_size=None, batch_format="pyarrow")
    try:
        for summary in summaries:
            yield from summary.to_pylist()
    except Exception as e:
        log.debug("the stream failed", exc_info=True)  # the whole story, for the run's log
        _release_failed_execution(e)
        raise
    finally:
        getattr(summaries, "close", lambda: None)()  # stopped early by the caller: the execution ends now


#: how long a stopped segment waits for its cancelled shard tasks to end (a task mid-write finishes its file)
CANCEL_WAIT_S = 30.0


def shard_tasks(inputs: list[list[str]], steps: list[Step], parts_dir: Path, final: bool,
                committing: ShardCommits | None = None) -> Iterator[pa.Table]:
    """A segment that needs no model: one Ray task per shard reads it, runs every step, writes its parts
    and commits it; yields each task's summary as it finishes. Ray Data would add nothing here but its
    streaming executor, which on 2 cores cost 25% of the throughput (bench/scale.py: 20 shards of 50k
    captions in 9.9 s through Ray Data, 7.8 s as tasks) and seconds of start-up. A retried task (its
    worker died) finds its shard's marker, or overwrites its own parts (their names are their uids)."""
    schema = sample_schema()
    own = [s for s in steps if s.decision is None and s.phase is None]
    cpus = max((s.config.num_cpus if s in own else 1 for s in steps), default=IO_TASK_CPUS)
    limits = [s.config.concurrency for s in own if s.config.concurrency]
    window = min([*limits, max(2, 2 * int(raytools.cluster_cpus(1) / cpus))])
    run = ray.remote(num_cpus=cpus)(shard_task)
    shared = ray.put((steps, schema, str(parts_dir)))
    queued = iter(enumerate(inputs))
    in_flight: list[ray.ObjectRef] = []

    def submit(k: int, files: list[str]) -> ray.ObjectRef:
        row: dict[str, Any] = {SHARD_FILES: [files]}
        one = None
        if committing is not None:  # the task gets its own shard's commit, not the whole segment's list
            one, row[SHARD_INDEX] = replace(committing, shards=[committing.shards[k]]), [0]
        return run.remote(pa.table(row), shared, final, one)

    try:
        while True:
            in_flight += [submit(*k_files) for k_files in itertools.islice(queued, window - len(in_flight))]
            if not in_flight:
                return
            done, in_flight = ray.wait(in_flight, num_returns=1)
            yield raytools.get(done[0])
    finally:
        for ref in in_flight:  # stopped early (an error, the caller closed us): tasks under way end now
            ray.cancel(ref)
        if in_flight:  # and are waited for: none commits its shard after we return (on a long-lived cluster
            ray.wait(in_flight, num_returns=len(in_flight), timeout=CANCEL_WAIT_S)  # a rerun could race it)


def build_stream(inputs: list[list[str]], steps: list[Step], parts_dir: Path, final: bool,
                 committing: ShardCommits | None = None) -> ray.data.Dataset:
    """The segment's Ray Data stream, not started: a read task per shard running the steps that need no
    model (and the first model stage's CPU half), then per model stage its prepare tasks and its actor
    pool, then the task writing the alive rows. When every step runs in the read task, that task commits
    its shard too (`committing`, in the order of `inputs`)."""
    schema = sample_schema()  # read here: workers on other nodes may not have schemas/
    steps = split_steps(steps)
    actor_cpus = _actor_cpu_scale(steps)
    task_cpus = _task_cpu_cap(steps, actor_cpus)
    parts = str(parts_dir)
    fused = _leading_task_steps(steps)
    write_here = len(fused) == len(steps)
    own = [s for s in fused if s.decision is None and s.phase is None]  # (a CPU half's fields are its actor's)
    cpus = min(max(s.config.num_cpus if s in own else 1 for s in fused), task_cpus) if fused else IO_TASK_CPUS
    committing = committing if write_here else None
    items = [{SHARD_FILES: files, **({SHARD_INDEX: i} if committing is not None else {})} for i, files in enumerate(inputs)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(inputs)))
    limits = [s.config.concurrency for s in own if s.config.concurrency]
    ds = ds.map_batches(read_and_run, fn_args=(fused, schema, parts, final if write_here else None, committing),
                        batch_size=1,
                        batch_format="pyarrow", num_cpus=cpus,
                        compute=ray.data.TaskPoolStrategy(size=min(limits)) if limits else None, **UNFUSED_TASK)
    for step in steps[len(fused):]:
        config = step.config
        common = dict(batch_size=config.batch_size, batch_format="pyarrow")
        llm = get_op(config.op).ray_llm_stage(config) if step.decision is None else None
        if llm is not None:
            ds = _ray_llm_stage(ds, step, schema, parts, llm, common)
        elif step.phase == PREPARE:  # a model stage's CPU half: tasks, as many as the CPUs allow
            ds = ds.map_batches(run_task_step, fn_args=(step, schema, parts), num_cpus=min(1, task_cpus),
                                **UNFUSED_TASK, **common)
        elif step.decision is None and get_op(config.op).stateful:
            ds = ds.map_batches(_StageActor, fn_constructor_args=(step, schema, parts),
                                num_cpus=config.num_cpus * actor_cpus, num_gpus=config.num_gpus or None,
                                compute=_actor_pool(step), **common)
        elif step.decision is None:
            compute = ray.data.TaskPoolStrategy(size=config.concurrency) if config.concurrency else None
            ds = ds.map_batches(run_task_step, fn_args=(step, schema, parts),
                                num_cpus=min(config.num_cpus, task_cpus), compute=compute, **UNFUSED_TASK, **common)
        else:  # applying a decision is cheap and needs no model: not the op's actor-pool size or GPUs
            ds = ds.map_batches(run_task_step, fn_args=(step, schema, parts), num_cpus=min(1, task_cpus),
                                **UNFUSED_TASK, **common)
    if not write_here:
        ds = ds.map_batches(write_alive, fn_args=(parts, final), batch_size=None, batch_format="pyarrow",
                            num_cpus=IO_TASK_CPUS)
    return ds


def _release_failed_execution(error: BaseException) -> None:
    """Free the actors of a failed Ray Data execution now. It leaves its actor pool in reference cycles,
    and the tracebacks of `error`'s chain, which the caller keeps, reach them through Ray's frames: the
    actors would hold their CPUs (and the next run or training stage would wait for them) until a
    garbage collection that may not come. The messages stay; Ray's internal frames go (logged above)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # `raise` then adds this frame and the callers'
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    gc.collect()


def _actor_cpu_scale(steps: list[Step]) -> float:
    """Scale for actors' CPU reservations so that the pools of a segment, which all hold their CPUs for
    the whole segment, leave one CPU for the tasks feeding them; otherwise a small machine (2 cores,
    4 model stages) deadlocks: every actor waits for input a starved task never produces."""
    pools = _model_pools(steps)
    total = float(ray.cluster_resources().get("CPU", 0))
    budget = total - 1
    if not pools or total <= 0 or sum(pools) <= budget:
        return 1.0
    scale = max(budget, 0.5) / sum(pools)
    log.info("model stages reserve %.2g CPUs for their actors on a cluster of %.0g; scaling each reservation "
             "by %.2f so the other stages can run (set num_cpus per stage to choose yourself)", sum(pools), total, scale)
    return scale


def _model_pools(steps: list[Step]) -> list[float]:
    return [(s.config.concurrency or 1) * s.config.num_cpus for s in steps
            if s.decision is None and s.phase != PREPARE and get_op(s.config.op).stateful and s.config.num_gpus == 0]


def _actor_pool(step: Step) -> ray.data.ActorPoolStrategy:
    """A model stage's pool: from `min_actors` (default 1) up to `concurrency` as the stream keeps them
    busy; an actor fed by prepare tasks has `prepared_batches` batches in flight, so it never waits for
    the next one while the CPUs keep up."""
    config = step.config
    most = config.concurrency or 1
    least = min(getattr(config, "min_actors", None) or 1, most)
    in_flight = getattr(config, "prepared_batches", None) if step.phase == INFER else None
    return ray.data.ActorPoolStrategy(min_size=least, max_size=most, max_tasks_in_flight_per_actor=in_flight)


def _task_cpu_cap(steps: list[Step], actor_scale: float) -> float:
    """The most CPUs one task may ask for next to the segment's actor pools: on a 1-CPU cluster an actor
    holds half of it, and a task asking for a whole CPU would never be scheduled."""
    pools = _model_pools(steps)
    if not pools:
        return float("inf")
    total = float(ray.cluster_resources().get("CPU", 0))
    return max(total - sum(pools) * actor_scale, IO_TASK_CPUS)


def _ray_llm_stage(ds: ray.data.Dataset, step: Step, schema: pa.Schema, parts: str, llm: RayLLMStage,
                   common: dict) -> ray.data.Dataset:
    """Prepare (the op writes requests) -> Ray Data LLM's vLLM processor -> finish (the op reads replies)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ds = ds.map_batches(run_task_step, fn_args=(Step(step.index, llm.prepare), schema, parts), num_cpus=1, **common)
    processor = build_processor(vLLMEngineProcessorConfig(**llm.processor_kwargs), preprocess=llm.preprocess,
                                postprocess=llm.postprocess)
    ds = processor(ds)
    return ds.map_batches(run_task_step, fn_args=(step, schema, parts), num_cpus=1, **common)
