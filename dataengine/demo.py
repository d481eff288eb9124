"""`dataengine demo`: the whole engine on the synthetic web, scored against its truth.

Builds (or reuses) the synthetic web next to the demo spec's input path, serves it on 127.0.0.1,
writes the URL list where the spec reads it, runs the spec, and scores the run: did the download
stage reject exactly the broken URLs, and with the right reason?
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
from dataengine.spec import load_spec
from dataengine.synthweb import SynthWebServer, build_synthweb, write_url_list

log = logging.getLogger(__name__)
SCORES_FILE = "demo_scores.json"


def score_download(run_dir: Path, truth: pl.DataFrame, stage: str = "download") -> dict[str, Any]:
    """Precision/recall of "rejected at download" against the truth's `broken`, and reason agreement."""
    frames = scan(run_dir, include_images=False)
    outcome = pl.concat([
        frames["dataset"].select(C.SOURCE_ID, reason=pl.lit(None, pl.String)).collect(),
        frames["rejected"].filter(pl.col(C.REJECT_STAGE) == stage)
        .select(C.SOURCE_ID, reason=pl.col(C.REJECT_REASON)).collect(),
    ])
    joined = truth.join(outcome, left_on="id", right_on=C.SOURCE_ID, how="inner")
    predicted = joined["reason"].is_not_null()
    actual = joined["broken"]
    tp = int((predicted & actual).sum())
    fp = int((predicted & ~actual).sum())
    fn = int((~predicted & actual).sum())
    same_reason = int((joined.filter(actual & predicted)["reason"] == joined.filter(actual & predicted)["expected_reason"]).sum())
    by_kind = (joined.group_by("url_kind")
               .agg(n=pl.len(), rejected=pl.col("reason").is_not_null().sum(),
                    reasons=pl.col("reason").drop_nulls().unique().sort())
               .sort("url_kind"))
    return {
        "stage": stage, "rows": joined.height, "true_positives": tp, "false_positives": fp, "false_negatives": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
        "reason_agreement": same_reason / tp if tp else 1.0,
        "by_url_kind": [{**r, "reasons": list(r["reasons"])} for r in by_kind.to_dicts()],
    }


def format_scores(scores: dict[str, Any]) -> str:
    lines = [f"download stage vs truth ({scores['rows']} rows): precision {scores['precision']:.3f}, "
             f"recall {scores['recall']:.3f}, right reason {scores['reason_agreement']:.1%} of true rejections",
             f"  {'url kind':<12}{'rows':>6}{'rejected':>10}  reasons"]
    for row in scores["by_url_kind"]:
        lines.append(f"  {row['url_kind']:<12}{row['n']:>6}{row['rejected']:>10}  {', '.join(row['reasons'])}")
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
    with SynthWebServer(web_dir) as server:
        urls = write_url_list(web_dir, server.base_url)
        if urls.resolve() != input_path.resolve():
            shutil.copyfile(urls, input_path)
        print(f"serving it at {server.base_url}; running {spec_path} ...", flush=True)
        result = run_pipeline(spec, output=run_dir)
    truth = pl.read_parquet(web_dir / "truth.parquet")
    scores = score_download(result.run_dir, truth)
    (result.run_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2))
    print()
    print(format_summary(result.manifest))
    print()
    print(format_scores(scores))
    print(f"\noutputs in {result.run_dir}: dataset/ (kept), rejected/ (with reasons), run.json, {SCORES_FILE}")
    print(f'try: dataengine query {run_dir} "SELECT reject_reason, COUNT(*) AS n FROM rejected GROUP BY 1 ORDER BY n DESC"')
    return 0
