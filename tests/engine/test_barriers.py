"""Barrier decisions in tasks: a rank cut found from counts is the one a sort of every row gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.core import columns as C
from dataengine.engine import barriers
from dataengine.ops.base import Quantile
from dataengine.ops.thresholds import rank_fraction_decision


def _files(tmp_path, scores, uids, per_file):
    files = []
    for k in range(0, len(scores), per_file):
        path = tmp_path / f"part-{k}.parquet"
        pq.write_table(pa.table({C.UID: uids[k:k + per_file], C.CLIP_SCORE: pa.array(scores[k:k + per_file], pa.float32())}),
                       path)
        files.append(str(path))
    return files


@pytest.mark.parametrize("highest", [True, False])
@pytest.mark.parametrize("fraction", [0.0001, 0.3, 0.5, 0.97, 1.0])
def test_the_cut_from_counts_is_the_cut_of_a_full_sort(ray_local, tmp_path, monkeypatch, highest, fraction):
    monkeypatch.setattr(barriers, "SETTLE_ROWS", 50)  # force several narrowing rounds on 5,000 rows
    monkeypatch.setattr(barriers, "FILES_PER_TASK", 3)
    rng = np.random.default_rng(1)
    scores = rng.normal(0.3, 0.05, 5000).astype(np.float32)
    scores[::7] = 0.25  # many ties on one value: settled by uid
    uids = [f"{i % 13:04d}-{i:010d}" for i in range(5000)]
    files = _files(tmp_path, scores, uids, 400)
    expected = rank_fraction_decision(pa.table({C.UID: uids, C.CLIP_SCORE: pa.array(scores, pa.float32())}),
                                      C.CLIP_SCORE, fraction, highest)
    assert barriers.quantile_decision(files, Quantile(C.CLIP_SCORE, fraction, highest)) == expected


def test_all_equal_scores_and_a_cut_among_rows_without_a_score(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(barriers, "SETTLE_ROWS", 10)
    uids = [f"0000-{i:010d}" for i in range(300)]
    files = _files(tmp_path, np.full(300, 0.5, np.float32), uids, 100)
    decision = barriers.quantile_decision(files, Quantile(C.CLIP_SCORE, 0.5, True))
    assert decision["keep"] == 150 and decision["uid"] == uids[149] and decision["score"] == 0.5
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({C.UID: ["x", "y"], C.CLIP_SCORE: pa.array([None, 0.9], pa.float32())}), path)
    assert barriers.quantile_decision([str(path)], Quantile(C.CLIP_SCORE, 1.0, True)) is None  # decide() settles it
