"""Run a pipeline spec: plan shards, stream each segment's shards through Ray Data, commit, resume.

The run directory:
    dataset/part-<shard>-<hash>.parquet   kept rows (schemas/sample.schema.json), as workers wrote them
    rejected/part-<shard>-s<k>[-<hash>].parquet  rows rejected in segment k, with reject_stage, reject_reason
    run.json                              spec, hash, versions, attempts, per-stage counts and times
    dataengine.log                        the command's full log (the console shows progress and warnings)
    _shards/                              the input cut into shards (written once, reused on rerun)
    _parts/segment-<k>/<shard>/           parts written by workers, not yet committed
    _state/committed/<shard>.json         a shard's commit marker (counts, files): the commit point
    _state/segment-<k>/<shard>.json       the same for a segment before a barrier
    _state/decision-<stage>.json          a barrier stage's decision (a quantile threshold, dedup groups)

The driver holds metadata only: the shard plan, the parts' summaries (counts per shard), markers and
decisions. Workers read the shards, write rejected rows as they fall out and alive rows at the end
(`engine/parts.py`); when all of a shard's rows are back, a commit task checks its uids and writes its
marker (`engine/commit.py`). A rerun skips committed shards, finishes interrupted commits, commits
shards whose parts are complete and redoes the rest, so `kill -9` at any moment loses and duplicates
nothing. Stages that must see every row before deciding (quantile thresholds, dedup) are barriers:
the plan is cut into segments after them (`engine/segments.py`), and the decision, made once over the
whole segment's output, is saved before the next segment applies it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from dataengine.core import raytools
from dataengine.core.atomic import remove_stale_temporaries, write_text_atomic
from dataengine.core.layout import DATASET_DIR, LLM_USAGE_DIR, MANIFEST, PARTS_DIR, REJECTED_DIR
from dataengine.core.progress import StageProgress, note, report
from dataengine.engine.accounting import aggregate_counts, check_accounting, final_markers
from dataengine.engine.barriers import decide
from dataengine.engine.commit import (
    AccountingError,
    ShardCommit,
    ShardCommits,
    clear_uncommitted,
    commit_shard,
    finish_commit,
)
from dataengine.engine.parts import SUMMARY_COMMITTED, SUMMARY_REJECTED, SUMMARY_ROWS, SUMMARY_SHARD
from dataengine.engine.rejections import resolve
from dataengine.engine.segments import Segment, plan_segments
from dataengine.engine.spec import PipelineSpec, ResourcesSpec, missing_requirements
from dataengine.io.shard_plan import INPUT_STAGE, Shard, plan_path, plan_shards
from dataengine.llm.usage import BudgetExhausted, read_usage
from dataengine.models.sources import resolve_model_refs
from dataengine.ops import OpConfig, get_op, stage_name
from dataengine.ops.base import Step

log = logging.getLogger(__name__)
COMMIT_CPUS = 0  # a commit is short (a 50k-row shard: ~0.1 s) and must not queue behind the stream, whose tasks hold every CPU


class RunError(RuntimeError):
    """The run cannot start or continue (e.g. the output holds a different spec's run)."""


@dataclass
class RunResult:
    run_dir: Path
    manifest: dict[str, Any]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.manifest["stages"]


@dataclass(frozen=True)
class ShardWork:
    """A shard as one segment sees it: the files it reads (relative to the run), the rows entering the
    segment, and the previous segment's marker."""

    shard: Shard
    inputs: list[str]
    rows: int
    previous: dict[str, Any] | None


class LazyRay:
    """The Ray session, started the first time there is work for it (a finished run's rerun starts none)."""

    def __init__(self, stack: contextlib.ExitStack, address: str | None, resources: ResourcesSpec) -> None:
        self.stack, self.address, self.resources, self.started = stack, address, resources, False

    def start(self) -> None:
        from dataengine.engine.raydata import ray_session

        if not self.started:
            self.stack.enter_context(ray_session(self.address, self.resources))
            self.started = True


def run_pipeline(spec: PipelineSpec, output: str | Path | None = None, address: str | None = None) -> RunResult:
    """Run (or resume) `spec`, writing into `output` (default: the spec's `output`)."""
    missing = missing_requirements(spec)
    if missing:
        raise RunError("this Python cannot run the spec:\n  " + "\n  ".join(missing))
    run_dir = Path(output or spec.output).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(run_dir)
    if previous and previous.get("spec_hash") != spec.spec_hash():
        raise RunError(
            f"{run_dir} holds a run of another spec (hash {previous.get('spec_hash')}, this spec {spec.spec_hash()}); "
            "use a new output directory to run it"
        )
    attempt = {"started_at": _now(), "shards_processed": 0, "shards_recovered": 0}
    attempts = [*(previous or {}).get("attempts", []), attempt]
    started = time.perf_counter()
    stage_names = spec.stage_names()
    # what workers get: run-bound configs whose plugin model references (synthweb-demo:lm) are paths
    stages = [resolve_model_refs(get_op(c.op).bind_run(c, run_dir)) for c in spec.stages]
    segments = plan_segments(stages)
    with contextlib.ExitStack() as stack:
        ray = LazyRay(stack, address, spec.resources)
        if not plan_path(run_dir).exists():
            ray.start()  # a task reads the input and writes the shards; the driver gets the plan
        shards = plan_shards(spec.input, run_dir, in_task=ray.started)
        for d in (DATASET_DIR, REJECTED_DIR, PARTS_DIR):
            remove_stale_temporaries(run_dir / d)
        _write_manifest(run_dir, spec, attempts, shards, stage_names, status="running")
        stack.enter_context(_marked_failed_on_error(run_dir, spec, attempts, shards, stage_names))
        for segment in segments:
            work = _segment_work(run_dir, segment, segments, shards)
            pending = _prepare_segment(run_dir, segment, work, stage_names, attempt, ray)
            if not pending:
                continue
            ray.start()
            steps = _segment_steps(run_dir, segment, stages, segments, shards)
            _run_segment(run_dir, segment, steps, pending, len(shards), stage_names, attempt)
    shutil.rmtree(run_dir / PARTS_DIR, ignore_errors=True)  # intermediate rows are only needed until the end

    attempt["ended_at"], attempt["seconds"] = _now(), round(time.perf_counter() - started, 3)
    markers = final_markers(run_dir, segments[-1], shards)
    model_batches = {stage_name(c): c.batch_size for c in spec.stages if get_op(c.op).stateful}
    counts = aggregate_counts(markers, stage_names, model_batches)
    check_accounting(run_dir, shards, markers, counts)
    manifest = _write_manifest(run_dir, spec, attempts, shards, stage_names, status="complete", counts=counts)
    for config in spec.stages:
        get_op(config.op).after_run(config, run_dir)
    if spec.train is not None:
        from dataengine.engine.raydata import ray_session
        from dataengine.eval.train_then_eval import train_run

        with ray_session(address, spec.resources):
            manifest["train"] = train_run(run_dir, spec.train)
    return RunResult(run_dir, manifest)


# ---- segments: the stages between barriers ---------------------------------------------------

def _segment_work(run_dir: Path, segment: Segment, segments: list[Segment], shards: list[Shard]) -> list[ShardWork]:
    """What each shard brings into `segment`: the input shard, or the rows the previous segment kept."""
    if segment.index == 0:
        return [ShardWork(s, [str(s.path.relative_to(run_dir))], s.rows, None) for s in shards]
    before = segments[segment.index - 1]
    work = []
    for s in shards:
        previous = before.read_marker(run_dir, s.id)
        if previous is None:
            raise AccountingError(f"shard {s.id}: segment {before.index} has no commit marker")
        work.append(ShardWork(s, previous["next"], previous["alive"], previous))
    return work


def _segment_steps(run_dir: Path, segment: Segment, stages: list[OpConfig], segments: list[Segment],
                   shards: list[Shard]) -> list[Step]:
    steps = []
    if segment.decision_of is not None:
        steps.append(Step(segment.decision_of, stages[segment.decision_of],
                          _barrier_decision(run_dir, segment, segments, stages[segment.decision_of], shards)))
    steps += [Step(i, stages[i]) for i in segment.stages]
    return steps


def _barrier_decision(run_dir: Path, segment: Segment, segments: list[Segment], config: OpConfig,
                      shards: list[Shard]) -> dict[str, Any]:
    """Decide a barrier stage, in tasks, over every row the previous segment kept; saved, so a resumed
    run applies the very same decision."""
    path = segment.decision_path(run_dir)
    if not path.exists():
        before = segments[segment.index - 1]
        files = [str(run_dir / f) for s in shards for f in (before.read_marker(run_dir, s.id) or {}).get("next", [])]
        started = time.perf_counter()
        decision, rows = decide(config, files, path.with_suffix(""))
        note("%s decided over %d rows in %.2fs", stage_name(config), rows, time.perf_counter() - started)
        write_text_atomic(path, json.dumps(decision))  # the decision's commit point (its Parquet is written)
    return resolve(json.loads(path.read_text()), path.parent)


def _prepare_segment(run_dir: Path, segment: Segment, work: list[ShardWork], stage_names: list[str],
                     attempt: dict[str, Any], ray: LazyRay) -> list[ShardWork]:
    """Finish interrupted commits, commit what a killed attempt completed, and return the shards still
    to run (their half-done parts cleared)."""
    pending, unfinished = [], []
    for w in work:
        marker = segment.read_marker(run_dir, w.shard.id)
        if marker is not None:
            finish_commit(run_dir, segment, w.shard.id, marker)
            continue
        clear_uncommitted(run_dir, segment, w.shard.id)
        if w.rows == 0:  # every row was rejected before this segment: nothing to read or run
            commit_shard(str(run_dir), segment, w.shard.id, [], w.previous, w.shard.rows, stage_names)
        elif (segment.parts_dir(run_dir) / w.shard.id).is_dir():
            unfinished.append(w)
        else:
            pending.append(w)
    if unfinished:
        ray.start()
        for w, marker in zip(unfinished, _commit_all(run_dir, segment, unfinished, stage_names)):
            if marker is None:  # (a killed run's last workers may still be removing what they wrote)
                shutil.rmtree(segment.parts_dir(run_dir) / w.shard.id, ignore_errors=True)
                log.info("shard %s was half done in segment %d; redoing it", w.shard.id, segment.index)
                pending.append(w)
            else:
                attempt["shards_recovered"] += 1
                log.info("recovered shard %s of segment %d without recomputing it", w.shard.id, segment.index)
    decision = [f"{stage_names[segment.decision_of]}'s decision"] if segment.decision_of is not None else []
    names = " -> ".join(decision + [stage_names[i] for i in segment.stages])
    if pending:
        note("running %s: %d of %d shards to do", names, len(pending), len(work))
    else:
        log.info("segment %d (%s): all %d shards done", segment.index, names, len(work))
    return pending


def _commit_task(run_dir: Path, segment: Segment, w: ShardWork, stage_names: list[str]) -> Any:
    return raytools.submit(commit_shard, str(run_dir), segment, w.shard.id, w.inputs, w.previous, w.shard.rows,
                           stage_names, num_cpus=COMMIT_CPUS)


def _commit_all(run_dir: Path, segment: Segment, work: list[ShardWork], stage_names: list[str]) -> list[Any]:
    return raytools.get([_commit_task(run_dir, segment, w, stage_names) for w in work])


class SegmentProgress:
    """Rows in, kept and rejected per stage of a running segment, from the parts' summaries, reported
    as progress events (at most every `every` seconds, and once more when the segment ends)."""

    def __init__(self, run_dir: Path, segment: Segment, stage_names: list[str], every: float = 0.5) -> None:
        shown = ([segment.decision_of] if segment.decision_of is not None else []) + list(segment.stages)
        self.order = [INPUT_STAGE, *stage_names]
        self.shown = [stage_names[i] for i in shown]
        self.key = f"{run_dir}/segment-{segment.index}"
        self.rows = 0
        self.rejected: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.every, self.reported_at = every, 0.0

    def add(self, rows: int, rejected_by_stage: dict[str, int]) -> None:
        self.rows += rows
        self.rejected.update(rejected_by_stage)
        if time.perf_counter() - self.reported_at >= self.every:
            self.report()

    def report(self, done: bool = False) -> None:
        self.reported_at = time.perf_counter()
        seconds = self.reported_at - self.started
        for name in self.shown:
            earlier = self.order[:self.order.index(name)]
            rows_in = self.rows - sum(self.rejected[s] for s in earlier)
            rejected = self.rejected[name]
            report(StageProgress(f"{self.key}/{name}", name, rows_in, rows_in - rejected, rejected, seconds, done))


def _run_segment(run_dir: Path, segment: Segment, steps: list[Step], pending: list[ShardWork], total: int,
                 stage_names: list[str], attempt: dict[str, Any]) -> None:
    """Stream the pending shards through the segment's steps; commit each shard, in a task, as soon as
    all its rows are back."""
    import ray

    from dataengine.engine.raydata import stream_pipeline

    by_id = {w.shard.id: w for w in pending}
    received: Counter[str] = Counter()
    commits: dict[Any, ShardWork] = {}
    done = total - len(pending)
    progress = SegmentProgress(run_dir, segment, stage_names)

    def collect(wait: bool) -> None:
        nonlocal done
        while commits:
            ready, _ = ray.wait(list(commits), num_returns=len(commits) if wait else 1, timeout=None if wait else 0)
            if not ready:
                return
            for ref in ready:
                w = commits.pop(ref)
                if raytools.get(ref) is None:
                    raise AccountingError(f"shard {w.shard.id}: all {w.rows} rows came back, but not every uid once")
                done += 1
                attempt["shards_processed"] += 1
                log.info("committed shard %s of segment %d (%d rows): %d/%d shards", w.shard.id, segment.index,
                         w.rows, done, total)

    inputs = [[str(run_dir / f) for f in w.inputs] for w in pending]
    committing = ShardCommits(str(run_dir), segment, stage_names,
                              [ShardCommit(w.shard.id, w.inputs, w.previous, w.shard.rows, w.rows) for w in pending])
    # closed on every way out: an error here must not leave the stream's actors holding their CPUs
    with contextlib.closing(stream_pipeline(inputs, steps, segment.parts_dir(run_dir), segment.final,
                                            committing)) as summaries:
        try:
            for row in summaries:
                progress.add(row[SUMMARY_ROWS], json.loads(row[SUMMARY_REJECTED]))
                w = by_id[row[SUMMARY_SHARD]]
                received[w.shard.id] += row[SUMMARY_ROWS]
                if received[w.shard.id] > w.rows:
                    raise AccountingError(f"shard {w.shard.id}: {received[w.shard.id]} rows came back for {w.rows} in")
                if received[w.shard.id] == w.rows and row.get(SUMMARY_COMMITTED):  # committed where it was written
                    done += 1
                    attempt["shards_processed"] += 1
                    log.info("committed shard %s of segment %d in its task (%d rows): %d/%d shards", w.shard.id,
                             segment.index, w.rows, done, total)
                elif received[w.shard.id] == w.rows:
                    commits[_commit_task(run_dir, segment, w, stage_names)] = w
                collect(wait=False)
        except BaseException:
            if commits:  # commits under way are good work: let them land
                ray.wait(list(commits), num_returns=len(commits))
            raise
        collect(wait=True)
    progress.report(done=True)
    missing = {w.shard.id: w.rows - received[w.shard.id] for w in pending if not segment.marker(run_dir, w.shard.id).exists()}
    if missing:
        raise AccountingError(f"rows never came back from the pipeline: {missing} (shard: missing rows)")


@contextlib.contextmanager
def _marked_failed_on_error(run_dir: Path, spec: PipelineSpec, attempts: list[dict[str, Any]], shards: list[Shard],
                            stage_names: list[str]) -> Iterator[None]:
    """Record a failed attempt in run.json (status and error) before the error propagates."""
    try:
        yield
    except Exception as e:
        attempts[-1].update(ended_at=_now(), error=f"{type(e).__name__}: {e}"[:2000])
        budget = _budget_stop(e)
        if budget:  # a clean stop, not a failure: every committed shard stands, a rerun continues
            attempts[-1]["stopped"] = budget
        _write_manifest(run_dir, spec, attempts, shards, stage_names, status="stopped" if budget else "failed")
        if budget:
            raise BudgetStop(f"{budget}. Committed shards are kept; raise the budget and rerun to continue "
                             "(replies already paid for come from the cache).") from None
        raise


class BudgetStop(RunError):
    """The run stopped because its LLM budget is spent (run.json status `stopped`)."""


def _budget_stop(error: BaseException) -> str | None:
    """The budget message when `error` (possibly wrapped by Ray) is a `BudgetExhausted`."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BudgetExhausted):
            return str(current).splitlines()[0]
        current = current.__cause__ or current.__context__
    match = re.search(r"BudgetExhausted: (LLM budget reached[^\n]*)", str(error))
    return match.group(1) if match else None


# ---- manifest --------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("dataengine", "ray", "pyarrow", "polars", "pydantic", "numpy", "pillow", "opencv-python-headless", "urllib3"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _write_manifest(run_dir: Path, spec: PipelineSpec, attempts: list[dict[str, Any]], shards: list[Shard],
                    stage_names: list[str], *, status: str, counts: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {
        "name": spec.name,
        "status": status,
        "spec_hash": spec.spec_hash(),
        "spec": spec.model_dump(mode="json"),
        "versions": package_versions(),
        "command": sys.argv,
        "started_at": attempts[0]["started_at"],
        "ended_at": attempts[-1].get("ended_at"),
        "attempts": attempts,
        "input": {"rows": sum(s.rows for s in shards), "shards": len(shards)},
        "stage_names": [INPUT_STAGE, *stage_names],
        "totals": {k: counts[k] for k in ("in", "kept", "rejected")} if counts else None,
        "stages": counts["stages"] if counts else [],
        "llm_usage": _llm_usage(run_dir),
    }
    write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _llm_usage(run_dir: Path) -> dict[str, Any] | None:
    """Tokens and estimated cost of every LLM request this run paid for (all attempts), if any."""
    directory = run_dir / LLM_USAGE_DIR
    return read_usage(directory).as_dict() if directory.is_dir() else None


def format_summary(manifest: dict[str, Any]) -> str:
    """A per-stage table: rows in, kept, rejected, top reasons, busy time."""
    width = max([16, *(len(s["stage"]) + 2 for s in manifest["stages"])])
    header = f"{'stage':<{width}}{'in':>10}{'kept':>10}{'rejected':>10}{'busy s':>9}  top reasons"
    lines = [header, "-" * len(header)]
    for s in manifest["stages"]:
        reasons = ", ".join(f"{r}={n}" for r, n in reason_families(s["rejected_by_reason"])[:4])
        lines.append(f"{s['stage']:<{width}}{s['in']:>10}{s['kept']:>10}{s['rejected']:>10}{s['busy_seconds']:>9.1f}  {reasons}")
    t = manifest["totals"] or {"in": 0, "kept": 0, "rejected": 0}
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}}{t['in']:>10}{t['kept']:>10}{t['rejected']:>10}")
    return "\n".join(lines)


def reason_families(reasons: dict[str, int]) -> list[tuple[str, int]]:
    """Reasons that name a row (`duplicate_of:<uid>`, `contaminates:<ref>`) counted as one family."""
    families: Counter[str] = Counter()
    for reason, n in reasons.items():
        head, sep, _ = reason.partition(":")
        families[f"{head}:*" if sep and head in ("duplicate_of", "contaminates") else reason] += n
    return families.most_common()
