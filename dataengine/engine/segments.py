"""Segments: the stages that stream together between barriers, and where a segment's files live.

A barrier stage (a decision that needs every row's score, such as a quantile threshold or dedup)
ends a segment; the next segment starts by applying the decision made over the whole previous
segment's output. Each shard is committed once per segment; the last segment's commit is the one
that puts rows into `dataset/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataengine.core.layout import COMMITTED_DIR, PARTS_DIR, STATE_DIR
from dataengine.ops import OpConfig, get_op


@dataclass(frozen=True)
class Segment:
    index: int
    stages: tuple[int, ...]
    decision_of: int | None  # the barrier stage whose decision this segment applies first
    final: bool

    def marker(self, run_dir: Path, shard_id: str) -> Path:
        """The shard's commit marker for this segment: its existence is the commit point."""
        if self.final:
            return Path(run_dir) / COMMITTED_DIR / f"{shard_id}.json"
        return Path(run_dir) / STATE_DIR / f"segment-{self.index}" / f"{shard_id}.json"

    def parts_dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / PARTS_DIR / f"segment-{self.index}"

    def decision_path(self, run_dir: Path) -> Path:
        return Path(run_dir) / STATE_DIR / f"decision-{self.decision_of}.json"

    def read_marker(self, run_dir: Path, shard_id: str) -> dict[str, Any] | None:
        path = self.marker(run_dir, shard_id)
        return json.loads(path.read_text()) if path.exists() else None


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
