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
from dataengine.train.trainer import train_stage, train_stage_seeds


def train_run(run_dir: str | Path, spec: TrainSpec, stages: list[int] | None = None, resume: bool = False) -> dict[str, Any]:
    """All requested stages in order, each followed by its evaluation; stage 2 again for each of
    `spec.stage2_seeds` (results `stage2-seed<N>`)."""
    run_dir = Path(run_dir).resolve()  # Ray's workers run elsewhere: every path they are given is absolute
    results = {}
    for stage in stages or spec.stages:
        if stage == 2 and spec.stage2_seeds:
            results.update(train_stage2_together([(run_dir, spec)], resume)[0])
        else:
            summary = train_stage(run_dir, spec, stage, resume=resume)
            results[f"stage{stage}"] = _evaluated(run_dir, spec, stage, None, summary)
    return results


def _seed_specs(spec: TrainSpec) -> list[tuple[int | None, TrainSpec]]:
    """(None, spec) and (seed, spec under that seed) for each of `spec.stage2_seeds`."""
    return [(None, spec)] + [(seed, spec.model_copy(update={"seed": seed, "stage2_seeds": []})) for seed in spec.stage2_seeds]


def train_stage2_together(jobs: list[tuple[Path, TrainSpec]], resume: bool = False) -> list[dict[str, Any]]:
    """Stage 2 of each (run, train spec) under its `seed` and each of its `stage2_seeds`: a run's seeds one
    after another in one Ray Train run (`train_stage_seeds`: its fixed cost paid once), the runs at once,
    then each seed's model evaluated (several at once when none reads held-out rows). Unless a spec sets
    `cpus_per_worker`, the CPUs are shared evenly between the runs.
    Returns, per job, its results by name (`stage2`, `stage2-seed<N>`)."""
    from transformers import AutoImageProcessor  # noqa: F401 - resolved here: transformers' lazy imports race in threads

    cpus = raytools.cluster_cpus(default=1)
    at_once = min(len(jobs), max(1, int(cpus)))
    # one CPU stays free for the Ray Data tasks that feed streamed runs (they hang when workers hold every
    # CPU); a worker's PyTorch threads are max(1, its CPUs), so a smaller reservation does not slow it
    share = max(0.1, max(1.0, cpus - 1) / at_once / max(spec.workers for _, spec in jobs))
    seeded = [[(seed, s if s.cpus_per_worker else s.model_copy(update={"cpus_per_worker": share}))
               for seed, s in _seed_specs(spec)] for _, spec in jobs]

    def train(i: int) -> list[dict[str, Any]]:
        run_dir = jobs[i][0]
        return train_stage_seeds(run_dir, [(s, stage_dir(run_dir, 2, seed)) for seed, s in seeded[i]], 2, resume)

    with ThreadPoolExecutor(at_once, thread_name_prefix="stage2") as pool:
        summaries = list(pool.map(train, range(len(jobs))))
    evaluations = [(i, seed, spec, summary) for i, runs in enumerate(seeded)
                   for (seed, spec), summary in zip(runs, summaries[i])]
    # an evaluation of held-out rows streams them through Ray Data tasks, which need a CPU besides the
    # evaluations' own: those go one at a time; benchmark-only ones use every CPU
    held_out = any(spec.eval.heldout_fraction for _, spec in jobs)
    with ThreadPoolExecutor(1 if held_out else max(1, int(cpus)), thread_name_prefix="eval") as pool:
        evaluated = list(pool.map(lambda e: _evaluated(jobs[e[0]][0], e[2], 2, e[1], e[3]), evaluations))
    results: list[dict[str, Any]] = [{} for _ in jobs]
    for (i, seed, _, _), summary in zip(evaluations, evaluated):
        results[i]["stage2" if seed is None else f"stage2-seed{seed}"] = summary
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

