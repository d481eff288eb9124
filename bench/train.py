"""Trainer throughput: our Ray Train loop vs a plain `transformers.Trainer` on the same tiny LLaVA.

Same model (a random tiny open_clip tower + a tiny Llama, assembled by `build_llava`), same rows,
same micro-batch, accumulation and learning rate, stage 2 (projector + LM trained), on this machine's
CPU. `transformers.Trainer` gets the rows already tokenized in memory (its best case); ours streams
them from the run's Parquet through Ray Data and tokenizes them in Ray Data tasks. Reported:
steady-state samples/s (from per-step timestamps, the first steps dropped) and end-to-end wall time
(ours includes starting Ray Train's workers; the Trainer's includes building its optimizer).

    .venv/bin/python bench/train.py [--rows 512] [--steps 30] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

WORK = REPO / "bench" / "_work" / "train"


def _prepare(rows: int, hidden: int) -> tuple[Path, dict[str, Path]]:
    from dataengine.testbed.synthweb.models import build_random_open_clip
    from dataengine.testbed.synthweb.train_rows import build_random_llama, make_train_rows, write_train_run

    shutil.rmtree(WORK, ignore_errors=True)
    data = make_train_rows(rows)
    run = write_train_run(WORK / "run", data)
    parts = {"vision": build_random_open_clip(WORK / "clip", image_size=64),
             "lm": build_random_llama(WORK / "llama", [r["caption"] for r in data], hidden=hidden)}
    return run, parts


def _steady(times: list[float], samples_per_step: int, skip: int = 3) -> float:
    """Samples/s between step `skip` and the last step (warm-up steps dropped)."""
    times = times[skip:]
    return samples_per_step * (len(times) - 1) / (times[-1] - times[0])


def run_ours(run: Path, parts: dict[str, Path], steps: int, workers: int) -> dict[str, float]:
    import ray

    from dataengine.core.layout import stage_dir
    from dataengine.train.config import TrainSpec
    from dataengine.train.trainer import train_stage

    spec = TrainSpec.model_validate({
        "model": {"vision": str(parts["vision"]), "lm": str(parts["lm"])}, "stages": [2], "workers": workers,
        "stage2": {"lr": 1e-3, "global_batch": 32, "micro_batch": 16, "max_steps": steps, "max_length": 512,
                   "checkpoint_every": 10**6}, "eval": {"heldout_fraction": 0.0}})
    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    train_stage(run, spec, 2)
    wall = time.perf_counter() - started
    ray.shutdown()
    times = [json.loads(line)["time"] for line in (stage_dir(run, 2) / "metrics.jsonl").read_text().splitlines()]
    return {"steady_samples_s": _steady(times, 32), "wall_s": wall}


def run_hf_trainer(run: Path, parts: dict[str, Path], steps: int) -> dict[str, float]:
    import pyarrow.parquet as pq
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dataengine.core import columns as C
    from dataengine.train.batching import collate
    from dataengine.train.config import ModelSpec
    from dataengine.train.data import encode_row
    from dataengine.train.model import build_llava, set_trainable

    model, processor = build_llava(ModelSpec(vision=str(parts["vision"]), lm=str(parts["lm"])))
    set_trainable(model, 2)
    rows = pq.read_table(run / "dataset" / "part-00000.parquet").to_pylist()
    encoded = [encode_row(r, processor, 2, 512) for r in rows]
    pad = processor.tokenizer.pad_token_id

    def collator(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {k: [it[k] for it in items] for k in (C.INPUT_IDS, C.LABELS, C.PIXEL_VALUES, C.SAMPLE_LENGTH, C.SKIP)}
        mb = collate(batch, list(range(len(items))), pad, (3, 64, 64))
        return {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask, "labels": mb.labels,
                "pixel_values": mb.pixel_values}

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
            times.append(time.time())

    args = TrainingArguments(
        output_dir=str(WORK / "hf"), per_device_train_batch_size=16, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=max(1, math.ceil(0.03 * steps)), weight_decay=0.0, logging_steps=10**6,
        save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator, callbacks=[StepTimes()])
    started = time.perf_counter()
    trainer.train()
    return {"steady_samples_s": _steady(times, 32), "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="append the report to bench/RESULTS.md")
    args = parser.parse_args()
    run, parts = _prepare(args.rows, args.hidden)
    hf = run_hf_trainer(run, parts, args.steps)
    ours = run_ours(run, parts, args.steps, args.workers)
    report = "\n".join([
        f"tiny LLaVA (Llama hidden {args.hidden}, 64 image tokens), stage 2, {args.steps} steps of 32 "
        f"(micro 16 x accumulation 2), {args.rows} rows, CPU",
        f"{'':<28}{'steady samples/s':>18}{'end-to-end s':>14}",
        f"{'transformers.Trainer':<28}{hf['steady_samples_s']:>18.1f}{hf['wall_s']:>14.1f}",
        f"{f'dataengine (Ray Train, {args.workers}w)':<28}{ours['steady_samples_s']:>18.1f}{ours['wall_s']:>14.1f}",
        f"ratio ours / Trainer: steady {ours['steady_samples_s'] / hf['steady_samples_s']:.2f}x, "
        f"end-to-end {hf['wall_s'] / ours['wall_s']:.2f}x (>1 = ours faster)",
    ])
    print(report)
    if args.record:
        from _record import append_result

        append_result("Trainer throughput: dataengine vs transformers.Trainer", report)


if __name__ == "__main__":
    main()
