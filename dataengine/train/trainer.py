"""Train a run's output: one Ray Train `TorchTrainer` per stage (`eval/train_then_eval.py` evaluates it).

Layout under `<run>/train/`:
    stage1/init/        the assembled starting model (stage 2 starts from stage 1's final model)
    stage1/checkpoints/ Ray Train's storage: checkpoint_* directories (Hugging Face format + optimizer)
    stage1/final/       the stage's model: loads with `LlavaForConditionalGeneration.from_pretrained`
    stage1/metrics.jsonl  one line per optimizer step (loss, lr, tokens, seconds)
    stage1/result.json  steps, samples, skips, held-out loss and perplexity, benchmark scores, lineage
A stage whose `result.json` exists is done and is not retrained; `resume` continues a stage that was
stopped from its last checkpoint instead of starting it over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataengine.core import raytools
from dataengine.core.atomic import write_text_atomic
from dataengine.core.layout import CHECKPOINTS_DIR, FINAL_DIR, INIT_DIR, MANIFEST, METRICS_FILE, RESULT_FILE, stage_dir
from dataengine.core.progress import StepTrack, note, watch_sweep_steps
from dataengine.train.checkpoints import LINEAGE_FILE, STATE_FILE, checkpoint_step, latest_checkpoint, prune_checkpoints
from dataengine.train.config import StageSpec, TrainSpec
from dataengine.train.data import TrainingData, encoded_split, plan_splits, run_data
from dataengine.train.loop import LOOP_KEY, LoopConfig, train_loop
from dataengine.train.model import build_llava

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2  # per stage, besides final/
FAIL_ENV = "DATAENGINE_TRAIN_FAIL_AT_STEP"  # fault injection for tests: one worker failure at this step


class TrainError(RuntimeError):
    """A training run that cannot start or did not finish; the message says which stage and why."""


@dataclass(frozen=True)
class Batching:
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int


def batching(hp: StageSpec, workers: int, train_rows: int) -> Batching:
    """Micro-batch and accumulation that make `global_batch`, and the step count of the stage."""
    if hp.global_batch % workers:
        raise TrainError(f"global_batch {hp.global_batch} is not divisible by workers={workers}")
    per_worker = hp.global_batch // workers
    micro = min(hp.micro_batch, per_worker)
    if per_worker % micro:
        raise TrainError(f"global_batch {hp.global_batch} / workers {workers} = {per_worker} per worker is not a "
                         f"multiple of micro_batch {micro}")
    per_epoch = max(1, math.ceil((train_rows // workers) / per_worker))
    total = hp.max_steps or max(1, math.ceil(per_epoch * hp.epochs))
    return Batching(micro, per_worker // micro, per_epoch, total)


def training_data(run_dir: str | Path, spec: TrainSpec) -> TrainingData:
    """What the stages train on: the mixture `train: data:` names (checked against its sources), else the
    run's kept rows."""
    if spec.data is None:
        return run_data(run_dir)
    from dataengine.train.mixture import MixtureError, load_mixture, mixture_data

    try:
        return mixture_data(load_mixture(spec.data))
    except (MixtureError, FileNotFoundError) as e:
        raise TrainError(f"train: data: {e}") from None


def lineage(run_dir: Path, spec: TrainSpec, stage: int, counts: dict[str, int], data: TrainingData) -> dict[str, Any]:
    """What a checkpoint was trained on: the run, the train section's hash, the data's version and, for a
    mixture, its id and each source's data version."""
    run = json.loads((run_dir / MANIFEST).read_text()) if (run_dir / MANIFEST).is_file() else {}
    record = {"run_dir": str(run_dir.resolve()), "run_name": run.get("name"), "run_started_at": run.get("started_at"),
              "spec_hash": run.get("spec_hash"), "train_hash": spec.train_hash(stage), "stage": stage,
              "seed": spec.seed, "data_version": data.version, "run_totals": run.get("totals"), "samples": counts}
    if data.mixture is not None:
        record["mixture"] = data.mixture
    return record


def _start_model(run_dir: Path, spec: TrainSpec, stage: int, out: Path) -> Path:
    """Where this stage starts: stage 1 from the assembled model; stage 2 from stage 1's final model."""
    init = out / INIT_DIR
    if stage == 2 and spec.stage2_init:
        given = Path(spec.stage2_init)
        if not (given / "config.json").is_file():
            raise TrainError(f"train.stage2_init: {given} is not a saved model (no config.json); give a stage-1 "
                             "model directory such as RUN/train/stage1/final")
        return given.resolve()
    previous = stage_dir(run_dir, 1) / FINAL_DIR
    if stage == 2 and previous.is_dir():
        return previous
    if not (init / "config.json").is_file():
        model, processor = build_llava(spec.model, seed=spec.seed)
        tmp = init.with_name("init.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        shutil.rmtree(init, ignore_errors=True)
        tmp.rename(init)
    return init


def pixel_shape(processor_dir: Path) -> list[int]:
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(str(processor_dir))
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    return [3, int(crop["height"]), int(crop["width"])]


def worker_cpus(spec: TrainSpec, streaming: bool) -> float:
    """CPUs per worker (Ray sets each worker's PyTorch thread count from it). A streamed dataset needs
    a CPU of its own for the Ray Data tasks that feed the workers (it hangs when the workers hold every
    CPU); a materialized one does not."""
    total = raytools.cluster_cpus(default=1)
    free = total - (1 if streaming else 0)
    wanted = spec.cpus_per_worker or max(1.0, float(int(free // spec.workers)))
    if spec.workers * wanted <= free:
        return wanted
    scaled = max(0.1, free / spec.workers) if free > 0 else 0.5 / spec.workers
    log.warning("train: %d workers x %.2g CPUs leave no CPU for data loading on this %g-CPU cluster; "
                "reserving %.2g CPUs per worker instead", spec.workers, wanted, total, scaled)
    return scaled


def train_stage(run_dir: str | Path, spec: TrainSpec, stage: int, resume: bool = False,
                fail_at_step: int | None = None, fail_rank: int = 0, out: Path | None = None) -> dict[str, Any]:
    """Train one stage of `spec` on `run_dir`'s kept rows into `out` (default: the stage's directory);
    returns (and writes) the stage's result. `fail_at_step`/`fail_rank` inject one worker failure
    (tests of the restart path)."""
    run_dir = Path(run_dir).resolve()  # the workers' working directory is not the caller's
    out = Path(out).resolve() if out else stage_dir(run_dir, stage)
    return _train(run_dir, [(spec, out)], stage, resume, fail_at_step, fail_rank)[0]


def train_stage_seeds(run_dir: str | Path, runs: list[tuple[TrainSpec, Path]], stage: int,
                      resume: bool = False) -> list[dict[str, Any]]:
    """One stage of `run_dir` once per (spec, out) of `runs`, specs that differ only in their seed, in one
    Ray Train run whose workers train one seed after another: its fixed cost (the controller's actors and
    the worker processes starting, their imports, the data's encoding) is paid once instead of once per
    seed, which on a small model is most of a run's cost. Each seed keeps its own directory, metrics,
    checkpoints (written by the workers, not through Ray Train's, which holds one seed's) and result;
    a restarted worker skips the seeds that finished and resumes the one it was on.
    Returns the results in the order of `runs`."""
    run_dir = Path(run_dir).resolve()
    runs = [(spec, Path(out).resolve()) for spec, out in runs]
    unseeded = lambda spec: spec.model_copy(update={"seed": 0, "stage2_seeds": []})  # noqa: E731
    for spec, out in runs[1:]:
        if unseeded(spec) != unseeded(runs[0][0]):
            raise TrainError(f"{out}: the runs trained together must differ only in their seed")
    return _train(run_dir, runs, stage, resume, None, 0)


def _finished(spec: TrainSpec, stage: int, out: Path) -> dict[str, Any] | None:
    """The result of a stage that finished in `out` (None: not finished); refused if another train:
    section trained it. `--resume` continues only a stage that did not finish."""
    if not (out / RESULT_FILE).is_file():
        return None
    done = json.loads((out / RESULT_FILE).read_text())
    if not spec.matches_train_hash(done["lineage"]["train_hash"], stage):
        raise TrainError(f"{out} was trained with another train: section (hash {done['lineage']['train_hash']}, "
                         f"this one {spec.train_hash(stage)}); delete {out} to retrain it")
    log.info("stage %d already trained (%s); delete it to retrain", stage, out / RESULT_FILE)
    return done


def _train(run_dir: Path, runs: list[tuple[TrainSpec, Path]], stage: int, resume: bool,
           fail_at_step: int | None, fail_rank: int) -> list[dict[str, Any]]:
    """`train_stage` (one run) and `train_stage_seeds` (several seeds of one run, one Ray Train run)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    fail_at_step = fail_at_step or int(os.environ.get(FAIL_ENV, "0")) or None
    results = {out: _finished(spec, stage, out) for spec, out in runs}
    todo = [(spec, out) for spec, out in runs if results[out] is None]
    if not todo:
        return [results[out] for _, out in runs]
    sweep = len(runs) > 1  # several seeds: the workers write the checkpoints (Ray Train's hold one run's)
    spec = todo[0][0]  # the seeds' specs differ in nothing the shared setup reads
    hp = spec.stage(stage)
    data = training_data(run_dir, spec)
    train_split, _, counts = plan_splits(data, stage, spec.eval.heldout_fraction, spec.max_samples)
    if counts["train"] == 0:
        where = f"the mixture {spec.data}" if spec.data else f"{run_dir}/dataset"
        raise TrainError(f"stage {stage}: no training samples in {where} ({counts})")
    plan = batching(hp, spec.workers, counts["train"])
    configs, resumed = [], []
    for seed_spec, seed_out in todo:
        checkpoints = seed_out / CHECKPOINTS_DIR
        newest = latest_checkpoint(checkpoints) if resume else None
        if newest is not None:
            resumed.append(str(newest))
        if not resume:
            for stale in (checkpoints, seed_out / FINAL_DIR, seed_out / METRICS_FILE):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        seed_out.mkdir(parents=True, exist_ok=True)
        start = _start_model(run_dir, seed_spec, stage, seed_out)
        configs.append(LoopConfig(
            stage=stage, seed=seed_spec.seed, init_dir=str(start), strategy=spec.strategy,
            bf16=spec.use_gpu and spec.precision in ("auto", "bfloat16"), hyper=hp, micro_batch=plan.micro_batch,
            accumulation=plan.accumulation, total_steps=plan.total_steps,
            epochs=math.ceil(hp.epochs) if not hp.max_steps else 10**9, checkpoint_every=hp.checkpoint_every,
            group_by_length=spec.group_by_length, max_grad_norm=1.0, pixel_shape=tuple(pixel_shape(start)[:3]),
            metrics_path=str(seed_out / METRICS_FILE), lineage=lineage(run_dir, seed_spec, stage, counts, data),
            checkpoints_dir=str(checkpoints), fail_at_step=fail_at_step, fail_rank=fail_rank, own_checkpoints=sweep))
    data_context = ray.data.DataContext.get_current()  # a dataset keeps the context it was made in
    bars, data_context.enable_progress_bars = data_context.enable_progress_bars, False  # per-step metrics instead
    dataset = encoded_split(data, train_split, stage, configs[0].init_dir, hp.max_length)
    shape = configs[0].pixel_shape
    encoded_mb = counts["train"] * (4 * shape[0] * shape[1] * shape[2] + 8 * hp.max_length) / 2**20
    streaming = not ((configs[0].epochs > 1 or len(configs) > 1) and encoded_mb <= spec.cache_encoded_mb)
    if not streaming:
        dataset = dataset.materialize()  # later epochs (and seeds) read tokenized rows from the object store
    seeds = f", seeds {', '.join(str(c.seed) for c in configs)} one after another" if sweep else ""
    note("stage %d: %d train rows (%d held out), %d steps of %d (micro %d x accumulation %d x %d workers)%s%s",
         stage, counts["train"], counts["heldout"], plan.total_steps, hp.global_batch, plan.micro_batch,
         plan.accumulation, spec.workers, seeds, f", resuming from {', '.join(resumed)}" if resumed else "")
    storage = Path(configs[0].checkpoints_dir)
    trainer = TorchTrainer(
        train_loop, train_loop_config={LOOP_KEY: configs if sweep else configs[0]},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                                  resources_per_worker={"CPU": worker_cpus(spec, streaming)}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"stage{stage}-{int(time.time())}", storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={"train": dataset})
    started = time.perf_counter()
    label = f"train stage {stage}"
    try:
        tracks = [StepTrack(Path(config.metrics_path), f"{seed_out}/steps",
                            label + (f" (seed {config.seed})" if sweep else "")) for config, (_, seed_out) in zip(configs, todo)]
        with watch_sweep_steps(tracks, plan.total_steps):
            result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; name the stage and keep the cause
        raise TrainError(f"stage {stage} failed: {e}") from e
    finally:
        data_context.enable_progress_bars = bars
    seconds = round(time.perf_counter() - started, 1)
    for config, (seed_spec, seed_out) in zip(configs, todo):
        results[seed_out] = _finish(config, seed_spec, stage, seed_out, result, plan, seconds, sweep)
    return [results[out] for _, out in runs]


def _finish(config: LoopConfig, spec: TrainSpec, stage: int, out: Path, result: Any, plan: Batching,
            seconds: float, sweep: bool) -> dict[str, Any]:
    """Copy a trained seed's last checkpoint to `final/`, write its result, prune its checkpoints."""
    checkpoints = Path(config.checkpoints_dir)
    if sweep:  # the workers wrote this seed's checkpoints themselves
        last = latest_checkpoint(checkpoints)
        if last is None or checkpoint_step(last) != config.total_steps:
            raise TrainError(f"stage {stage}: {out} ended without its step-{config.total_steps} checkpoint "
                             f"(the newest is {last})")
        source: Any = nullcontext(str(last))
    elif result.checkpoint is None:
        raise TrainError(f"stage {stage}: training ended without a checkpoint ({result.error})")
    else:
        source = result.checkpoint.as_directory()
    final = out / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    with source as d:
        shutil.copytree(d, final)
    state = json.loads((final / STATE_FILE).read_text())
    summary = {"stage": stage, "steps": state["step"], "samples_trained": state["samples"],
               "skipped": state.get("skips", {}), "seconds": seconds,
               "batching": plan.__dict__, "hyperparameters": config.hyper.model_dump(), "workers": spec.workers,
               "lineage": json.loads((final / LINEAGE_FILE).read_text()), "model": str(final)}
    write_text_atomic(out / RESULT_FILE, json.dumps(summary, indent=2))
    prune_checkpoints(checkpoints, keep=CHECKPOINTS_KEPT)
    note("stage %d: %d steps, %d samples, skipped %s -> %s", stage, summary["steps"], summary["samples_trained"],
         summary["skipped"] or "none", final)
    return summary
