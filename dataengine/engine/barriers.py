"""Barrier decisions, made in tasks over the rows the previous segment kept; the driver sees counts.

A rank cut (`keep_top_fraction`, `keep_lowest_fraction`: `Op.quantile`) is found without gathering the
scores: tasks count their scores per bin of the current interval, the driver narrows the interval to
the bin holding the cut, and once few rows are left in it the tasks send just those (uid, score) rows,
which settle the cut exactly, ties broken by uid: the decision `ops.thresholds.rank_fraction_decision`
makes over all rows at once. Near-duplicate grouping (`Op.near_duplicates`) partitions, searches and
groups in tasks (`engine/near_duplicates.py`) above its `exact_max_rows`; other decisions, and small
ones, run `Op.decide` in one task. A decision's `rejected` map (uid -> reason) is written as Parquet, a
file per shard (`engine/rejections.py`), and each task applying it reads the files of its own shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core import raytools
from dataengine.engine import near_duplicates
from dataengine.engine.parts import read_columns
from dataengine.engine.rejections import PARQUET, REJECTED, write_rejected
from dataengine.ops import OpConfig, get_op
from dataengine.ops.base import Quantile

BINS = 1024
#: rows in the cut's interval small enough to send to the driver and sort
SETTLE_ROWS = 100_000
FILES_PER_TASK = 64


def decide(config: OpConfig, files: list[str], out_dir: Path) -> tuple[dict[str, Any], int]:
    """The barrier stage's decision over `files` and the number of rows it saw; a `rejected` map goes to
    Parquet files under `out_dir`."""
    op = get_op(config.op)
    quantile, near = op.quantile(config), op.near_duplicates(config)
    decision = quantile_decision(files, quantile) if quantile is not None else None
    if decision is None and near is not None:
        decision = near_duplicates.decide(near, files, out_dir)
    if decision is not None:
        return decision, decision["rows"]
    return raytools.get(raytools.submit(decide_in_one_task, config, files, str(out_dir)))


def decide_in_one_task(config: OpConfig, files: list[str], out_dir: str) -> tuple[dict[str, Any], int]:
    """Task body: `Op.decide` over uid and the op's decision columns of every row in `files`."""
    op = get_op(config.op)
    wanted = [C.UID, C.SHARD, *op.decision_columns(config)]
    table = read_columns(files, wanted) if files else \
        pa.table({C.UID: pa.array([], pa.string()), C.SHARD: pa.array([], pa.string())})
    decision = op.decide(config, table.drop_columns([C.SHARD]))
    if isinstance(decision.get(REJECTED), dict):
        rejected = decision[REJECTED]
        shard_of = dict(zip(table.column(C.UID).to_pylist(), table.column(C.SHARD).to_pylist()))
        write_rejected(pa.table({C.UID: pa.array(list(rejected), pa.string()),
                                 C.SHARD: pa.array([shard_of[u] for u in rejected], pa.string()),
                                 C.REJECT_REASON: pa.array(list(rejected.values()), pa.string())}), Path(out_dir))
        decision[REJECTED] = {PARQUET: Path(out_dir).name}
    return decision, table.num_rows


def _values(files: list[str], column: str, highest: bool, with_uids: bool = False) -> tuple[np.ndarray, list[str]]:
    """A task's scores, negated for `lowest` so that larger is always better; nulls never count."""
    values, uids = [], []
    for f in files:
        table = pq.read_table(f, columns=[C.UID, column] if with_uids else [column])
        table = table.filter(pa.compute.is_valid(table.column(column)))
        v = np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
        values.append(v if highest else -v)
        if with_uids:
            uids.extend(table.column(C.UID).to_pylist())
    return (np.concatenate(values) if values else np.zeros(0)), uids


def _stats(files: list[str], column: str, highest: bool) -> tuple[int, int, float, float]:
    """Rows, rows with a score, and the range of the scores."""
    v, _ = _values(files, column, highest)
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    return rows, len(v), float(v.min()) if len(v) else math.inf, float(v.max()) if len(v) else -math.inf


def _counts_at_least(files: list[str], column: str, highest: bool, lo: float, hi: float,
                     thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: rows with t <= v <= hi (v >= lo)."""
    v, _ = _values(files, column, highest)
    v = np.sort(v[(v >= lo) & (v <= hi)])
    return len(v) - np.searchsorted(v, thresholds, side="left")


def _rows_between(files: list[str], column: str, highest: bool, lo: float, hi: float) -> tuple[np.ndarray, list[str]]:
    v, uids = _values(files, column, highest, with_uids=True)
    inside = np.flatnonzero((v >= lo) & (v <= hi))
    return v[inside], [uids[i] for i in inside]


def quantile_decision(files: list[str], quantile: Quantile) -> dict[str, Any] | None:
    """`rank_fraction_decision` over every row of `files`, made from counts; None when the cut falls
    among rows without a score (they rank last: `decide` settles that rare case over all rows)."""

    chunks = [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
    column, highest = quantile.column, quantile.highest

    def each(fn: Any, *args: Any) -> list[Any]:
        return raytools.get([raytools.submit(fn, chunk, column, highest, *args) for chunk in chunks])

    stats = each(_stats)
    n, scored = sum(s[0] for s in stats), sum(s[1] for s in stats)
    keep = int(np.floor(quantile.fraction * n + 0.5))
    decision: dict[str, Any] = {"column": column, "fraction": quantile.fraction, "highest": highest, "rows": n,
                                "keep": keep, "score": None, "uid": None}
    if keep == 0:
        return decision
    if keep > scored:
        return None
    lo, hi = min(s[2] for s in stats), max(s[3] for s in stats)
    above, inside = 0, scored  # rows better than the interval [lo, hi], and rows in it
    while inside > SETTLE_ROWS and lo < hi:
        thresholds = np.unique(np.linspace(hi, lo, BINS + 1)[1:])[::-1]  # descending, ending at lo
        counts = np.sum(each(_counts_at_least, lo, hi, thresholds), axis=0)
        k = int(np.argmax(above + counts >= keep))  # the first threshold whose rows reach the cut
        narrowed = (float(thresholds[k]), float(np.nextafter(thresholds[k - 1], -math.inf)) if k else hi)
        if narrowed == (lo, hi):  # ties on one value: the uids settle it
            break
        above += int(counts[k - 1]) if k else 0
        inside = int(counts[k]) - (int(counts[k - 1]) if k else 0)
        lo, hi = narrowed
    rows = each(_rows_between, lo, hi)
    values = np.concatenate([r[0] for r in rows])
    uids = np.asarray([u for r in rows for u in r[1]], dtype=object)
    order = np.lexsort((uids, -values))
    last = order[keep - above - 1]
    decision.update(score=float(values[last] if highest else -values[last]), uid=str(uids[last]))
    return decision
