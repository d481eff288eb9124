"""Commit a shard's segment without rewriting its rows; in the task that wrote them, or a commit task.

The commit checks that the shard's parts hold every uid that entered the segment exactly once (a
retried task that batched differently can write a uid twice: the later copy is dropped) and writes the
marker: counts, busy seconds, the files the shard owns, the move that puts its `rejected-*` part into
`rejected/part-<shard>-s<k>-<hash>.parquet` and, in the last segment, its `kept-*` parts into
`dataset/`: workers wrote both as those directories hold them, so no row is read and written again.
(Where actors shed rows, a shard has a rejected part per batch: those are gathered into one
`rejected/part-<shard>-s<k>.parquet` instead, so `rejected/` keeps one file per shard and segment.)
The marker is the commit point; the moves come after it and are finished by the next run if a kill
interrupts them (`finish_commit`), so a shard is in `dataset/` whole or, with no marker, not at all
(`clear_uncommitted`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.atomic import write_parquet_atomic, write_text_atomic
from dataengine.core.layout import DATASET_DIR, REJECTED_DIR
from dataengine.core.schemas import conform, rejected_schema
from dataengine.engine.parts import (
    COUNTERS_METADATA,
    KEPT_PART,
    REJECTED_PART,
    ROWS_PART,
    SUMMARY_COMMITTED,
    SUMMARY_PART,
    SUMMARY_REJECTED,
    SUMMARY_ROWS,
    SUMMARY_SHARD,
    part_counters,
)
from dataengine.engine.segments import Segment
from dataengine.io.shard_plan import shard_uids


class AccountingError(RuntimeError):
    """Rows were lost or duplicated: in != kept + rejected somewhere. Never ignored."""


def commit_shard(run_dir: str, segment: Segment, shard_id: str, inputs: list[str], previous: dict[str, Any] | None,
                 input_rows: int, stage_names: list[str]) -> dict[str, Any] | None:
    """Commit one shard of `segment`; None when its parts do not hold every input uid yet (a killed
    attempt's half-done shard). `inputs`: the files the segment read for this shard (relative paths)."""
    root = Path(run_dir)
    part_dir = segment.parts_dir(root) / shard_id
    expected = pc.unique(pa.chunked_array([shard_uids(root / f) for f in inputs], pa.string()).combine_chunks())
    files = sorted(part_dir.glob("*.parquet")) if part_dir.is_dir() else []
    seen = _uids(files)
    if len(pc.unique(seen)) != len(seen):  # a retry re-delivered rows (rare): keep the first copy
        _drop_repeats(files)
        files = [p for p in files if p.exists()]
        seen = _uids(files)
    extra = seen.filter(pc.invert(pc.is_in(seen, value_set=expected)))
    if len(extra):
        raise AccountingError(f"shard {shard_id}: {len(extra)} unexpected uids in segment {segment.index} "
                              f"(e.g. {sorted(extra.to_pylist())[:3]})")
    if len(seen) != len(expected):  # every part's uid is expected and none repeats: some are missing
        return None
    files = [p for p in files if p.exists()]
    alive = [p for p in files if p.name.startswith((KEPT_PART, ROWS_PART))]
    shed = [p for p in files if p.name.startswith(REJECTED_PART)]
    marker = _marker(root, segment, shard_id, alive, shed, previous, input_rows, stage_names)
    write_text_atomic(segment.marker(root, shard_id), json.dumps(marker))
    finish_commit(root, segment, shard_id, marker)
    return marker


@dataclass(frozen=True)
class ShardCommit:
    """What committing one shard's segment takes: its id, the files the segment read for it (relative),
    the previous segment's marker, the shard's rows in the input (`rows`) and the rows this segment
    received (`alive`: the previous segment's alive rows, or `rows` in the first)."""

    shard_id: str
    inputs: list[str]
    previous: dict[str, Any] | None
    rows: int
    alive: int


@dataclass(frozen=True)
class ShardCommits:
    """The segment's shards, for the read tasks that write every part of their shard and so can commit
    it where they are (`commit_shard`, the same commit as a commit task's), and tell the driver."""

    run_dir: str
    segment: Segment
    stage_names: list[str]
    shards: list[ShardCommit]

    def marker(self, shard: ShardCommit) -> dict[str, Any] | None:
        return self.segment.read_marker(Path(self.run_dir), shard.shard_id)

    def commit(self, shard: ShardCommit) -> dict[str, Any] | None:
        return commit_shard(self.run_dir, self.segment, shard.shard_id, shard.inputs, shard.previous, shard.rows,
                            self.stage_names)

    def summary(self, shard: ShardCommit, marker: dict[str, Any]) -> pa.Table:
        """The summary row of a shard committed before (a retried task): all its rows back, committed."""
        finish_commit(Path(self.run_dir), self.segment, shard.shard_id, marker)
        return pa.table({SUMMARY_SHARD: [shard.shard_id], SUMMARY_PART: [""], SUMMARY_ROWS: pa.array([shard.alive], pa.int64()),
                         SUMMARY_REJECTED: ["{}"], SUMMARY_COMMITTED: [True]})


def _marker(root: Path, segment: Segment, shard_id: str, alive: list[Path], shed: list[Path],
            previous: dict[str, Any] | None, input_rows: int, stage_names: list[str]) -> dict[str, Any]:
    """Counts and files of the shard so far (this segment added to the previous segment's marker). A
    shard's one rejected part (what a task writes) is moved into `rejected/` after the marker; several (one
    per model batch that shed rows) are gathered into one file here, before it."""
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for stage, by_reason in ((previous or {}).get("rejected_by_stage") or {}).items():
        reasons[stage].update(by_reason)
    counters = {name: Counter((previous or {}).get(name) or {}) for name in C.STAGE_COUNTERS}
    rejected_files = list((previous or {}).get("rejected_files") or [])
    n_rejected = (previous or {}).get("rejected", 0)

    def count(sums: dict[str, dict[str, float]]) -> None:
        for name, by_index in sums.items():
            for index, value in by_index.items():
                counters[name][stage_names[int(index)]] += value

    for path in alive:
        count(part_counters(path))
    rejected_moves = []
    if len(shed) == 1 and _in_final_form(shed[0]):  # as `rejected/` holds it: moved after the marker
        path = shed[0]
        count(part_counters(path))
        rows = pq.read_table(path, columns=[C.REJECT_STAGE, C.REJECT_REASON])
        target = f"{REJECTED_DIR}/part-{shard_id}-s{segment.index}-{path.stem.removeprefix(REJECTED_PART + '-')}.parquet"
        rejected_moves.append([str(path.relative_to(root)), target])
    elif shed:  # parts per model batch (or from an older version): gathered into one file, written here
        for path in shed:
            count(part_counters(path))
        rows = pa.concat_tables([pq.read_table(p) for p in shed], promote_options="permissive")
        rows = conform(rows, rejected_schema()).sort_by(C.UID)
        target = f"{REJECTED_DIR}/part-{shard_id}-s{segment.index}.parquet"
        write_parquet_atomic(rows.replace_schema_metadata(None), root / target)
    if shed:
        for stage, reason in zip(rows.column(C.REJECT_STAGE).to_pylist(), rows.column(C.REJECT_REASON).to_pylist()):
            reasons[stage][reason] += 1
        rejected_files.append(target)
        n_rejected += rows.num_rows
    n_alive = sum(pq.read_metadata(p).num_rows for p in alive)
    relative = [str(p.relative_to(root)) for p in alive]
    marker: dict[str, Any] = {
        "shard": shard_id, "segment": segment.index, "rows": input_rows, "alive": n_alive, "rejected": n_rejected,
        "rejected_by_stage": {s: dict(c) for s, c in reasons.items()},
        **{name: dict(values) for name, values in counters.items()},
        "rejected_files": rejected_files, "rejected_moves": rejected_moves, "committed_at": time.time(),
    }
    if segment.final:
        moves = [[r, f"{DATASET_DIR}/part-{shard_id}-{Path(r).stem.removeprefix(KEPT_PART + '-')}.parquet"]
                 for r in relative]
        marker.update(kept=n_alive, moves=moves, dataset_files=[dst for _, dst in moves])
    else:
        marker["next"] = relative
    return marker


def _in_final_form(path: Path) -> bool:
    """A rejected part written as `rejected/` holds it (its busy seconds in the footer)."""
    metadata = pq.read_schema(path).metadata or {}
    return COUNTERS_METADATA in metadata


def _uids(paths: list[Path]) -> pa.Array:
    """The uid column of every file, as one array (Arrow all the way: a 50k-row shard's check costs
    milliseconds, where Python sets of its uids cost tens of them)."""
    columns = [pq.read_table(p, columns=[C.UID]).column(C.UID) for p in paths]
    return pa.chunked_array([c for column in columns for c in column.chunks], pa.string()).combine_chunks()


def _drop_repeats(files: list[Path]) -> None:
    """Remove from each part the uids an earlier part (in name order) already holds."""
    seen: set[str] = set()
    for path in files:
        uids = pq.read_table(path, columns=[C.UID]).column(C.UID).to_pylist()
        again = seen.intersection(uids)
        if again:
            _drop_uids(path, again)
        seen.update(uids)


def _drop_uids(path: Path, uids: set[str]) -> None:
    table = pq.read_table(path)
    keep = pc.invert(pc.is_in(table.column(C.UID), pa.array(sorted(uids), pa.string())))
    before, table = table.num_rows, table.filter(keep)
    metadata = table.schema.metadata or {}
    if table.num_rows and COUNTERS_METADATA in metadata:  # the footer's busy seconds: for the rows left only
        share = table.num_rows / before
        sums = {name: {k: v * share for k, v in by_index.items()}
                for name, by_index in json.loads(metadata[COUNTERS_METADATA]).items()}
        table = table.replace_schema_metadata({**metadata, COUNTERS_METADATA: json.dumps(sums).encode()})
    if table.num_rows:
        write_parquet_atomic(table, path)
    else:
        path.unlink()


def finish_commit(root: Path, segment: Segment, shard_id: str, marker: dict[str, Any]) -> None:
    """The steps after the marker, each safe to repeat: move kept parts into `dataset/`, remove the
    segment's rejected parts (their rows are in `rejected/` now) and, in the last segment, the parts."""
    for src, dst in marker.get("moves", []) + marker.get("rejected_moves", []):
        if (root / src).exists():
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / src, root / dst)
    part_dir = segment.parts_dir(root) / shard_id
    if segment.final:
        shutil.rmtree(part_dir, ignore_errors=True)
    elif part_dir.is_dir():
        for shed in part_dir.glob(f"{REJECTED_PART}-*.parquet"):
            shed.unlink(missing_ok=True)


def clear_uncommitted(root: Path, segment: Segment, shard_id: str) -> None:
    """Outputs a killed commit may have written before its marker: they belong to no commit."""
    for stray in (root / REJECTED_DIR).glob(f"part-{shard_id}-s{segment.index}[-.]*parquet"):
        stray.unlink()
    if segment.final:
        for stray in (root / DATASET_DIR).glob(f"part-{shard_id}-*.parquet"):
            stray.unlink()
