"""Quantile decisions for barrier filters: keep the top (or bottom) fraction by a score, exactly.

"Keep the top 30%" must keep exactly round(0.3 * n) rows even when scores tie, and the same rows on
every rerun: rows are ranked by score, then by uid, and the decision stores the last kept
(score, uid) pair. Applying it needs no global state beyond those two values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dataengine import columns as C


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
