"""Train the requested stages in order, each followed by its evaluation: the one place that joins the
trainer and the evaluator (the runner's `train:` section and `dataengine train` call it)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dataengine.core import raytools
from dataengine.core.atomic import write_text_atomic
from dataengine.core.layout import RESULT_FILE, stage_dir
from dataengine.eval.run_eval import evaluate_stage
from dataengine.train.config import TrainSpec
from dataengine.train.trainer import train_stage


def train_run(run_dir: str | Path, spec: TrainSpec, stages: list[int] | None = None, resume: bool = False) -> dict[str, Any]:
    """All requested stages in order, each followed by its evaluation; stage 2 again for each of
    `spec.stage2_seeds` (results `stage2-seed<N>`)."""
    results = {}
    for stage in stages or spec.stages:
        if stage == 2 and spec.stage2_seeds:
            results.update(train_stage2_together([(Path(run_dir), spec)], resume)[0])
        else:
            summary = train_stage(run_dir, spec, stage, resume=resume)
            results[f"stage{stage}"] = _evaluated(Path(run_dir), spec, stage, None, summary)
    return results


def _seed_specs(spec: TrainSpec) -> list[tuple[int | None, TrainSpec]]:
    """(None, spec) and (seed, spec under that seed) for each of `spec.stage2_seeds`."""
    return [(None, spec)] + [(seed, spec.model_copy(update={"seed": seed, "stage2_seeds": []})) for seed in spec.stage2_seeds]


def train_stage2_together(jobs: list[tuple[Path, TrainSpec]], resume: bool = False) -> list[dict[str, Any]]:
    """Stage 2 of each (run, train spec) under its `seed` and each of its `stage2_seeds`, trained a few at
    once (one more than the cluster has CPUs: each run's fixed cost, worker processes starting and the
    model loading, overlaps the others' steps), then evaluated one at a time (an evaluation's Ray Data
    tasks need a CPU besides its own task's). Unless a spec sets `cpus_per_worker`, the CPUs are shared
    evenly between the runs in flight.
    Returns, per job, its results by name (`stage2`, `stage2-seed<N>`)."""
    from transformers import AutoImageProcessor  # noqa: F401 - resolved here: transformers' lazy imports race in threads

    runs = [(i, run_dir, seed, spec) for i, (run_dir, job) in enumerate(jobs) for seed, spec in _seed_specs(job)]
    cpus = raytools.cluster_cpus(default=1)
    # measured on 2 cores, 3-epoch demo runs: one at a time 30 s each, three at once 28 s, six at once 34 s
    at_once = min(len(runs), int(cpus) + 1)
    # one CPU stays free for the Ray Data tasks that feed streamed runs (they hang when workers hold every
    # CPU); a worker's PyTorch threads are max(1, its CPUs), so a smaller reservation does not slow it
    share = max(0.1, max(1.0, cpus - 1) / at_once / max(r[3].workers for r in runs))
    runs = [(i, run_dir, seed, spec if spec.cpus_per_worker else spec.model_copy(update={"cpus_per_worker": share}))
            for i, run_dir, seed, spec in runs]
    with ThreadPoolExecutor(at_once, thread_name_prefix="stage2") as pool:
        summaries = list(pool.map(lambda r: train_stage(r[1], r[3], 2, resume=resume, out=stage_dir(r[1], 2, r[2])), runs))
    results: list[dict[str, Any]] = [{} for _ in jobs]
    for (i, run_dir, seed, spec), summary in zip(runs, summaries):
        results[i]["stage2" if seed is None else f"stage2-seed{seed}"] = _evaluated(run_dir, spec, 2, seed, summary)
    return results


def _evaluated(run_dir: Path, spec: TrainSpec, stage: int, seed: int | None, summary: dict[str, Any]) -> dict[str, Any]:
    """A trained stage's summary with its evaluation (run now, and written to its result, if it has none)."""
    if "eval" not in summary:
        out = stage_dir(run_dir, stage, seed)
        summary["eval"] = evaluate_stage(run_dir, spec, stage, out if seed is not None else None)
        write_text_atomic(out / RESULT_FILE, json.dumps(summary, indent=2))
    return summary


def stage2_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage 2's result under every seed it was trained with (`stage2` first)."""
    return [r for name, r in results.items() if name == "stage2" or name.startswith("stage2-seed")]


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

