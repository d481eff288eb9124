"""What a run report shows, read from a run directory as plain data (no HTML here).

Everything comes from the run's own files: `run.json` (funnel, LLM usage), `dataset/` and
`rejected/` (scores, samples, duplicates, conversations), `_state/decision-*.json` (quantile cuts),
`train/stageN/` (curves, benchmark scores). Images are read only for the rows shown, row group by
row group, so a report over millions of rows reads a few hundred images, not the whole run.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from dataengine import columns as C
from dataengine.query import scan
from dataengine.runner import DATASET_DIR, MANIFEST, REJECTED_DIR, STATE_DIR, reason_families

KEPT, REJECTED_HERE, REJECTED_LATER = "kept", "rejected here", "rejected later"
GRID_KEPT, GRID_PER_REASON, GRID_REJECTED = 12, 3, 36
DEDUP_GROUPS, DEDUP_PER_GROUP = 8, 4
CONVERSATIONS_PER_TYPE, CONVERSATION_TYPES = 1, 4
HISTOGRAM_BINS = 30
THUMBNAIL_PX = 128
TRAIN_DIR = "train"


@dataclass(frozen=True)
class ScorePlot:
    """How to draw one filter's score: its column, where its threshold lives, which side is kept."""

    column: str
    label: str
    threshold_field: str
    fraction_field: str | None
    higher_is_better: bool
    log_scale: bool


SCORE_PLOTS = {
    "clip_score_filter": ScorePlot(C.CLIP_SCORE, "CLIP image-text cosine similarity", "min_score",
                                   "keep_top_fraction", True, False),
    "perplexity_filter": ScorePlot(C.TEXT_PPL, "caption perplexity (log scale)", "max_ppl",
                                   "keep_lowest_fraction", False, True),
    "capfilt_filter": ScorePlot(C.WEB_CAPTION_ITM, "ITM match probability of the web caption", "threshold",
                                None, True, False),
}


def gather(run_dir: str | Path) -> dict[str, Any]:
    """Every section's data for `run_dir` (a finished or stopped run)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    rows = _metadata(run_dir)
    stages = list(zip(manifest.get("stage_names", ["input"])[1:], manifest["spec"]["stages"]))
    return {
        "run": _overview(run_dir, manifest),
        "funnel": funnel(manifest),
        "scores": [plot for i, (name, stage) in enumerate(stages)
                   if (plot := score_histogram(run_dir, rows, i, name, stage)) is not None],
        "samples": samples(run_dir, rows),
        "dedup": dedup_groups(run_dir, rows),
        "conversations": conversations(run_dir, rows),
        "llm": llm_usage(manifest, rows, stages),
        "training": training(run_dir),
        "demo": demo_checks(run_dir),
    }


def _overview(run_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    attempts = manifest.get("attempts") or []
    return {"name": manifest.get("name"), "dir": str(run_dir.resolve()), "status": manifest.get("status"),
            "spec_hash": manifest.get("spec_hash"), "started_at": manifest.get("started_at"),
            "ended_at": manifest.get("ended_at"), "attempts": len(attempts),
            "seconds": round(sum(a.get("seconds") or 0 for a in attempts), 1),
            "totals": manifest.get("totals") or {"in": 0, "kept": 0, "rejected": 0},
            "description": manifest["spec"].get("description"), "versions": manifest.get("versions", {})}


def _metadata(run_dir: Path) -> pl.DataFrame:
    """Every row of the run without images: kept rows with a null reject stage, then rejected ones."""
    frames = scan(run_dir, include_images=False)
    kept = frames["dataset"].with_columns(pl.lit(None, pl.String).alias(C.REJECT_STAGE),
                                          pl.lit(None, pl.String).alias(C.REJECT_REASON))
    wanted = [C.UID, C.URL, C.CAPTION, C.CAPTION_BEST, C.CLIP_SCORE, C.TEXT_PPL, C.WEB_CAPTION_ITM,
              C.INSTRUCTION_TYPE, C.LLM_MODEL, C.LLM_PROMPT_TOKENS, C.LLM_COMPLETION_TOKENS,
              C.LLM_COST_USD, C.LLM_CACHED, C.REJECT_STAGE, C.REJECT_REASON]
    return pl.concat([kept.select(wanted), frames["rejected"].select(wanted)]).collect()


def funnel(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in and out of every stage, with rejections by reason (row-naming reasons as one family)."""
    return [{"stage": s["stage"], "in": s["in"], "kept": s["kept"], "rejected": s["rejected"],
             "seconds": s.get("busy_seconds", 0.0), "reasons": reason_families(s["rejected_by_reason"])}
            for s in manifest.get("stages", [])]


def score_histogram(run_dir: Path, rows: pl.DataFrame, index: int, name: str,
                    stage: dict[str, Any]) -> dict[str, Any] | None:
    """Counts of a filter's scores per bin, split into kept / rejected by it / rejected later, and its cut."""
    plot = SCORE_PLOTS.get(stage["op"])
    if plot is None:
        return None
    scored = rows.filter(pl.col(plot.column).is_not_null() & pl.col(plot.column).is_finite())
    if plot.log_scale:
        scored = scored.filter(pl.col(plot.column) > 0)
    if scored.is_empty():
        return None
    threshold, rule = _threshold(run_dir, index, stage, plot)
    values = scored[plot.column].cast(pl.Float64).to_numpy()
    axis = np.log10(values) if plot.log_scale else values
    cut = (math.log10(threshold) if plot.log_scale and threshold and threshold > 0 else threshold)
    low, high = float(axis.min()), float(axis.max())
    if cut is not None:
        low, high = min(low, cut), max(high, cut)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    outcome = np.where(scored[C.REJECT_STAGE].is_null().to_numpy(), KEPT,
                       np.where((scored[C.REJECT_STAGE] == name).fill_null(False).to_numpy(),
                                REJECTED_HERE, REJECTED_LATER))
    counts = {kind: np.histogram(axis[outcome == kind], bins=edges)[0].tolist()
              for kind in (KEPT, REJECTED_HERE, REJECTED_LATER)}
    return {"stage": name, "op": stage["op"], "column": plot.column, "label": plot.label, "log_scale": plot.log_scale,
            "edges": edges.tolist(), "counts": counts, "threshold": cut, "threshold_value": threshold, "rule": rule,
            "rows": int(values.size), "median": float(np.median(values)),
            "higher_is_better": plot.higher_is_better}


def _threshold(run_dir: Path, index: int, stage: dict[str, Any], plot: ScorePlot) -> tuple[float | None, str]:
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
    return (float(score), f"{rule}: cut at {score:.4g}") if score is not None else (None, f"{rule} (not decided yet)")


def thumbnail(data: bytes | None) -> str | None:
    """A small JPEG data URI of encoded image bytes, or None if they do not decode."""
    if not data:
        return None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_thumbnails(run_dir: Path, uids: set[str]) -> dict[str, str | None]:
    """uid -> thumbnail for the given rows, reading only the row groups that hold them."""
    found: dict[str, str | None] = {}
    if not uids:
        return found
    for directory in (DATASET_DIR, REJECTED_DIR):
        for path in sorted((run_dir / directory).glob("part-*.parquet")):
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=[C.UID]).column(C.UID).to_pylist()
                hits = [i for i, uid in enumerate(ids) if uid in uids]
                if not hits:
                    continue
                images = parquet.read_row_group(group, columns=[C.IMAGE]).column(C.IMAGE)
                for i in hits:
                    found[ids[i]] = thumbnail(images[i].as_py())
    return found


def _pick(frame: pl.DataFrame, n: int) -> pl.DataFrame:
    """`n` rows spread evenly over the frame's uid order: the same rows on every report of a run."""
    frame = frame.sort(C.UID)
    if frame.height <= n:
        return frame
    return frame[np.linspace(0, frame.height - 1, n).round().astype(int).tolist()]


def samples(run_dir: Path, rows: pl.DataFrame) -> dict[str, Any]:
    """Kept rows, and rejected rows a few per reason (most common reasons first)."""
    kept = _pick(rows.filter(pl.col(C.REJECT_STAGE).is_null()), GRID_KEPT)
    rejected = rows.filter(pl.col(C.REJECT_STAGE).is_not_null()).with_columns(
        pl.col(C.REJECT_REASON).str.replace(r"^(duplicate_of|contaminates):.*$", "$1:*").alias("family"))
    families = rejected.group_by("family").len().sort(["len", "family"], descending=[True, False])["family"]
    picked = []
    for family in families:
        picked.append(_pick(rejected.filter(pl.col("family") == family), GRID_PER_REASON))
        if sum(p.height for p in picked) >= GRID_REJECTED:
            break
    chosen = pl.concat(picked) if picked else rejected.head(0)
    thumbs = read_thumbnails(run_dir, set(kept[C.UID]) | set(chosen[C.UID]))
    return {"kept": [_card(r, thumbs) for r in kept.iter_rows(named=True)],
            "rejected": [_card(r, thumbs) for r in chosen.iter_rows(named=True)]}


def _card(row: dict[str, Any], thumbs: dict[str, str | None]) -> dict[str, Any]:
    best = row.get(C.CAPTION_BEST)
    return {"uid": row[C.UID], "image": thumbs.get(row[C.UID]), "caption": row.get(C.CAPTION),
            "caption_best": best if best and best != row.get(C.CAPTION) else None, "url": row.get(C.URL),
            "stage": row.get(C.REJECT_STAGE), "reason": row.get(C.REJECT_REASON),
            "clip_score": row.get(C.CLIP_SCORE), "text_ppl": row.get(C.TEXT_PPL)}


def dedup_groups(run_dir: Path, rows: pl.DataFrame) -> dict[str, Any]:
    """The largest duplicate groups (the row kept first, its copies after) and decontamination hits."""
    reasons = pl.col(C.REJECT_REASON).fill_null("")
    copies = rows.filter(reasons.str.starts_with("duplicate_of:")).with_columns(
        reasons.str.strip_prefix("duplicate_of:").alias("original"))
    sizes = copies.group_by("original").len().sort(["len", "original"], descending=[True, False])
    originals = sizes.head(DEDUP_GROUPS)["original"].to_list()
    contaminated = _pick(rows.filter(reasons.str.starts_with("contaminates:")), DEDUP_GROUPS)
    members = {o: copies.filter(pl.col("original") == o).sort(C.UID).head(DEDUP_PER_GROUP) for o in originals}
    by_uid = {r[C.UID]: r for r in rows.filter(pl.col(C.UID).is_in(originals)).iter_rows(named=True)}
    uids = set(originals) | {u for m in members.values() for u in m[C.UID]} | set(contaminated[C.UID])
    thumbs = read_thumbnails(run_dir, uids)
    groups = []
    for original in originals:
        head = by_uid.get(original, {C.UID: original})
        groups.append({"original": _card(head, thumbs), "copies": [_card(r, thumbs) for r in members[original].iter_rows(named=True)],
                       "size": int(sizes.filter(pl.col("original") == original)["len"][0])})
    return {"duplicates": copies.height, "groups_total": sizes.height, "groups": groups,
            "contaminated_total": int(rows.filter(reasons.str.starts_with("contaminates:")).height),
            "contaminated": [_card(r, thumbs) for r in contaminated.iter_rows(named=True)]}


def conversations(run_dir: Path, rows: pl.DataFrame) -> list[dict[str, Any]]:
    """A few kept synthesized conversations, one per instruction type (the text read for those rows only)."""
    kept = rows.filter(pl.col(C.REJECT_STAGE).is_null() & pl.col(C.INSTRUCTION_TYPE).is_not_null())
    picked = [_pick(kept.filter(pl.col(C.INSTRUCTION_TYPE) == kind), CONVERSATIONS_PER_TYPE)
              for kind in sorted(kept[C.INSTRUCTION_TYPE].unique())[:CONVERSATION_TYPES]]
    chosen = pl.concat(picked) if picked else kept.head(0)
    texts = dict(scan(run_dir, include_images=False)["dataset"].filter(pl.col(C.UID).is_in(chosen[C.UID].to_list()))
                 .select(C.UID, C.CONVERSATIONS).collect().iter_rows())
    thumbs = read_thumbnails(run_dir, set(chosen[C.UID]))
    out = []
    for row in chosen.iter_rows(named=True):
        try:
            turns = json.loads(texts.get(row[C.UID]))
        except (TypeError, json.JSONDecodeError):
            continue
        out.append(_card(row, thumbs) | {
            "type": row[C.INSTRUCTION_TYPE], "model": row.get(C.LLM_MODEL),
            "turns": [{"role": "user" if t.get("from") == "human" else "assistant",
                       "text": str(t.get("value", "")).replace("<image>", "").strip()} for t in turns]})
    return out


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
        metrics_path, result_path = stage_dir / "metrics.jsonl", stage_dir / "result.json"
        steps = []
        if metrics_path.is_file():
            for line in metrics_path.read_text().splitlines():
                try:
                    steps.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
        # a restarted run rewrites steps after its checkpoint: the last record of each step is the one kept
        curve = sorted({int(s["step"]): s for s in steps if "step" in s and "loss" in s}.values(), key=lambda s: s["step"])
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        stages.append({"stage": stage_dir.name, "curve": curve, "result": result,
                       "restarts": len(steps) - len(curve), "finished": result is not None})
    return stages


def demo_checks(run_dir: Path) -> dict[str, Any] | None:
    """The demo's own files, when this run is a demo: each filter scored against the synthetic web's
    ground truth, CapFilt's outcome on mismatched captions, and curated vs unfiltered training."""
    from dataengine.demo import CAPFILT_FILE, SCORES_FILE, TRAINING_FILE

    found = {key: json.loads((run_dir / name).read_text()) for key, name in
             (("scores", SCORES_FILE), ("capfilt", CAPFILT_FILE), ("training", TRAINING_FILE))
             if (run_dir / name).is_file()}
    return found or None
