"""Train the requested stages in order, each followed by its evaluation: the one place that joins the
trainer and the evaluator (the runner's `train:` section and `dataengine train` call it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataengine.core.atomic import write_text_atomic
from dataengine.core.layout import RESULT_FILE, stage_dir
from dataengine.eval.run_eval import evaluate_stage
from dataengine.train.config import TrainSpec
from dataengine.train.trainer import train_stage


def train_run(run_dir: str | Path, spec: TrainSpec, stages: list[int] | None = None, resume: bool = False) -> dict[str, Any]:
    """All requested stages in order, each followed by its evaluation."""
    results = {}
    for stage in stages or spec.stages:
        summary = train_stage(run_dir, spec, stage, resume=resume)
        if "eval" not in summary:
            summary["eval"] = evaluate_stage(Path(run_dir), spec, stage)
            write_text_atomic(stage_dir(Path(run_dir), stage) / RESULT_FILE, json.dumps(summary, indent=2))
        results[f"stage{stage}"] = summary
    return results


def format_train_summary(results: dict[str, Any]) -> str:
    lines = []
    for name, r in results.items():
        ev = r.get("eval", {})
        held = ev.get("heldout", {})
        bench = ev.get("benchmark")
        line = (f"{name}: {r['steps']} steps, {r['samples_trained']} samples, skipped "
                f"{ {k: v for k, v in r['skipped'].items() if v} or 'none'}, {r['seconds']}s -> {r['model']}")
        if held:
            line += f"\n  held-out loss {held['loss']:.3f}, perplexity {held['perplexity']:.2f} ({held['samples']} samples)"
        if bench:
            line += (f"\n  benchmark: exact match {bench['exact_match']:.3f} "
                     + " ".join(f"{k.removesuffix('_accuracy')} {v:.3f}" for k, v in bench.items() if k.endswith("_accuracy"))
                     + f"; POPE F1 {bench['pope']['f1']:.3f}, yes-ratio {bench['pope']['yes_ratio']:.2f}"
                     + f"; descriptions: {bench['describe']['chair']:.3f} of named objects hallucinated")
        lines.append(line)
    return "\n".join(lines)

