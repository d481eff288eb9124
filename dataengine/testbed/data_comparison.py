"""Curated vs unfiltered: the demo's training comparison, and when a difference is more than noise.

The baseline is the same input through the downloader and the instruction writer with no filter,
its stage 2 trained on as many rows as the curated run's, from the curated run's stage-1 model: the
two sides differ only in their instruction data. Its input leaves out the URLs the curated run's
download stage rejected (`downloadable_input`): they give no row either way, and the synthetic web's
slow ones cost the baseline half a minute of timeouts. Stage 2 is trained with several seeds on each side
(`train.stage2_seeds`), so the verdict's interval covers training variance (the spread over seeds)
as well as benchmark sampling (the binomial variance of each side's exact match over its questions).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl

from dataengine.analysis.query import scan
from dataengine.core import columns as C
from dataengine.core.layout import FINAL_DIR, stage_dir
from dataengine.engine.spec import PipelineSpec
from dataengine.eval.train_then_eval import stage2_runs

#: two-sided 95% Student t quantiles by degrees of freedom (beyond 10: 2.0)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
UNFILTERED_STAGES = ("download", "llava_synthesis_mapper")
UNFILTERED_INPUT = "demo_unfiltered_input.parquet"  # beside the curated run's other demo files


def unfiltered_spec(spec: PipelineSpec, run_dir: Path, train_rows: int, input_path: Path | None = None) -> PipelineSpec:
    """The same input (or `input_path`, see `downloadable_input`), downloader and instruction writer
    without any filter, its stage 2 trained on `train_rows` rows from the curated run's stage-1 model
    (`run_dir`): the baseline the curated data is compared with, differing only in the instruction data."""
    keep = [s for s in spec.stages if s.op in UNFILTERED_STAGES]
    start = stage_dir(run_dir, 1) / FINAL_DIR
    train = spec.train.model_copy(update={"max_samples": train_rows, "stages": [2], "stage2_init": str(start)}) \
        if spec.train else None
    source = spec.input.model_copy(update={"path": str(input_path)}) if input_path else spec.input
    return spec.model_copy(update={"name": spec.name + "-unfiltered", "stages": keep, "train": train, "input": source,
                                   "output": str(run_dir.with_name(run_dir.name + "-unfiltered"))})


def downloadable_input(spec: PipelineSpec, run_dir: Path) -> Path | None:
    """The input rows whose URL the curated run (`run_dir`) did not reject at its download stage, written
    to `run_dir / UNFILTERED_INPUT`; None when the input is not one Parquet file (the baseline then reads
    the whole input)."""
    source = Path(spec.input.path)
    if not (source.is_file() and (spec.input.format or source.suffix.lstrip(".")) == "parquet"):
        return None
    rejected = scan(run_dir)["rejected"]  # lazy: only the two columns below are read
    failed = rejected.filter(pl.col(C.REJECT_STAGE) == "download").select(C.URL).collect()[C.URL].implode()
    out = run_dir / UNFILTERED_INPUT
    pl.read_parquet(source).filter(~pl.col(spec.input.url_col).is_in(failed)).write_parquet(out)
    return out


def training_rows(before: dict[str, Any], curated: dict[str, Any], unfiltered: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(label, benchmark) rows of the demo's training table, in the order they are printed."""
    rows = [("before stage 1 (assembled)", before)]
    for name, result in (("curated", curated), ("unfiltered", unfiltered)):
        if not result:
            continue
        if "stage1" in result:
            rows.append((f"{name}, after stage 1", result["stage1"]["eval"]["benchmark"]))
        for run in stage2_runs(result):
            rows.append((f"{name}, stage 2 seed {run['lineage'].get('seed', 0)}", run["eval"]["benchmark"]))
    return rows


def compare(curated: list[dict[str, Any]], unfiltered: list[dict[str, Any]], key: str = "exact_match") -> dict[str, Any]:
    """Mean `key` of each side's benchmark results (one per seed), their difference and its 95% interval:
    t(k_c + k_u - 2) x sqrt(s_c^2 / k_c + s_u^2 / k_u + p_c (1 - p_c) / Q_c + p_u (1 - p_u) / Q_u),
    s the spread over seeds and p (1 - p) / Q the benchmark's sampling variance (the same questions for
    every seed, so it does not shrink with more seeds). One seed per side: the sampling term alone, x 2."""
    sides = {}
    for name, results in (("curated", curated), ("unfiltered", unfiltered)):
        values = [float(b[key]) for b in results]
        k = len(values)
        mean = sum(values) / k
        spread = sum((v - mean) ** 2 for v in values) / (k - 1) if k > 1 else 0.0
        questions = max(1, min(int(b.get("questions", 1)) for b in results))
        sides[name] = {"values": values, "mean": mean, "seed_std": math.sqrt(spread),
                       "variance": spread / k + mean * (1 - mean) / questions}
    df = len(curated) + len(unfiltered) - 2
    t = _T95.get(df, 2.0) if df > 0 else 2.0
    interval = t * math.sqrt(sides["curated"]["variance"] + sides["unfiltered"]["variance"])
    difference = sides["curated"]["mean"] - sides["unfiltered"]["mean"]
    verdict = "wins" if difference > interval else "loses" if difference < -interval else "is within the interval"
    return {"metric": key, "curated": sides["curated"], "unfiltered": sides["unfiltered"], "difference": difference,
            "interval": interval, "t": t, "verdict": verdict}


def format_comparison(result: dict[str, Any]) -> str:
    c, u = result["curated"], result["unfiltered"]
    seeds = lambda side: ", ".join(f"{v:.3f}" for v in side["values"])  # noqa: E731 - one-line formatter
    return (f"  after stage 2, VQA exact match over {len(c['values'])} + {len(u['values'])} seeds: curated "
            f"{c['mean']:.3f} ({seeds(c)}) vs unfiltered {u['mean']:.3f} ({seeds(u)}): difference "
            f"{result['difference']:+.3f}, 95% interval +/-{result['interval']:.3f} (training variance over seeds and "
            f"benchmark sampling): curated data {result['verdict']}"
            + ("" if result["verdict"] == "wins" else "\n  (no win shown: what the demo VLM learns and why, README: Read it honestly)"))


def format_training(rows: list[tuple[str, dict[str, Any]]], samples: int) -> str:
    lines = [f"tiny VLM on the synthetic-web VQA benchmark (trained on {samples} rows; exact match per question type;",
             "caption ppl: perplexity of each benchmark image's true caption, lower is better):",
             f"  {'model':<30}{'all':>7}{'count':>7}{'colour':>8}{'where':>7}{'POPE F1':>9}{'yes-ratio':>11}"
             f"{'caption ppl':>13}"]
    for label, b in rows:
        lines.append(f"  {label:<30}{b['exact_match']:>7.3f}{b.get('count_accuracy', 0):>7.3f}"
                     f"{b.get('colour_accuracy', 0):>8.3f}{b.get('position_accuracy', 0):>7.3f}"
                     f"{b['pope']['f1']:>9.3f}{b['pope']['yes_ratio']:>11.2f}{b.get('caption_perplexity', 0):>13.2f}")
    curated = [b for label, b in rows if label.startswith("curated, stage 2")]
    unfiltered = [b for label, b in rows if label.startswith("unfiltered, stage 2")]
    if curated and unfiltered:
        lines.append(format_comparison(compare(curated, unfiltered)))
    return "\n".join(lines)
