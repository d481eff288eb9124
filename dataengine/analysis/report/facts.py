"""What a run report shows, read from a run directory as plain data (no HTML here).

Everything comes from the run's own files: `run.json` (funnel, LLM usage), `dataset/` and
`rejected/` (scores, samples, duplicates, conversations), `_state/decision-*.json` (quantile cuts),
`train/stageN/` (curves, benchmark scores). Only the small columns of every row are loaded (uid,
scores, outcome); captions, URLs, conversations and images are read for the ~100 rows shown, in one
pass over the row groups that hold them, so a report over millions of rows stays quick.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from dataengine.analysis.query import scan
from dataengine.core import columns as C
from dataengine.core.layout import DATASET_DIR, MANIFEST, METRICS_FILE, REJECTED_DIR, RESULT_FILE, STATE_DIR, TRAIN_DIR
from dataengine.core.plugins import REPORT_SECTIONS, registered
from dataengine.engine.runner import reason_families
from dataengine.io.imaging import ImageOptions, ImageRejected, process_image
from dataengine.ops import get_op, list_ops
from dataengine.ops.base import Score

KEPT, REJECTED_HERE, REJECTED_LATER = "kept", "rejected here", "rejected later"
GRID_KEPT, GRID_PER_REASON, GRID_REJECTED = 12, 3, 36
DEDUP_GROUPS, DEDUP_PER_GROUP = 8, 4
CONVERSATIONS_PER_TYPE, CONVERSATION_TYPES = 1, 4
HISTOGRAM_BINS = 30
THUMBNAIL = ImageOptions(image_size=128, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                         encode_format="jpeg", encode_quality=80)
DETAIL_COLUMNS = (C.URL, C.CAPTION, C.CAPTION_BEST, C.CONVERSATIONS, C.IMAGE)


def _score_of(op: str) -> Score | None:
    """The filter's score (`Op.score`) as its op declares it; None for other and unknown ops."""
    return get_op(op).score if op in list_ops() else None


def gather(run_dir: str | Path) -> dict[str, Any]:
    """Every section's data for `run_dir` (a finished or stopped run)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    rows = _metadata(run_dir)
    spec_stages = (manifest.get("spec") or {}).get("stages", [])
    names = (manifest.get("stage_names") or ["input"])[1:]
    stages = list(zip(names, spec_stages))
    kept, rejected = _pick_samples(rows)
    dedup = _pick_dedup(rows)
    talks = _pick_conversations(rows)
    wanted = {*kept[C.UID], *rejected[C.UID], *dedup.contaminated[C.UID], *talks[C.UID]}
    wanted |= {uid for original, copies in dedup.groups for uid in (original, *copies[C.UID])}
    details = read_details(run_dir, wanted)
    return {
        "run": _overview(run_dir, manifest),
        "funnel": funnel(manifest),
        "scores": [plot for i in range(len(stages)) if (plot := score_histogram(run_dir, rows, i, stages)) is not None],
        "samples": {"kept": _cards(kept, details), "rejected": _cards(rejected, details)},
        "dedup": _dedup_section(rows, dedup, details),
        "conversations": _conversation_cards(talks, details),
        "llm": llm_usage(manifest, rows, stages),
        "training": training(run_dir),
        "sections": plugin_sections(run_dir),
    }


def _overview(run_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    attempts = manifest.get("attempts") or []
    return {"name": manifest.get("name"), "dir": str(run_dir.resolve()), "status": manifest.get("status"),
            "spec_hash": manifest.get("spec_hash"), "started_at": manifest.get("started_at"),
            "ended_at": manifest.get("ended_at"), "attempts": len(attempts),
            "seconds": round(sum(a.get("seconds") or 0 for a in attempts), 1),
            "totals": manifest.get("totals") or {"in": 0, "kept": 0, "rejected": 0},
            "description": (manifest.get("spec") or {}).get("description"),
            "versions": manifest.get("versions") or {}}


def _metadata(run_dir: Path) -> pl.DataFrame:
    """The small columns of every row (no text, no images): kept rows with a null reject stage, then rejected ones."""
    frames = scan(run_dir, include_images=False)
    kept = frames["dataset"].with_columns(pl.lit(None, pl.String).alias(C.REJECT_STAGE),
                                          pl.lit(None, pl.String).alias(C.REJECT_REASON))
    wanted = [C.UID, C.CLIP_SCORE, C.TEXT_PPL, C.WEB_CAPTION_ITM, C.INSTRUCTION_TYPE, C.LLM_MODEL,
              C.LLM_PROMPT_TOKENS, C.LLM_COMPLETION_TOKENS, C.LLM_COST_USD, C.LLM_CACHED, C.REJECT_STAGE,
              C.REJECT_REASON]
    return pl.concat([kept.select(wanted), frames["rejected"].select(wanted)]).collect()


def funnel(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in and out of every stage, with rejections by reason (row-naming reasons as one family)."""
    return [{"stage": s["stage"], "in": s["in"], "kept": s["kept"], "rejected": s["rejected"],
             "seconds": s.get("busy_seconds", 0.0), "reasons": reason_families(s.get("rejected_by_reason") or {})}
            for s in manifest.get("stages") or []]


# ---- score histograms ---------------------------------------------------------------------------------

def score_histogram(run_dir: Path, rows: pl.DataFrame, index: int,
                    stages: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """Counts of stage `index`'s scores per bin over the rows that reached it, split into kept / rejected
    by it / rejected later, with its cut on a bin edge."""
    name, stage = stages[index]
    plot = _score_of(stage["op"])
    if plot is None:
        return None
    later = [n for n, _ in stages[index + 1:]]
    reached = pl.col(C.REJECT_STAGE).is_null() | pl.col(C.REJECT_STAGE).is_in([name, *later])
    scored = rows.filter(reached & pl.col(plot.column).is_not_null() & pl.col(plot.column).is_finite())
    if plot.log_scale:
        scored = scored.filter(pl.col(plot.column) > 0)
    if scored.is_empty():
        return None
    threshold, rule = _threshold(run_dir, index, stage, plot)
    values = scored[plot.column].cast(pl.Float64).to_numpy()
    axis = np.log10(values) if plot.log_scale else values
    cut = None
    if threshold is not None and math.isfinite(threshold) and (threshold > 0 or not plot.log_scale):
        cut = math.log10(threshold) if plot.log_scale else threshold
    edges = bin_edges(float(axis.min()), float(axis.max()), cut)
    if cut is not None and not plot.higher_is_better:  # `> max` rejects: a score on the cut is kept, left of it
        axis = np.where(axis == cut, np.nextafter(cut, -np.inf), axis)
    outcome = np.where(scored[C.REJECT_STAGE].is_null().to_numpy(), KEPT,
                       np.where((scored[C.REJECT_STAGE] == name).fill_null(False).to_numpy(),
                                REJECTED_HERE, REJECTED_LATER))
    counts = {kind: np.histogram(axis[outcome == kind], bins=edges)[0].tolist()
              for kind in (KEPT, REJECTED_HERE, REJECTED_LATER)}
    notes = [plot.note] if plot.note else []
    rewritten_by = [n for n, s in stages[index + 1:] if (later := _score_of(s["op"])) is not None
                    and later.column == plot.column]
    if rewritten_by:
        notes.append(f"rows that reached {rewritten_by[-1]} carry its {plot.column}, not this stage's")
    return {"stage": name, "op": stage["op"], "column": plot.column, "label": plot.label, "log_scale": plot.log_scale,
            "edges": edges, "counts": counts, "threshold": cut, "threshold_value": threshold, "rule": rule,
            "rows": int(values.size), "median": float(np.median(values)), "notes": notes,
            "higher_is_better": plot.higher_is_better}


def bin_edges(low: float, high: float, cut: float | None, bins: int = HISTOGRAM_BINS) -> list[float]:
    """About `bins` equal bins covering [low, high] (and the cut), with the cut exactly on an edge, so no
    bar mixes rows on both sides of it."""
    if cut is not None:
        low, high = min(low, cut), max(high, cut)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    if cut is None:
        return np.linspace(low, high, bins + 1).tolist()
    edges = [cut + width * k for k in range(-math.ceil((cut - low) / width), math.ceil((high - cut) / width) + 1)]
    if edges[0] > low:  # rounding
        edges.insert(0, edges[0] - width)
    if edges[-1] <= high:  # a score on the cut belongs right of it, not in a last bin closed at the cut
        edges.append(edges[-1] + width)
    return edges


def _threshold(run_dir: Path, index: int, stage: dict[str, Any], plot: Score) -> tuple[float | None, str]:
    """The cut the stage applied: its absolute threshold, or the score its quantile decision stopped at."""
    if stage.get(plot.threshold_field) is not None:
        value = float(stage[plot.threshold_field])
        return value, f"{plot.threshold_field} = {value:g}"
    fraction = stage.get(plot.fraction_field) if plot.fraction_field else None
    if fraction is None:
        return None, "no threshold (scores only)"
    decision_path = run_dir / STATE_DIR / f"decision-{index}.json"
    decision = json.loads(decision_path.read_text()) if decision_path.is_file() else {}
    score = decision.get("score")
    rule = f"{plot.fraction_field} = {fraction:g}"
    if score is None:
        return None, f"{rule} (not decided yet)"
    return float(score), f"{rule}: cut at {float(score):.4g}"


# ---- rows shown: picked from the small columns, then read in one pass ----------------------------------

def _pick(frame: pl.DataFrame, n: int) -> pl.DataFrame:
    """`n` rows spread evenly over the frame's uid order: the same rows on every report of a run."""
    frame = frame.sort(C.UID)
    if frame.height <= n:
        return frame
    return frame[np.linspace(0, frame.height - 1, n).round().astype(int).tolist()]


def _pick_samples(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Kept rows spread over the run, and a few rejected rows per reason family (most common first)."""
    kept = _pick(rows.filter(pl.col(C.REJECT_STAGE).is_null()), GRID_KEPT)
    rejected = rows.filter(pl.col(C.REJECT_STAGE).is_not_null()).with_columns(
        pl.col(C.REJECT_REASON).str.replace(r"^(duplicate_of|contaminates):.*$", "$1:*").alias("family"))
    families = rejected.group_by("family").len().sort(["len", "family"], descending=[True, False])["family"]
    picked = []
    for family in families:
        picked.append(_pick(rejected.filter(pl.col("family") == family), GRID_PER_REASON))
        if sum(p.height for p in picked) >= GRID_REJECTED:
            break
    return kept, (pl.concat(picked) if picked else rejected.head(0)).drop("family")


class DedupPick(NamedTuple):
    groups: list[tuple[str, pl.DataFrame]]  # the largest groups: (original uid, its copies)
    duplicates: int  # rows rejected as copies, in all
    groups_total: int
    contaminated: pl.DataFrame  # the decontamination hits shown
    contaminated_total: int


def _pick_dedup(rows: pl.DataFrame) -> DedupPick:
    """The largest duplicate groups and a few decontamination hits."""
    reasons = pl.col(C.REJECT_REASON).fill_null("")
    copies = rows.filter(reasons.str.starts_with("duplicate_of:")).with_columns(
        reasons.str.strip_prefix("duplicate_of:").alias("original"))
    sizes = copies.group_by("original").len().sort(["len", "original"], descending=[True, False])
    groups = [(original, copies.filter(pl.col("original") == original).sort(C.UID))
              for original in sizes.head(DEDUP_GROUPS)["original"]]
    contaminated = rows.filter(reasons.str.starts_with("contaminates:"))
    return DedupPick(groups, copies.height, sizes.height, _pick(contaminated, DEDUP_GROUPS), contaminated.height)


def _pick_conversations(rows: pl.DataFrame) -> pl.DataFrame:
    """One kept row per instruction type (a few types)."""
    kept = rows.filter(pl.col(C.REJECT_STAGE).is_null() & pl.col(C.INSTRUCTION_TYPE).is_not_null())
    picked = [_pick(kept.filter(pl.col(C.INSTRUCTION_TYPE) == kind), CONVERSATIONS_PER_TYPE)
              for kind in sorted(kept[C.INSTRUCTION_TYPE].unique())[:CONVERSATION_TYPES]]
    return pl.concat(picked) if picked else kept.head(0)


def read_details(run_dir: Path, uids: set[str]) -> dict[str, dict[str, Any]]:
    """uid -> caption, URL, conversations and image thumbnail for the given rows: one pass over the
    part files, reading the big columns only of the row groups that hold a wanted row."""
    found: dict[str, dict[str, Any]] = {}
    for directory in (DATASET_DIR, REJECTED_DIR):
        for path in sorted((run_dir / directory).glob("part-*.parquet")):
            if len(found) == len(uids):
                return found
            parquet = pq.ParquetFile(path)
            columns = [c for c in DETAIL_COLUMNS if c in parquet.schema_arrow.names]
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=[C.UID]).column(C.UID).to_pylist()
                hits = [i for i, uid in enumerate(ids) if uid in uids]
                if not hits:
                    continue
                table = parquet.read_row_group(group, columns=columns).take(hits)
                for uid, row in zip((ids[i] for i in hits), table.to_pylist()):
                    row[C.IMAGE] = thumbnail(row.get(C.IMAGE))
                    found[uid] = row
    return found


def thumbnail(data: bytes | None) -> str | None:
    """A small JPEG data URI of encoded image bytes (the downloader's decoder and its pixel guard), or
    None if they do not decode."""
    if not data:
        return None
    try:
        small = process_image(data, THUMBNAIL)
    except ImageRejected:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(small.data).decode("ascii")


def _card(row: dict[str, Any], details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    more = details.get(row[C.UID], {})
    caption, best = more.get(C.CAPTION), more.get(C.CAPTION_BEST)
    return {"uid": row[C.UID], "image": more.get(C.IMAGE), "caption": caption,
            "caption_best": best if best and best != caption else None, "url": more.get(C.URL),
            "stage": row.get(C.REJECT_STAGE), "reason": row.get(C.REJECT_REASON),
            "outcome": "rejected" if row.get(C.REJECT_STAGE) else "kept",
            "clip_score": row.get(C.CLIP_SCORE), "text_ppl": row.get(C.TEXT_PPL)}


def _cards(frame: pl.DataFrame, details: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [_card(row, details) for row in frame.iter_rows(named=True)]


def _dedup_section(rows: pl.DataFrame, dedup: DedupPick, details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    wanted = [o for o, _ in dedup.groups]
    originals = {r[C.UID]: r for r in rows.filter(pl.col(C.UID).is_in(wanted)).iter_rows(named=True)}
    return {"duplicates": dedup.duplicates, "groups_total": dedup.groups_total,
            "groups": [{"original": _card(originals.get(o, {C.UID: o}), details),
                        "copies": _cards(copies.head(DEDUP_PER_GROUP), details), "size": copies.height}
                       for o, copies in dedup.groups],
            "contaminated_total": dedup.contaminated_total, "contaminated": _cards(dedup.contaminated, details)}


def _conversation_cards(talks: pl.DataFrame, details: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in talks.iter_rows(named=True):
        try:
            turns = json.loads(details.get(row[C.UID], {}).get(C.CONVERSATIONS))
        except (TypeError, json.JSONDecodeError):
            continue
        out.append(_card(row, details) | {
            "type": row[C.INSTRUCTION_TYPE], "model": row.get(C.LLM_MODEL),
            "turns": [{"role": "user" if t.get("from") == "human" else "assistant",
                       "text": str(t.get("value", "")).replace("<image>", "").strip()} for t in turns]})
    return out


# ---- LLM, training, plugins ------------------------------------------------------------------------------

def llm_usage(manifest: dict[str, Any], rows: pl.DataFrame, stages: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What the run paid its LLM (every request, failed attempts included) and what the kept rows cost."""
    backends = [stage.get("backend") for _, stage in stages if stage["op"] == "llava_synthesis_mapper"]
    by_model = (rows.filter(pl.col(C.LLM_MODEL).is_not_null())
                .group_by(C.LLM_MODEL)
                .agg(pl.len().alias("rows"), pl.col(C.LLM_PROMPT_TOKENS).sum().alias("prompt_tokens"),
                     pl.col(C.LLM_COMPLETION_TOKENS).sum().alias("completion_tokens"),
                     pl.col(C.LLM_COST_USD).sum().alias("cost_usd"),
                     pl.col(C.LLM_CACHED).fill_null(False).sum().alias("cached"),
                     pl.col(C.REJECT_STAGE).is_null().sum().alias("kept"))
                .sort(C.LLM_MODEL))
    return {"backends": backends, "paid": manifest.get("llm_usage"), "by_model": by_model.to_dicts()}


def training(run_dir: Path) -> list[dict[str, Any]]:
    """Per trained stage: the loss/lr curve, the result summary and its benchmark scores."""
    stages = []
    for stage_dir in sorted((run_dir / TRAIN_DIR).glob("stage*")):
        metrics_path, result_path = stage_dir / METRICS_FILE, stage_dir / RESULT_FILE
        curve, restarts = _curve(metrics_path.read_text().splitlines() if metrics_path.is_file() else [])
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        stages.append({"stage": stage_dir.name, "curve": curve, "result": result, "restarts": restarts,
                       "finished": result is not None})
    return stages


def _curve(lines: list[str]) -> tuple[list[dict[str, Any]], int]:
    """The steps of the attempt that counts, and how many restarts there were: a step number going back
    means a restart from a checkpoint, and the earlier attempt's steps from there on were thrown away."""
    curve: list[dict[str, Any]] = []
    restarts = 0
    for line in lines:
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn last line of a killed run
        if curve and step <= curve[-1]["step"]:
            restarts += 1
            curve = [r for r in curve if r["step"] < step]
        curve.append(record | {"step": step, "loss": loss})
    return curve, restarts


def plugin_sections(run_dir: Path) -> list[dict[str, Any]]:
    """The sections plugins add (`dataengine.core.plugins.REPORT_SECTIONS`) that have something for this run."""
    found = []
    for name, section in sorted(registered(REPORT_SECTIONS).items()):
        facts = section.facts(run_dir)
        if facts:
            found.append({"id": name, "section": section, "facts": facts})
    return found
