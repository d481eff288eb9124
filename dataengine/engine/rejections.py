"""A barrier decision's `rejected` map (uid -> reason) on disk: Parquet, one file per shard, under the
decision's folder, so that neither the driver nor the tasks' arguments carry it; each task applying the
decision reads the files of its own shards."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.atomic import write_parquet_atomic

REJECTED = "rejected"  # a decision's uid -> reason map, when it has one
PARQUET = "parquet"  # in a saved decision: where that map's per-shard Parquet files are (under the run)


def write_rejected(rejected: pa.Table | None, out_dir: Path) -> None:
    """`rejected` (uid, shard, reject_reason) as one Parquet file per shard under `out_dir`, replaced whole."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if rejected is None or not rejected.num_rows:
        return
    rejected = rejected.sort_by([(C.SHARD, "ascending"), (C.UID, "ascending")])
    shards = rejected.column(C.SHARD).to_pylist()
    starts = [i for i in range(len(shards)) if i == 0 or shards[i] != shards[i - 1]] + [len(shards)]
    for start, end in zip(starts[:-1], starts[1:]):  # each shard's rows are one slice: one pass, not one per shard
        write_parquet_atomic(rejected.slice(start, end - start).select([C.UID, C.REJECT_REASON]),
                             out_dir / f"{shards[start]}.parquet")


def resolve(decision: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """A saved decision with its Parquet reference made absolute, for the tasks that apply it."""
    ref = decision.get(REJECTED)
    if isinstance(ref, dict) and PARQUET in ref:
        return {**decision, REJECTED: {PARQUET: str(state_dir / ref[PARQUET])}}
    return decision


_LOADED: dict[tuple[str, str], dict[str, str]] = {}


def for_batch(decision: dict[str, Any], batch: pa.Table) -> dict[str, Any]:
    """The decision as `Op.apply_decision` takes it: a Parquet `rejected` map read for the batch's shards
    (kept per worker process: a shard's batches come one after another)."""
    ref = decision.get(REJECTED)
    if not (isinstance(ref, dict) and PARQUET in ref):
        return decision
    rejected: dict[str, str] = {}
    for shard in pc.unique(batch.column(C.SHARD)).to_pylist():
        key = (ref[PARQUET], shard)
        if key not in _LOADED:
            path = Path(ref[PARQUET]) / f"{shard}.parquet"
            table = pq.read_table(path) if path.exists() else None
            _LOADED[key] = dict(zip(table.column(C.UID).to_pylist(), table.column(C.REJECT_REASON).to_pylist())) \
                if table is not None else {}
            if len(_LOADED) > 64:
                _LOADED.pop(next(iter(_LOADED)))
        rejected.update(_LOADED[key])
    return {**decision, REJECTED: rejected}
