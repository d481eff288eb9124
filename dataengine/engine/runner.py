"""Run a pipeline spec: plan shards, stream them through Ray Data, commit, resume, account.

The run directory:
    dataset/part-<shard>.parquet    kept rows (schemas/sample.schema.json)
    rejected/part-<shard>.parquet   rejected rows with reject_stage, reject_reason
    run.json                        spec, hash, versions, attempts, per-stage counts and times
    dataengine.log                  the command's full log (the console shows progress and warnings)
    _shards/                        the input cut into shards (written once, reused on rerun)
    _parts/segment-<k>/<shard>/     rows written by workers, not yet committed
    _segments/<k>/<shard>.parquet   a shard's rows at a barrier (kept until the run completes)
    _state/committed/<shard>.json   commit marker with the shard's counts: the commit point
    _state/decision-<stage>.json    a barrier stage's decision (a quantile threshold, dedup groups)

A shard is committed when all its rows are back: the driver gathers its parts, checks that every
input uid is there exactly once, writes the shard's dataset/ and rejected/ files atomically and then
its marker. A rerun skips shards with a marker, commits shards whose parts are complete, and redoes
the rest, so `kill -9` at any moment loses and duplicates nothing.

Stages that must see every row before deciding (quantile thresholds, dedup) are barriers: the plan
is cut into segments after them, each shard is committed per segment, and the decision, made once
over the whole segment's output, is saved before the next segment applies it.
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
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.atomic import remove_stale_temporaries, write_parquet_atomic, write_text_atomic
from dataengine.core.layout import (
    COMMITTED_DIR,
    DATASET_DIR,
    LLM_USAGE_DIR,
    MANIFEST,
    PARTS_DIR,
    REJECTED_DIR,
    SEGMENTS_DIR,
    STATE_DIR,
)
from dataengine.core.progress import StageProgress, note, report
from dataengine.core.schemas import conform, rejected_schema, sample_schema
from dataengine.engine.spec import PipelineSpec, missing_requirements
from dataengine.io.inputs import INPUT_STAGE, Shard, plan_shards
from dataengine.llm.usage import BudgetExhausted, read_usage
from dataengine.models.sources import resolve_model_refs
from dataengine.ops import OpConfig, get_op, stage_name
from dataengine.ops.base import Step

log = logging.getLogger(__name__)



class RunError(RuntimeError):
    """The run cannot start or continue (e.g. the output holds a different spec's run)."""


class AccountingError(RuntimeError):
    """Rows were lost or duplicated: in != kept + rejected somewhere. Never ignored."""


@dataclass
class RunResult:
    run_dir: Path
    manifest: dict[str, Any]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.manifest["stages"]


def run_pipeline(spec: PipelineSpec, output: str | Path | None = None, address: str | None = None) -> RunResult:
    """Run (or resume) `spec`, writing into `output` (default: the spec's `output`)."""
    from dataengine.engine.raydata import ray_session  # Ray starts only when there is work for it

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
    shards = plan_shards(spec.input, run_dir)
    stage_names = spec.stage_names()
    for d in (DATASET_DIR, REJECTED_DIR, PARTS_DIR, SEGMENTS_DIR):
        remove_stale_temporaries(run_dir / d)
    _write_manifest(run_dir, spec, attempts, shards, stage_names, status="running")

    with contextlib.ExitStack() as stack:
        stack.enter_context(_marked_failed_on_error(run_dir, spec, attempts, shards, stage_names))
        ray_started = False
        # what workers get: run-bound configs whose plugin model references (synthweb-demo:lm) are paths
        stages = [resolve_model_refs(get_op(c.op).bind_run(c, run_dir)) for c in spec.stages]
        for segment in plan_segments(stages):
            pending = _prepare_segment(run_dir, segment, shards, stage_names, attempt)
            if not pending:
                continue
            if not ray_started:
                stack.enter_context(ray_session(address, spec.resources))
                ray_started = True
            steps = _segment_steps(run_dir, segment, stages, shards)
            _run_segment(run_dir, segment, steps, shards, pending, stage_names, attempt)
    for scratch in (SEGMENTS_DIR, PARTS_DIR):  # intermediate rows are only needed until the end
        shutil.rmtree(run_dir / scratch, ignore_errors=True)

    attempt["ended_at"], attempt["seconds"] = _now(), round(time.perf_counter() - started, 3)
    counts = aggregate_counts(run_dir, shards, stage_names)
    check_accounting(run_dir, shards, counts)
    manifest = _write_manifest(run_dir, spec, attempts, shards, stage_names, status="complete", counts=counts)
    for config in spec.stages:
        get_op(config.op).after_run(config, run_dir)
    if spec.train is not None:
        from dataengine.eval.train_then_eval import train_run

        with ray_session(address, spec.resources):
            manifest["train"] = train_run(run_dir, spec.train)
    return RunResult(run_dir, manifest)


# ---- segments: the stages between barriers ---------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Stages that stream together. A barrier stage (a decision that needs every row's score, such
    as a quantile threshold or dedup) ends a segment; the next segment starts by applying the
    decision made over the whole previous segment's output."""

    index: int
    stages: tuple[int, ...]
    decision_of: int | None  # the barrier stage whose decision this segment applies first
    final: bool

    def marker(self, run_dir: Path, shard_id: str) -> Path:
        return _marker(run_dir, shard_id) if self.final else run_dir / STATE_DIR / f"segment-{self.index}" / f"{shard_id}.json"

    def parts_dir(self, run_dir: Path) -> Path:
        return run_dir / PARTS_DIR / f"segment-{self.index}"

    def input_path(self, run_dir: Path, shard: Shard) -> Path:
        return shard.path if self.index == 0 else run_dir / SEGMENTS_DIR / f"{self.index - 1}" / f"{shard.id}.parquet"

    def output_path(self, run_dir: Path, shard: Shard) -> Path:
        return run_dir / SEGMENTS_DIR / f"{self.index}" / f"{shard.id}.parquet"


def plan_segments(stages: list[OpConfig]) -> list[Segment]:
    """Cut the stages after every barrier stage."""
    groups: list[list[int]] = [[]]
    for index, config in enumerate(stages):
        groups[-1].append(index)
        if get_op(config.op).is_barrier(config):
            groups.append([])
    segments = []
    for k, group in enumerate(groups):
        decision_of = groups[k - 1][-1] if k else None
        segments.append(Segment(k, tuple(group), decision_of, final=k == len(groups) - 1))
    return segments


def _segment_steps(run_dir: Path, segment: Segment, stages: list[OpConfig], shards: list[Shard]) -> list[Step]:
    steps = []
    if segment.decision_of is not None:
        steps.append(Step(segment.decision_of, stages[segment.decision_of],
                          _barrier_decision(run_dir, segment, stages[segment.decision_of], shards)))
    steps += [Step(i, stages[i]) for i in segment.stages]
    return steps


def _barrier_decision(run_dir: Path, segment: Segment, config: OpConfig, shards: list[Shard]) -> dict[str, Any]:
    """Decide a barrier stage over every row still alive after it scored them; saved, so a resumed
    run applies the very same decision."""
    path = run_dir / STATE_DIR / f"decision-{segment.decision_of}.json"
    if path.exists():
        return json.loads(path.read_text())
    op = get_op(config.op)
    wanted = [C.UID, C.REJECT_REASON, *op.decision_columns(config)]
    previous = [segment.input_path(run_dir, s) for s in shards]
    # A shard whose rows all died before this stage never got its columns; optional ones (clip_score
    # for dedup) may be absent everywhere: read what each file has and let concat fill the gaps.
    tables = []
    for segment_file in previous:
        names = set(pq.read_schema(segment_file).names)
        tables.append(pq.read_table(segment_file, columns=[c for c in wanted if c in names]))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else \
        pa.table({C.UID: pa.array([], pa.string()), C.REJECT_REASON: pa.array([], pa.string())})
    alive = table.filter(pc.is_null(table.column(C.REJECT_REASON))).drop_columns([C.REJECT_REASON])
    started = time.perf_counter()
    decision = op.decide(config, alive)
    note("%s decided over %d rows in %.2fs", stage_name(config), alive.num_rows, time.perf_counter() - started)
    write_text_atomic(path, json.dumps(decision))
    return decision


def _prepare_segment(run_dir: Path, segment: Segment, shards: list[Shard], stage_names: list[str],
                     attempt: dict[str, Any]) -> list[Shard]:
    """Recover what a killed attempt finished in this segment; return the shards still to run."""
    recovered = _recover(run_dir, segment, shards, stage_names)
    attempt["shards_recovered"] += recovered
    pending = [s for s in shards if not segment.marker(run_dir, s.id).exists()]
    decision = [f"{stage_names[segment.decision_of]}'s decision"] if segment.decision_of is not None else []
    names = " -> ".join(decision + [stage_names[i] for i in segment.stages])
    if pending:
        note("running %s: %d of %d shards to do", names, len(pending), len(shards))
    else:
        log.info("segment %d (%s): all %d shards done", segment.index, names, len(shards))
    return pending


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


def _run_segment(run_dir: Path, segment: Segment, steps: list[Step], shards: list[Shard], pending: list[Shard],
                 stage_names: list[str], attempt: dict[str, Any]) -> None:
    """Stream the pending shards through the segment's steps, committing each shard when complete."""
    from dataengine.engine.raydata import SUMMARY_PART, SUMMARY_REJECTED, SUMMARY_ROWS, SUMMARY_SHARD, stream_pipeline

    by_id = {s.id: s for s in pending}
    received: Counter[str] = Counter()
    parts: dict[str, list[str]] = defaultdict(list)
    done = len(shards) - len(pending)
    inputs = [segment.input_path(run_dir, s) for s in pending]
    progress = SegmentProgress(run_dir, segment, stage_names)
    # closed on every way out: an error here must not leave the stream's actors holding their CPUs
    with contextlib.closing(stream_pipeline(inputs, steps, segment.parts_dir(run_dir))) as summaries:
        for row in summaries:
            progress.add(row[SUMMARY_ROWS], json.loads(row[SUMMARY_REJECTED]))
            shard = by_id[row[SUMMARY_SHARD]]
            received[shard.id] += row[SUMMARY_ROWS]
            parts[shard.id].append(row[SUMMARY_PART])
            if received[shard.id] > shard.rows:
                raise AccountingError(f"shard {shard.id}: {received[shard.id]} rows came back for {shard.rows} in")
            if received[shard.id] == shard.rows:
                commit_started = time.perf_counter()
                commit_shard(run_dir, shard, parts.pop(shard.id), stage_names, segment)
                done += 1
                attempt["shards_processed"] += 1
                log.info("committed shard %s of segment %d (%d rows, %.2fs): %d/%d shards", shard.id, segment.index,
                         shard.rows, time.perf_counter() - commit_started, done, len(shards))
    progress.report(done=True)
    missing = {s.id: s.rows - received[s.id] for s in pending if not segment.marker(run_dir, s.id).exists()}
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


# ---- commit and recovery ---------------------------------------------------------------------

def _marker(run_dir: Path, shard_id: str) -> Path:
    return run_dir / COMMITTED_DIR / f"{shard_id}.json"


def commit_shard(run_dir: Path, shard: Shard, part_names: list[str] | None, stage_names: list[str],
                 segment: Segment | None = None) -> dict[str, Any]:
    """Gather a shard's parts, verify every input uid is there once, write its outputs, then its marker.

    In the final segment the outputs are `dataset/` and `rejected/`; before a barrier they are the
    shard's rows as the next segment will read them.
    """
    segment = segment or Segment(0, (), None, final=True)
    part_dir = segment.parts_dir(run_dir) / shard.id
    files = [part_dir / f"{p}.parquet" for p in part_names] if part_names is not None else sorted(part_dir.glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    rows = _first_per_uid(rows)
    expected = set(pq.read_table(shard.path, columns=[C.UID]).column(C.UID).to_pylist())
    got = rows.column(C.UID).to_pylist()
    if len(got) != len(expected) or set(got) != expected:
        lost, extra = expected - set(got), set(got) - expected
        raise AccountingError(f"shard {shard.id}: {len(lost)} uids lost (e.g. {sorted(lost)[:3]}), "
                              f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})")
    rows = rows.sort_by(C.UID)
    if not segment.final:
        write_parquet_atomic(rows, segment.output_path(run_dir, shard))
        marker: dict[str, Any] = {"shard": shard.id, "rows": shard.rows, "committed_at": time.time()}
        write_text_atomic(segment.marker(run_dir, shard.id), json.dumps(marker))
        shutil.rmtree(part_dir, ignore_errors=True)
        return marker
    is_kept = pc.is_null(rows.column(C.REJECT_REASON))
    kept = rows.filter(is_kept).drop_columns([C.REJECT_STAGE, C.REJECT_REASON])
    rejected = rows.filter(pc.invert(is_kept))
    seconds = {
        name: float(pc.sum(rows.column(col)).as_py() or 0.0)
        for i, name in enumerate(stage_names)
        if (col := f"{C.STAGE_SECONDS_PREFIX}{i}") in rows.column_names
    }
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for stage, reason in zip(rejected.column(C.REJECT_STAGE).to_pylist(), rejected.column(C.REJECT_REASON).to_pylist()):
        reasons[stage][reason] += 1
    for directory, table, schema in ((DATASET_DIR, kept, sample_schema()), (REJECTED_DIR, rejected, rejected_schema())):
        path = run_dir / directory / f"part-{shard.id}.parquet"
        if table.num_rows:
            write_parquet_atomic(conform(table, schema), path)
        else:
            path.unlink(missing_ok=True)
    marker = {"shard": shard.id, "rows": shard.rows, "kept": kept.num_rows, "rejected": rejected.num_rows,
              "rejected_by_stage": {s: dict(c) for s, c in reasons.items()}, "seconds": seconds,
              "committed_at": time.time()}
    write_text_atomic(_marker(run_dir, shard.id), json.dumps(marker))
    shutil.rmtree(part_dir, ignore_errors=True)
    return marker


def _first_per_uid(rows: pa.Table) -> pa.Table:
    """Drop exact re-deliveries of a uid (a retried task's part) keeping the first."""
    uids = rows.column(C.UID).to_pylist()
    if len(set(uids)) == len(uids):
        return rows
    seen: set[str] = set()
    keep = []
    for uid in uids:
        keep.append(uid not in seen)
        seen.add(uid)
    return rows.filter(pa.array(keep))


def _recover(run_dir: Path, segment: Segment, shards: list[Shard], stage_names: list[str]) -> int:
    """Commit shards a killed attempt finished but did not commit; clear the partial ones."""
    recovered = 0
    for shard in shards:
        part_dir = segment.parts_dir(run_dir) / shard.id
        if segment.marker(run_dir, shard.id).exists():
            shutil.rmtree(part_dir, ignore_errors=True)  # killed between marker and cleanup
            continue
        if not part_dir.is_dir():
            continue
        uids: set[str] = set()
        for f in sorted(part_dir.glob("*.parquet")):
            uids.update(pq.read_table(f, columns=[C.UID]).column(C.UID).to_pylist())
        if len(uids) == shard.rows:
            commit_shard(run_dir, shard, None, stage_names, segment)
            recovered += 1
            log.info("recovered shard %s of segment %d without recomputing it", shard.id, segment.index)
        else:
            shutil.rmtree(part_dir)
            log.info("shard %s was half done (%d/%d rows); redoing it", shard.id, len(uids), shard.rows)
    return recovered


# ---- accounting ------------------------------------------------------------------------------

def aggregate_counts(run_dir: Path, shards: list[Shard], stage_names: list[str]) -> dict[str, Any]:
    """Per-stage in/kept/rejected-by-reason and busy seconds, summed over the committed shards."""
    rejected_by: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: Counter[str] = Counter()
    total_in = kept = rejected = 0
    for shard in shards:
        marker = json.loads(_marker(run_dir, shard.id).read_text())
        total_in += marker["rows"]
        kept += marker["kept"]
        rejected += marker["rejected"]
        for stage, reasons in marker["rejected_by_stage"].items():
            rejected_by[stage].update(reasons)
        seconds.update(marker["seconds"])
    unknown = set(rejected_by) - {INPUT_STAGE, *stage_names}
    if unknown:
        raise AccountingError(f"rows rejected by stages not in the spec: {sorted(unknown)}")
    stages = []
    flowing = total_in
    for name in [INPUT_STAGE, *stage_names]:
        reasons = dict(sorted(rejected_by[name].items(), key=lambda kv: -kv[1]))
        n_rejected = sum(reasons.values())
        stages.append({"stage": name, "in": flowing, "kept": flowing - n_rejected, "rejected": n_rejected,
                       "rejected_by_reason": reasons, "busy_seconds": round(seconds.get(name, 0.0), 3)})
        flowing -= n_rejected
    return {"in": total_in, "kept": kept, "rejected": rejected, "stages": stages}


def check_accounting(run_dir: Path, shards: list[Shard], counts: dict[str, Any]) -> None:
    """Fail loudly unless every input row is in dataset/ or rejected/ exactly once."""
    problems = []
    planned = sum(s.rows for s in shards)
    if counts["in"] != planned:
        problems.append(f"committed shards hold {counts['in']} input rows, the input has {planned}")
    if counts["in"] != counts["kept"] + counts["rejected"]:
        problems.append(f"in {counts['in']} != kept {counts['kept']} + rejected {counts['rejected']}")
    for stage in counts["stages"]:
        if stage["in"] != stage["kept"] + stage["rejected"] or stage["kept"] < 0:
            problems.append(f"stage {stage['stage']}: in {stage['in']} != kept {stage['kept']} + rejected {stage['rejected']}")
    if counts["stages"] and counts["stages"][-1]["kept"] != counts["kept"]:
        problems.append(f"last stage kept {counts['stages'][-1]['kept']} but {counts['kept']} rows are kept")
    uids: list[str] = []
    for directory, expected in ((DATASET_DIR, counts["kept"]), (REJECTED_DIR, counts["rejected"])):
        files = sorted((run_dir / directory).glob("part-*.parquet"))
        on_disk = [pq.read_table(f, columns=[C.UID]).column(C.UID) for f in files]
        n = sum(len(c) for c in on_disk)
        if n != expected:
            problems.append(f"{directory}/ holds {n} rows, the commit markers say {expected}")
        for col in on_disk:
            uids.extend(col.to_pylist())
    if len(set(uids)) != len(uids):
        problems.append(f"{len(uids) - len(set(uids))} uids appear more than once across dataset/ and rejected/")
    if len(set(uids)) != planned:
        problems.append(f"{len(set(uids))} distinct uids in the outputs for {planned} input rows")
    if problems:
        raise AccountingError(f"accounting failed for {run_dir}:\n  " + "\n  ".join(problems))


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
