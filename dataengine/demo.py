"""`dataengine demo`: the whole engine on the synthetic web, scored against its truth.

Builds (or reuses) the synthetic web next to the demo spec's input path, serves it on 127.0.0.1,
writes the URL list where the spec reads it, trains (once, cached) the demo's tiny CLIP and LM,
runs the spec, and scores every stage against the truth: did the download stage reject exactly
the broken URLs, the caption filters the gibberish and boilerplate, CLIP the mismatched captions,
dedup the planted copies?
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import polars as pl

from dataengine import columns as C
from dataengine.query import scan
from dataengine.runner import MANIFEST, RunError, format_summary, run_pipeline
from dataengine.models import DEMO_PREFIX
from dataengine.spec import load_spec
from dataengine.synthweb import SynthWebServer, build_synthweb, write_url_list
from dataengine.synthweb import build as T  # the truth table's column names
from dataengine.synthweb.models import ensure_demo_models

log = logging.getLogger(__name__)
SCORES_FILE = "demo_scores.json"


# What each stage should reject, by the synthetic web's truth (rows that reach the stage only).
NOISY_TEXT = ["gibberish", "boilerplate"]
STAGE_TRUTH = {
    "download": ("broken URLs", pl.col(T.BROKEN)),
    "caption_rules_filter": ("gibberish + boilerplate captions", pl.col(T.CAPTION_NOISE).is_in(NOISY_TEXT)),
    "perplexity_filter": ("gibberish + boilerplate captions", pl.col(T.CAPTION_NOISE).is_in(NOISY_TEXT)),
    "clip_score_filter": ("mismatched captions", pl.col(T.CAPTION_NOISE) == "mismatched"),
}


def _outcomes(run_dir: Path, truth: pl.DataFrame) -> pl.DataFrame:
    frames = scan(run_dir, include_images=False)
    outcome = pl.concat([
        frames["dataset"].select(C.SOURCE_ID, stage=pl.lit(None, pl.String), reason=pl.lit(None, pl.String)).collect(),
        frames["rejected"].select(C.SOURCE_ID, stage=pl.col(C.REJECT_STAGE), reason=pl.col(C.REJECT_REASON)).collect(),
    ])
    return truth.join(outcome, left_on=T.ID, right_on=C.SOURCE_ID, how="inner")


def _precision_recall(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0}


def score_stages(run_dir: Path, truth: pl.DataFrame, stage_names: list[str]) -> list[dict[str, Any]]:
    """For every stage the truth can judge: precision and recall of its rejections among the rows it saw."""
    joined = _outcomes(run_dir, truth)
    order = {name: i for i, name in enumerate(stage_names)}
    joined = joined.with_columns(rejected_at=pl.col("stage").replace_strict(order, default=len(order), return_dtype=pl.Int64))
    scores = []
    for name in stage_names:
        seen = joined.filter(pl.col("rejected_at") >= order[name])
        predicted = seen["stage"] == name
        if name == "dedup":
            scores.append({"stage": name, "rows": seen.height, "truth": "planted copies", **_dedup_scores(seen, predicted)})
            continue
        if name not in STAGE_TRUTH:
            continue
        label, expression = STAGE_TRUTH[name]
        actual = seen.select(expression).to_series()
        entry = {"stage": name, "rows": seen.height, "truth": label,
                 **_precision_recall(int((predicted & actual).sum()), int((predicted & ~actual).sum()),
                                     int((~predicted & actual).sum()))}
        if name == "download":
            hits = seen.filter(predicted & actual)
            entry["reason_agreement"] = float((hits["reason"] == hits[T.EXPECTED_REASON_COL]).mean()) if hits.height else 1.0
            entry["by_url_kind"] = [
                {**r, "reasons": list(r["reasons"])} for r in
                seen.group_by(T.URL_KIND).agg(n=pl.len(), rejected=(pl.col("stage") == name).sum(),
                                              reasons=pl.col("reason").filter(pl.col("stage") == name).unique().sort())
                .sort(T.URL_KIND).to_dicts()]
        scores.append(entry)
    return scores


def _dedup_scores(seen: pl.DataFrame, predicted: pl.Series) -> dict[str, Any]:
    """A planted family (a source and its copies) with k members at dedup should lose k - 1 of them."""
    family = pl.coalesce(pl.col(T.DUPLICATE_OF), pl.col(T.ID))
    seen = seen.with_columns(family=family, predicted=predicted)
    sizes = seen.group_by("family").agg(size=pl.len())
    seen = seen.join(sizes, on="family")
    expected = int(sizes.select((pl.col("size") - 1).clip(lower_bound=0).sum()).item())
    tp = int(seen.filter(pl.col("predicted") & (pl.col("size") > 1)).height)
    fp = int(seen.filter(pl.col("predicted") & (pl.col("size") == 1)).height)
    return _precision_recall(tp, fp, max(0, expected - tp))


def format_scores(scores: list[dict[str, Any]]) -> str:
    lines = [f"  {'stage':<22}{'rows seen':>10}{'rejected':>10}{'precision':>11}{'recall':>8}  judged against"]
    for entry in scores:
        rejected = entry["true_positives"] + entry["false_positives"]
        lines.append(f"  {entry['stage']:<22}{entry['rows']:>10}{rejected:>10}{entry['precision']:>11.3f}"
                     f"{entry['recall']:>8.3f}  {entry['truth']}")
    download = next((e for e in scores if e["stage"] == "download"), None)
    if download:
        lines.append(f"  download: right reason for {download['reason_agreement']:.1%} of true rejections")
    return "\n".join(lines)


def run_demo(n: int = 1000, seed: int = 0, spec_path: Path = Path("pipelines/demo.yaml"), output: str | None = None) -> int:
    spec = load_spec(spec_path)
    input_path = Path(spec.input.path)
    web_dir = input_path.parent
    run_dir = Path(output or spec.output)
    if run_dir.exists():
        if not (run_dir / MANIFEST).exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir} exists and is not a run directory; refusing to replace it")
        shutil.rmtree(run_dir)  # the synthetic web's port changes every time, so each demo is a new run
    print(f"building the synthetic web ({n} items, seed {seed}) in {web_dir} ...", flush=True)
    build_synthweb(web_dir, n=n, seed=seed)
    if any(str(getattr(stage, "model", "")).startswith(DEMO_PREFIX) for stage in spec.stages):
        print("demo models (trained once on clean synthetic pairs, then cached) ...", flush=True)
        ensure_demo_models()
    with SynthWebServer(web_dir) as server:
        urls = write_url_list(web_dir, server.base_url)
        if urls.resolve() != input_path.resolve():
            shutil.copyfile(urls, input_path)
        print(f"serving it at {server.base_url}; running {spec_path} ...", flush=True)
        result = run_pipeline(spec, output=run_dir)
    truth = pl.read_parquet(web_dir / T.TRUTH_FILE)
    scores = score_stages(result.run_dir, truth, result.manifest["stage_names"])
    (result.run_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2))
    print()
    print(format_summary(result.manifest))
    print("\nevery stage against the synthetic web's truth:")
    print(format_scores(scores))
    print(f"\noutputs in {result.run_dir}: dataset/ (kept), rejected/ (with reasons), run.json, {SCORES_FILE}")
    print(f'try: dataengine query {run_dir} "SELECT reject_reason, COUNT(*) AS n FROM rejected GROUP BY 1 ORDER BY n DESC"')
    return 0
