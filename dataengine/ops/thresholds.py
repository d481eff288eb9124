"""Quantile decisions for barrier filters: keep the top (or bottom) fraction by a score, exactly.

"Keep the top 30%" must keep exactly round(0.3 * n) rows even when scores tie, and the same rows on
every rerun: rows are ranked by score, then by uid, and the decision stores the last kept
(score, uid) pair. Applying it needs no global state beyond those two values.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from dataengine.core import columns as C
from dataengine.ops.base import Quantile


def at_most_one(config: Any, *fields: str) -> None:
    """Raise unless at most one of `fields` is set on `config` (an absolute or a quantile threshold)."""
    chosen = [f for f in fields if getattr(config, f) is not None]
    if len(chosen) > 1:
        raise ValueError(f"set {' or '.join(fields)}, not both")


def rank_fraction_decision(scores: pa.Table, column: str, fraction: float, highest: bool) -> dict[str, Any]:
    """Decide the cut that keeps round(fraction * n) of the rows in `scores` (uid + `column`)."""
    n = scores.num_rows
    keep = int(np.floor(fraction * n + 0.5))
    decision: dict[str, Any] = {"column": column, "fraction": fraction, "highest": highest, "rows": n, "keep": keep,
                                "score": None, "uid": None}
    if keep == 0:
        return decision
    values = np.asarray(scores.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
    uids = np.asarray(scores.column(C.UID).to_pylist(), dtype=object)
    order = np.lexsort((uids, -values if highest else values))  # last key sorts first
    last = order[keep - 1]
    decision.update(score=float(values[last]), uid=str(uids[last]))
    return decision


def within_fraction(batch: pa.Table, decision: dict[str, Any]) -> np.ndarray:
    """Which rows of `batch` the decision keeps."""
    n = batch.num_rows
    if decision["keep"] == 0 or decision["score"] is None:
        return np.zeros(n, dtype=bool)
    values = np.asarray(batch.column(decision["column"]).to_numpy(zero_copy_only=False), dtype=np.float64)
    uids = np.asarray(batch.column(C.UID).to_pylist(), dtype=object)
    cut, cut_uid = decision["score"], decision["uid"]
    better = values > cut if decision["highest"] else values < cut
    return better | ((values == cut) & (uids <= cut_uid))


class KeepFractionBarrier:
    """Barrier half of a score filter that can keep a fraction of rows (mix into an `Op`).

    The filter's `score` (`dataengine.ops.base.Score`) names the column, the config field holding the
    fraction and the direction; `not_kept_reason` is the reason for rows outside the kept fraction
    (formatted with the fraction).
    """

    score: ClassVar[Any]
    not_kept_reason: ClassVar[str]

    @classmethod
    def _fraction(cls, config: Any) -> float | None:
        return getattr(config, cls.score.fraction_field)

    @classmethod
    def is_barrier(cls, config: Any) -> bool:
        return cls._fraction(config) is not None

    @classmethod
    def decision_columns(cls, config: Any) -> list[str]:
        return [cls.score.column]

    @classmethod
    def quantile(cls, config: Any) -> Quantile | None:
        fraction = cls._fraction(config)
        return Quantile(cls.score.column, fraction, cls.score.higher_is_better) if fraction is not None else None

    @classmethod
    def decide(cls, config: Any, scores: pa.Table) -> dict[str, Any]:
        return rank_fraction_decision(scores, cls.score.column, cls._fraction(config), cls.score.higher_is_better)

    @classmethod
    def apply_decision(cls, config: Any, batch: pa.Table, decision: dict[str, Any]) -> pa.Table:
        reason = cls.not_kept_reason.format(cls._fraction(config))
        keep = within_fraction(batch, decision)
        return pa.table({C.REJECT_REASON: pa.array([None if k else reason for k in keep], pa.string())})
