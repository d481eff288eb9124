"""Evaluate a trained stage: held-out loss/perplexity, and the benchmark the spec names (a plugin,
`dataengine.core.plugins.BENCHMARKS`: the test bed registers `synthweb`).

Runs in a Ray task, on a GPU when the training did, so the driver never needs one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataengine.core import raytools
from dataengine.core.layout import FINAL_DIR, stage_dir
from dataengine.core.plugins import BENCHMARKS, registered
from dataengine.core.progress import note
from dataengine.eval.heldout import heldout_loss
from dataengine.train.config import TrainSpec
from dataengine.train.data import TrainingData, encoded_split, plan_splits
from dataengine.train.model import load_llava
from dataengine.train.trainer import pixel_shape, training_data


def evaluate_model(model_dir: str, data: TrainingData | str | None, stage: int, spec: TrainSpec,
                   benchmark: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Held-out metrics of `model_dir` on the held-out rows of `data` (a run directory, or what the stage
    trained on), and the benchmark (`benchmark`, as the driver looked it up: a worker on another machine
    may not have the plugin's entry points)."""
    import ray.data
    import torch

    ray.data.DataContext.get_current().enable_progress_bars = False  # a task's bars interleave with the driver's
    model, processor = load_llava(model_dir)
    if spec.use_gpu and torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    result: dict[str, Any] = {"model": model_dir}
    if data is not None and spec.eval.heldout_fraction > 0:
        _, split, _ = plan_splits(data, stage, spec.eval.heldout_fraction)
        heldout = encoded_split(data, split, stage, model_dir, spec.stage(stage).max_length)
        result["heldout"] = heldout_loss(model, processor, heldout.iter_batches(batch_size=64, batch_format="numpy"),
                                         tuple(pixel_shape(Path(model_dir))))
    if spec.eval.benchmark is not None:
        run = benchmark or registered(BENCHMARKS)[spec.eval.benchmark]
        result["benchmark"] = run(model, processor, spec.eval.benchmark_size)
    return result


def evaluate_stage(run_dir: Path, spec: TrainSpec, stage: int, out: Path | None = None) -> dict[str, Any]:
    """`evaluate_model` on the final model in `out` (default: the stage's directory), as a Ray task (with
    a GPU when training used one)."""
    model_dir = str(((out or stage_dir(run_dir, stage)) / FINAL_DIR).resolve())  # read by a task elsewhere
    label = f"stage {stage}" + (f" ({out.name})" if out else "")
    if spec.eval.heldout_fraction == 0 and spec.eval.benchmark is None:
        return {"model": model_dir}  # nothing to measure: no task, no model load
    parts = (["held-out rows"] if spec.eval.heldout_fraction else []) + \
        ([f"{spec.eval.benchmark_size} benchmark scenes"] if spec.eval.benchmark else [])
    note("%s: evaluating on %s ...", label, " and ".join(parts))
    benchmark = registered(BENCHMARKS)[spec.eval.benchmark] if spec.eval.benchmark else None
    data = training_data(run_dir, spec) if spec.eval.heldout_fraction else None
    result = raytools.get(raytools.submit(evaluate_model, model_dir, data, stage, spec, benchmark,
                                          num_gpus=1 if spec.use_gpu else 0))
    held, bench = result.get("heldout"), result.get("benchmark")
    said = ([f"held-out loss {held['loss']:.3f} (ppl {held['perplexity']:.2f}) on {held['samples']} samples"] if held else []) + \
        ([f"benchmark exact match {bench['exact_match']:.3f}, POPE F1 {bench['pope']['f1']:.3f}"] if bench else [])
    note("%s eval: %s", label, "; ".join(said))
    return result
