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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import polars as pl

from dataengine.analysis.query import scan
from dataengine.analysis.report import write_report
from dataengine.core import columns as C
from dataengine.core import raytools
from dataengine.core.layout import EXPORT_DIR, INIT_DIR, LOG_FILE, MANIFEST, RESULT_FILE, stage_dir
from dataengine.core.progress import note
from dataengine.engine.runner import RunError, RunResult, format_summary, run_pipeline
from dataengine.engine.spec import PipelineSpec, load_spec
from dataengine.eval.train_then_eval import train_run, train_stage2_together
from dataengine.io.export import EXPORT_MANIFEST
from dataengine.testbed.data_comparison import (
    compare,
    downloadable_input,
    format_training,
    training_rows,
    unfiltered_spec,
)
from dataengine.testbed.synthweb import SynthWebServer, build_synthweb, write_url_list
from dataengine.testbed.synthweb import build as T  # the truth table's column names
from dataengine.testbed.synthweb.caption_qa import CaptionQAResponder
from dataengine.testbed.synthweb.llm_server import FakeLLMServer
from dataengine.testbed.synthweb.models import DEMO_PREFIX, ensure_demo_models

log = logging.getLogger(__name__)
SCORES_FILE = "demo_scores.json"
CAPFILT_FILE = "demo_capfilt.json"
TRAINING_FILE = "demo_training.json"


# What each stage should reject, by the synthetic web's truth (rows that reach the stage only).
NOISY_TEXT = ["gibberish", "boilerplate"]
STAGE_TRUTH = {
    "download": ("broken URLs", pl.col(T.BROKEN)),
    "caption_rules_filter": ("gibberish + boilerplate captions", pl.col(T.CAPTION_NOISE).is_in(NOISY_TEXT)),
    "perplexity_filter": ("gibberish + boilerplate captions", pl.col(T.CAPTION_NOISE).is_in(NOISY_TEXT)),
    "clip_score_filter": ("mismatched captions", pl.col(T.CAPTION_NOISE) == "mismatched"),
}
_OUTCOME_COLUMNS = (C.CAPTION, C.CAPTION_BEST, C.CAPTION_BEST_SOURCE)


def scene_pairs(objects: list[dict[str, Any]] | None) -> set[tuple[str, str]]:
    return {(o["colour"], o["kind"]) for o in objects or []}


def caption_is_right(caption: str | None, objects: list[dict[str, Any]] | None) -> bool:
    """A caption is right when it names exactly the image's (colour, shape) pairs."""
    from dataengine.testbed.synthweb.blip_models import colour_shape_pairs

    return caption is not None and colour_shape_pairs(caption) == scene_pairs(objects)


def outcomes(run_dir: Path, truth: pl.DataFrame, names: tuple[str, ...] = _OUTCOME_COLUMNS,
             include_images: bool = False) -> pl.DataFrame:
    """Every row of a run with its end (`stage`, `reason`: null where kept), the run's `names` columns and
    its truth (the truth's own caption dropped: the run's is the one seen)."""
    frames = scan(run_dir, include_images=include_images)
    columns = []
    for name in names:  # columns of stages the spec may not have are null
        columns.append(pl.col(name) if name in frames["dataset"].collect_schema().names() else pl.lit(None, pl.String).alias(name))
    outcome = pl.concat([
        frames["dataset"].select(C.SOURCE_ID, *columns, stage=pl.lit(None, pl.String), reason=pl.lit(None, pl.String)).collect(),
        frames["rejected"].select(C.SOURCE_ID, *columns, stage=pl.col(C.REJECT_STAGE), reason=pl.col(C.REJECT_REASON)).collect(),
    ])
    return truth.drop(C.CAPTION).join(outcome, left_on=T.ID, right_on=C.SOURCE_ID, how="inner")


def capfilt_report(run_dir: Path, truth: pl.DataFrame, stage_names: list[str]) -> dict[str, Any] | None:
    """What CapFilt did to the web captions it saw, by whether they were mismatched (truth)."""
    if "capfilt_filter" not in stage_names:
        return None
    joined = outcomes(run_dir, truth)
    order = stage_names.index("capfilt_filter")
    reached = joined.filter(pl.col("stage").is_null() | pl.col("stage").is_in(stage_names[order:]))
    report: dict[str, Any] = {}
    for label, rows in (("mismatched", reached.filter(pl.col(T.CAPTION_NOISE) == "mismatched")),
                        ("clean", reached.filter(pl.col(T.CAPTION_NOISE) == "none"))):
        counts = {"rows": rows.height, "rejected_no_match": 0, "kept_web": 0, "synthetic_right": 0, "synthetic_wrong": 0}
        for row in rows.iter_rows(named=True):
            if row["stage"] == "capfilt_filter":
                counts["rejected_no_match"] += 1
            elif row[C.CAPTION_BEST_SOURCE] == "web":
                counts["kept_web"] += 1
            elif row[C.CAPTION_BEST_SOURCE] == "synthetic":
                right = caption_is_right(row[C.CAPTION_BEST], row[T.OBJECTS])
                counts["synthetic_right" if right else "synthetic_wrong"] += 1
        report[label] = counts
    return report


def format_capfilt(report: dict[str, Any]) -> str:
    m, c = report["mismatched"], report["clean"]
    share = m["synthetic_right"] / m["rows"] if m["rows"] else 0.0
    return (f"  CapFilt replaced {m['synthetic_right']} of {m['rows']} mismatched web captions with a correct synthetic "
            f"one ({share:.1%}); {m['synthetic_wrong']} got a wrong one, {m['kept_web']} kept the web caption, "
            f"{m['rejected_no_match']} rejected (no caption matched).\n"
            f"  Of {c['rows']} correct web captions: {c['kept_web']} kept, {c['synthetic_right']} replaced by a correct "
            f"synthetic one, {c['synthetic_wrong']} by a wrong one, {c['rejected_no_match']} rejected.")


def _precision_recall(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0}


def score_stages(run_dir: Path, truth: pl.DataFrame, stage_names: list[str]) -> list[dict[str, Any]]:
    """For every stage the truth can judge: precision and recall of its rejections among the rows it saw."""
    joined = outcomes(run_dir, truth)
    order = {name: i for i, name in enumerate(stage_names)}
    joined = joined.with_columns(rejected_at=pl.col("stage").replace_strict(order, default=len(order), return_dtype=pl.Int64))
    scores = []
    for name in stage_names:
        seen = joined.filter(pl.col("rejected_at") >= order[name])
        predicted = (seen["stage"] == name).fill_null(False)  # a kept row (stage null) was not rejected here
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


def _benchmark_before_training(run_dir: Path, spec: PipelineSpec) -> dict[str, Any]:
    """The assembled model's benchmark scores (projector untrained): the floor the stages start from."""
    from dataengine.eval.run_eval import evaluate_model

    return raytools.get(raytools.submit(evaluate_model, str(stage_dir(run_dir, 1) / INIT_DIR), None, 1,
                                        spec.train))["benchmark"]


def with_demo_llm(spec: PipelineSpec, stack: ExitStack) -> PipelineSpec:
    """`spec` with every `openai` stage whose model is a demo one (`synthweb-demo:llm`) pointed at a
    simulated LLM served on 127.0.0.1 for as long as `stack` lasts (`CaptionQAResponder`: it writes
    questions and answers from the captions it is given, as LLaVA's text-only GPT-4 did)."""
    stages, llm = [], None
    for stage in spec.stages:
        endpoint = getattr(stage, "openai", None)
        if endpoint is not None and endpoint.model.startswith(DEMO_PREFIX):
            if llm is None:  # one server for every such stage
                llm = stack.enter_context(FakeLLMServer(CaptionQAResponder()))
                note("simulated LLM (writes Q&A from captions) at %s", llm.base_url)
            stage = stage.model_copy(update={"openai": endpoint.model_copy(update={"base_url": llm.base_url})})
        stages.append(stage)
    return spec.model_copy(update={"stages": stages})


def fresh_run_dir(spec_path: Path, output: str | None = None) -> Path:
    """The demo's run directory, emptied: the synthetic web's port changes every time, so each demo is a
    new run. Refuses a directory that holds something other than a run."""
    run_dir = Path(output or load_spec(spec_path).output)
    if run_dir.exists():
        if not (run_dir / MANIFEST).exists() and any(p.name != LOG_FILE for p in run_dir.iterdir()):
            raise RunError(f"{run_dir} exists and is not a run directory; refusing to replace it")
        shutil.rmtree(run_dir)
    return run_dir


def _train_and_compare(result: RunResult, spec: PipelineSpec) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Train the curated run (`result`) and, when the spec trains stage 2, the unfiltered baseline's stage 2
    beside it; return the untrained model's benchmark and the baseline's results (None without stage 2).

    The baseline's data is made after the curated stage 1, not while it trains: the two compete for the
    CPU the trainer's Ray Data feed needs, and on 2 cores that hung once (Ray Data: "Cluster resources are
    not enough to run any task"). Stage 2 of both sides is trained at the end, the sides at once and
    each side's seeds one after another in one Ray Train run (`train_stage2_together`)."""
    assert spec.train is not None
    run_dir = result.run_dir.resolve()
    first = [stage for stage in spec.train.stages if stage != 2]
    result.manifest["train"] = train_run(run_dir, spec.train, stages=first) if first else {}
    before = _benchmark_before_training(run_dir, spec)
    if 2 not in spec.train.stages:
        return before, None
    rows = json.loads((stage_dir(run_dir, 1) / RESULT_FILE).read_text())["lineage"]["samples"]["train"]
    baseline = unfiltered_spec(spec, run_dir, rows, downloadable_input(spec, run_dir))
    note("the same %d rows' worth of unfiltered data for comparison: %s ...", rows, baseline.output)
    shutil.rmtree(baseline.output, ignore_errors=True)
    run_pipeline(baseline.model_copy(update={"train": None}))  # its data; `baseline.train` trains its stage 2 there
    note("stage 2 under %d seeds on each side (the sides at once, seeds one after another) ...",
         1 + len(spec.train.stage2_seeds))
    curated_stage2, unfiltered = train_stage2_together([(run_dir, spec.train), (Path(baseline.output), baseline.train)])
    result.manifest["train"].update(curated_stage2)
    return before, unfiltered


def run_demo(n: int = 1000, seed: int = 0, spec_path: Path = Path("pipelines/demo.yaml"), output: str | None = None,
             train: bool = True) -> str:
    """Build and serve the synthetic web, run the demo spec into `output` (see `fresh_run_dir`), score it;
    return the closing summary for the CLI to print (progress goes to the console as notes)."""
    spec = load_spec(spec_path)
    if not train:
        spec = spec.model_copy(update={"train": None})
    input_path = Path(spec.input.path)
    web_dir = input_path.parent
    run_dir = Path(output or spec.output)
    note("building the synthetic web (%d items, seed %d) in %s ...", n, seed, web_dir)
    build_synthweb(web_dir, n=n, seed=seed)
    if any(str(getattr(stage, "model", "")).startswith(DEMO_PREFIX) for stage in spec.stages):
        note("demo models (trained once on clean synthetic pairs, then cached) ...")
        ensure_demo_models(vlm=spec.train is not None)
    from dataengine.engine.raydata import ray_session

    # one Ray for the curated run, its training, the baseline and the floor (each start costs seconds)
    with SynthWebServer(web_dir) as server, ExitStack() as stack, ray_session(None, spec.resources):
        spec = with_demo_llm(spec, stack)
        urls = write_url_list(web_dir, server.base_url)
        if urls.resolve() != input_path.resolve():
            shutil.copyfile(urls, input_path)
        note("serving it at %s; running %s ...", server.base_url, spec_path)
        result = run_pipeline(spec.model_copy(update={"train": None}), output=run_dir)
        unfiltered = before = None
        if spec.train is not None:
            before, unfiltered = _train_and_compare(result, spec)
    truth = pl.read_parquet(web_dir / T.TRUTH_FILE)
    scores = score_stages(result.run_dir, truth, result.manifest["stage_names"])
    capfilt = capfilt_report(result.run_dir, truth, result.manifest["stage_names"])
    (result.run_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2))
    if capfilt:
        (result.run_dir / CAPFILT_FILE).write_text(json.dumps(capfilt, indent=2))
    lines = ["", format_summary(result.manifest), "\nevery stage against the synthetic web's truth:", format_scores(scores)]
    if capfilt:
        lines.append(format_capfilt(capfilt))
    export = result.run_dir / EXPORT_DIR / EXPORT_MANIFEST
    if export.exists():
        lines.append(f"\ninstruction data: {json.loads(export.read_text())['samples']} LLaVA samples in {export.parent} "
                     "(llava.json, images/, conversations.parquet)")
    if spec.train is not None and before is not None:
        rows = training_rows(before, result.manifest["train"], unfiltered)
        trained = result.manifest["train"].get("stage2") or result.manifest["train"]["stage1"]
        samples = trained["lineage"]["samples"]["train"]
        facts: dict[str, Any] = {"models": dict(rows)}
        if unfiltered:
            facts["stage2_comparison"] = compare([b for label, b in rows if label.startswith("curated, stage 2")],
                                                 [b for label, b in rows if label.startswith("unfiltered, stage 2")])
        (result.run_dir / TRAINING_FILE).write_text(json.dumps(facts, indent=2))
        lines.append("\n" + format_training(rows, samples))
        lines.append(f"  models: {result.run_dir}/train/stage{{1,2}}/final (load with "
                     "LlavaForConditionalGeneration.from_pretrained)")
    report = write_report(result.run_dir)
    lines.append(f"\noutputs in {result.run_dir}: dataset/ (kept), rejected/ (with reasons), run.json, {SCORES_FILE}")
    lines.append(f"report: {report.resolve()} (open it in a browser)")
    lines.append(f'try: dataengine query {run_dir} "SELECT reject_reason, COUNT(*) AS n FROM rejected GROUP BY 1 ORDER BY n DESC"')
    return "\n".join(lines)
