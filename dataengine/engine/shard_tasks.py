"""A shard's work in one Ray task: read it, run the steps that need no model, write its parts, commit.

Used two ways, both set up by the engine's Ray adapter (`raydata.py`): alone, as plain Ray tasks
(`raydata.shard_tasks`), for a segment whose every step runs here (caption filters, a download,
rules, a decision applied); and as the first operator of a Ray Data stream that goes on to model
actors (`raydata.build_stream`). This module imports no Ray: a worker that runs only these tasks
starts ~1 s sooner than one that imports the adapter (Ray Data and pandas unimported).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dataengine.core import columns as C
from dataengine.engine import rejections
from dataengine.engine.commit import ShardCommits
from dataengine.engine.parts import SUMMARY_COMMITTED, shed_rejected, write_alive, write_rejected
from dataengine.io.shard_plan import read_shard
from dataengine.ops import get_op
from dataengine.ops.base import PREPARE, Step, run_step

SHARD_FILES = "files"  # in a read task's input row: the files of its shard
SHARD_INDEX = "shard_index"  # in a read task's input row, with `committing`: which of its shards it reads

#: reading a shard's files and writing its parts wait on the disk more than they compute; asking a whole
#: CPU would stall a small cluster whose model actors hold the rest (1 CPU: an actor at 0.5 and a read at 1)
IO_TASK_CPUS = 0.25

_TASK_OPS: dict[tuple, Any] = {}


def run_task_step(batch: pa.Table, step: Step, schema: pa.Schema, parts_dir: str, shed: bool = True) -> pa.Table:
    """Task body for stateless ops, model stages' CPU halves and decisions (an op object or preparer is
    cached per worker process); the rows the step rejects leave the stream here (`shed`), or, in the
    read task, once its batches are back together."""
    op = None
    if step.decision is None:
        key = (step.index, step.phase, step.config.model_dump_json(), repr(step.config.__pydantic_private__))
        op = _TASK_OPS.get(key)
        if op is None:
            op_class = get_op(step.config.op)
            op = _TASK_OPS[key] = op_class.preparer(step.config) if step.phase == PREPARE else op_class(step.config)
    else:
        step = Step(step.index, step.config, rejections.for_batch(step.decision, batch))
    out = run_step(step, op, batch, schema)
    return shed_rejected(out, parts_dir) if shed else out


def read_inputs(batch: pa.Table) -> pa.Table:
    """Read task: a shard's files (the input shard, or the rows a previous segment kept), without the
    busy seconds and batch counts that segment already accounted for."""
    tables = []
    for files in batch.column(SHARD_FILES).to_pylist():
        for f in files:
            table = read_shard(f)
            counters = tuple(C.STAGE_COUNTERS.values())
            tables.append(table.drop_columns([c for c in table.column_names if c.startswith(counters)]))
    return pa.concat_tables(tables, promote_options="permissive")


def read_and_run(batch: pa.Table, steps: list[Step], schema: pa.Schema, parts_dir: str,
                  final: bool | None, committing: ShardCommits | None = None) -> pa.Table:
    """Read task: a shard, then the steps that need no model over it in their batch sizes, in this one
    task (one process per shard, as a plain script would: no hop through the object store between them),
    and, when no model stage follows (`final` is not None), its alive rows written here too; with
    `committing`, the shard is committed here as well (no commit task, no round trip to the driver)."""
    shard = committing.shards[batch.column(SHARD_INDEX)[0].as_py()] if committing is not None else None
    if committing is not None and shard is not None:
        marker = committing.marker(shard)
        if marker is not None:  # a retried task whose shard is committed: nothing to redo
            return committing.summary(shard, marker)
    table = read_inputs(batch)
    held: list[pa.Table] = []  # every step's rejected rows leave in one part per shard, not one per batch or step
    for step in steps:
        size = step.config.batch_size
        outputs = [run_task_step(table.slice(i, size), step, schema, parts_dir, shed=False)
                   for i in range(0, table.num_rows, size)]
        table = shed_rejected(pa.concat_tables(outputs, promote_options="permissive"), parts_dir, held) \
            if outputs else table
    write_rejected(held, parts_dir)
    if final is None:
        return table
    summary = write_alive(table, parts_dir, final)
    if committing is not None and shard is not None:
        done = committing.commit(shard) is not None  # None: not every uid came back (the driver says so)
        summary = summary.append_column(SUMMARY_COMMITTED, pa.array([done] * summary.num_rows))
    return summary


def shard_task(batch: pa.Table, shared: tuple[list[Step], pa.Schema, str], final: bool,
                committing: ShardCommits | None) -> pa.Table:
    steps, schema, parts_dir = shared  # put in the object store once per segment, not once per shard
    return read_and_run(batch, steps, schema, parts_dir, final, committing)
