"""Every input row kept or rejected exactly once: per-stage counts from the commit markers, checked
against the files on disk through their Parquet footers (the driver reads no rows: each commit already
checked its shard uid by uid, and shards hold disjoint uids by construction)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dataengine.core.layout import DATASET_DIR, REJECTED_DIR
from dataengine.engine.commit import AccountingError
from dataengine.engine.segments import Segment
from dataengine.io.shard_plan import INPUT_STAGE, Shard


def final_markers(run_dir: Path, final: Segment, shards: list[Shard]) -> list[dict[str, Any]]:
    return [json.loads(final.marker(run_dir, s.id).read_text()) for s in shards]


def aggregate_counts(markers: list[dict[str, Any]], stage_names: list[str],
                     batch_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Per-stage in/kept/rejected-by-reason and busy seconds, summed over the committed shards; for the
    model stages in `batch_sizes`, the batches they ran and how full those were on average (rows in /
    (batches x batch size): rejected rows leave the stream, so a model batch holds alive rows)."""
    rejected_by: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: Counter[str] = Counter()
    batches: Counter[str] = Counter()
    total_in = kept = rejected = 0
    for marker in markers:
        total_in += marker["rows"]
        kept += marker["kept"]
        rejected += marker["rejected"]
        for stage, reasons in marker["rejected_by_stage"].items():
            rejected_by[stage].update(reasons)
        seconds.update(marker["seconds"])
        batches.update(marker.get("batches") or {})
    unknown = set(rejected_by) - {INPUT_STAGE, *stage_names}
    if unknown:
        raise AccountingError(f"rows rejected by stages not in the spec: {sorted(unknown)}")
    stages = []
    flowing = total_in
    for name in [INPUT_STAGE, *stage_names]:
        reasons = dict(sorted(rejected_by[name].items(), key=lambda kv: -kv[1]))
        n_rejected = sum(reasons.values())
        stage = {"stage": name, "in": flowing, "kept": flowing - n_rejected, "rejected": n_rejected,
                 "rejected_by_reason": reasons, "busy_seconds": round(seconds.get(name, 0.0), 3)}
        n_batches = round(batches.get(name, 0.0))
        if batch_sizes and name in batch_sizes and n_batches:
            stage.update(batches=n_batches, mean_batch_fill=round(flowing / (n_batches * batch_sizes[name]), 4))
        stages.append(stage)
        flowing -= n_rejected
    return {"in": total_in, "kept": kept, "rejected": rejected, "stages": stages}


def check_accounting(run_dir: Path, shards: list[Shard], markers: list[dict[str, Any]], counts: dict[str, Any]) -> None:
    """Fail loudly unless the markers add up and `dataset/` and `rejected/` hold exactly the files they
    list, with the row counts they say."""
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
    for directory, key, count in ((DATASET_DIR, "dataset_files", "kept"), (REJECTED_DIR, "rejected_files", "rejected")):
        listed = {f for m in markers for f in m[key]}
        on_disk = {f"{directory}/{p.name}" for p in (run_dir / directory).glob("part-*.parquet")}
        if listed - on_disk:
            problems.append(f"{len(listed - on_disk)} files the commit markers list are missing from {directory}/ "
                            f"(e.g. {sorted(listed - on_disk)[:3]})")
        if on_disk - listed:
            problems.append(f"{directory}/ holds {len(on_disk - listed)} files no commit lists "
                            f"(e.g. {sorted(on_disk - listed)[:3]})")
        rows = sum(pq.read_metadata(run_dir / f).num_rows for f in listed & on_disk)
        expected = sum(m[count] for m in markers)
        if rows != expected:
            problems.append(f"{directory}/ holds {rows} rows, the commit markers say {expected}")
    if problems:
        raise AccountingError(f"accounting failed for {run_dir}:\n  " + "\n  ".join(problems))
