"""What workers write while a segment streams: rejected rows as they fall out, alive rows at the end.

A row rejected by a stage leaves the stream right there: the worker writes it to a `rejected-*` part
of its shard, already as `rejected/` holds it and puts in its place one *tally* row per shard and stage (no uid, the count and the
shed rows' busy seconds), so later stages, model batches included, carry alive rows only, and the
driver still learns how many rows of a shard came back. At the end of the segment a worker writes
the alive rows: `kept-*` parts, already in the sample schema, in the last segment (committing moves
them into `dataset/` unchanged), `rows-*` parts before a barrier (the next segment reads them).

A part's name is a hash of its uids, so a retried task that writes the same rows again overwrites
its own part; a retry that batched differently is caught at commit (every uid exactly once).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.atomic import write_parquet_atomic
from dataengine.core.schemas import conform, rejected_schema, sample_schema

REJECTED_PART, KEPT_PART, ROWS_PART = "rejected", "kept", "rows"
COUNTERS_METADATA = b"dataengine.counters"  # a kept part's busy seconds and batches per stage index
SUMMARY_SHARD, SUMMARY_PART, SUMMARY_ROWS, SUMMARY_REJECTED = "shard", "part", "rows", "rejected"
SUMMARY_COMMITTED = "committed"  # the task that wrote every part of the shard committed it too


def part_name(kind: str, uids: list[str]) -> str:
    return f"{kind}-{hashlib.sha1(chr(10).join(sorted(uids)).encode()).hexdigest()[:20]}.parquet"


def is_tally(batch: pa.Table) -> np.ndarray:
    if C.TALLY not in batch.column_names:
        return np.zeros(batch.num_rows, dtype=bool)
    return pc.is_valid(batch.column(C.TALLY)).to_numpy(zero_copy_only=False)


def shed_rejected(batch: pa.Table, parts_dir: str, held: list[pa.Table] | None = None) -> pa.Table:
    """Write the rows a step just rejected to their shards' `rejected-*` parts (or, with `held`, keep
    them there for `write_rejected`: a task running several steps writes one part per shard); return
    the alive rows and the tally rows (earlier ones, and one per shard and stage for the rows shed now)."""
    if C.REJECT_REASON not in batch.column_names:
        return batch
    tally = is_tally(batch)
    dead = pc.is_valid(batch.column(C.REJECT_REASON)).to_numpy(zero_copy_only=False) & ~tally
    if not dead.any():
        return batch
    shed = batch.filter(pa.array(dead)).drop_columns([c for c in (C.TALLY,) if c in batch.column_names])
    if held is None:
        write_rejected([shed], parts_dir)
    else:
        held.append(shed)
    counter_columns = [c for c in batch.column_names if c.startswith(tuple(C.STAGE_COUNTERS.values()))]
    tallies = []
    for shard in pc.unique(shed.column(C.SHARD)).to_pylist():
        rows = shed.filter(pc.equal(shed.column(C.SHARD), shard))
        for stage in pc.unique(rows.column(C.REJECT_STAGE)).to_pylist():
            of_stage = rows.filter(pc.equal(rows.column(C.REJECT_STAGE), stage))
            entry = {C.SHARD: shard, C.REJECT_STAGE: stage, C.REJECT_REASON: C.TALLY, C.TALLY: of_stage.num_rows}
            entry.update({c: float(pc.sum(of_stage.column(c)).as_py() or 0.0) for c in counter_columns})
            tallies.append(entry)
    kept = batch.filter(pa.array(~dead))
    if C.TALLY not in kept.column_names:
        kept = kept.append_column(C.TALLY, pa.nulls(kept.num_rows, pa.int64()))
    fields = {name: kept.schema.field(name).type for name in tallies[0]}
    new = pa.table({name: pa.array([t.get(name) for t in tallies], fields[name]) for name in fields})
    return pa.concat_tables([kept, new], promote_options="permissive")


def write_rejected(tables: list[pa.Table], parts_dir: str) -> None:
    """Rejected rows as `rejected/` holds them, one part per shard: the commit moves a part there as
    written (no second read and write of rejected rows)."""
    if not tables:
        return
    rows = pa.concat_tables(tables, promote_options="permissive")
    for shard in pc.unique(rows.column(C.SHARD)).to_pylist():
        of_shard = rows.filter(pc.equal(rows.column(C.SHARD), shard))
        write_parquet_atomic(_as_final(of_shard, rejected_schema()),
                             Path(parts_dir) / shard / part_name(REJECTED_PART, of_shard.column(C.UID).to_pylist()))


def write_alive(batch: pa.Table, parts_dir: str, final: bool) -> pa.Table:
    """Write the alive rows of a batch, one part per shard; return one summary row per shard: rows
    that came back (alive + tallied), rejected per stage (JSON), and the part's name."""
    tally = is_tally(batch)
    shards, parts, counts, rejected = [], [], [], []
    for shard in pc.unique(batch.column(C.SHARD)).to_pylist():
        in_shard = pc.equal(batch.column(C.SHARD), shard).to_numpy(zero_copy_only=False)
        alive = batch.filter(pa.array(in_shard & ~tally))
        tallies = batch.filter(pa.array(in_shard & tally))
        by_stage: dict[str, int] = {}
        if tallies.num_rows:
            for stage, n in zip(tallies.column(C.REJECT_STAGE).to_pylist(), tallies.column(C.TALLY).to_pylist()):
                by_stage[stage] = by_stage.get(stage, 0) + n
        name = ""
        if alive.num_rows:
            alive = alive.sort_by(C.UID).drop_columns([c for c in (C.TALLY,) if c in alive.column_names])
            name = part_name(KEPT_PART if final else ROWS_PART, alive.column(C.UID).to_pylist())
            table = _as_kept(alive) if final else alive
            write_parquet_atomic(table, Path(parts_dir) / shard / name)
        shards.append(shard), parts.append(name), counts.append(alive.num_rows + sum(by_stage.values()))
        rejected.append(json.dumps(by_stage))
    return pa.table({SUMMARY_SHARD: pa.array(shards, pa.string()), SUMMARY_PART: pa.array(parts, pa.string()),
                     SUMMARY_ROWS: pa.array(counts, pa.int64()), SUMMARY_REJECTED: pa.array(rejected, pa.string())})


def _as_kept(alive: pa.Table) -> pa.Table:
    """Alive rows as `dataset/` holds them."""
    return _as_final(alive.drop_columns([c for c in (C.REJECT_STAGE, C.REJECT_REASON) if c in alive.column_names]),
                     sample_schema())


def _as_final(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows in `schema`, sorted by uid, with their busy seconds and batches per stage kept in the file's
    metadata (the columns themselves are internal)."""
    final = conform(rows, schema).sort_by(C.UID)
    metadata = {**(final.schema.metadata or {}), COUNTERS_METADATA: json.dumps(counter_sums(rows)).encode()}
    return final.replace_schema_metadata(metadata)


def counter_sums(table: pa.Table) -> dict[str, dict[str, float]]:
    """{"seconds": {stage index: sum}, "batches": {...}} over the table's counter columns."""
    sums: dict[str, dict[str, float]] = {name: {} for name in C.STAGE_COUNTERS}
    for name, prefix in C.STAGE_COUNTERS.items():
        for c in table.column_names:
            if c.startswith(prefix):
                sums[name][c.removeprefix(prefix)] = float(pc.sum(table.column(c)).as_py() or 0.0)
    return sums


def part_counters(path: Path) -> dict[str, dict[str, float]]:
    """Busy seconds and batches per stage index a part's rows account for: from a kept part's metadata,
    else from its counter columns."""
    schema = pq.read_schema(path)
    if schema.metadata and COUNTERS_METADATA in schema.metadata:
        return json.loads(schema.metadata[COUNTERS_METADATA])
    columns = [c for c in schema.names if c.startswith(tuple(C.STAGE_COUNTERS.values()))]
    return counter_sums(pq.read_table(path, columns=columns)) if columns else {name: {} for name in C.STAGE_COUNTERS}


def read_columns(files: list[str], columns: list[str]) -> pa.Table:
    """`columns` of the part files, read by what each file has: an optional column some files lack
    (`clip_score` before a dedup) comes back null for their rows, and absent from all files, absent."""
    tables = [pq.read_table(f, columns=[c for c in columns if c in set(pq.read_schema(f).names)]) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
