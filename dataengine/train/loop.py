"""The per-worker training loop Ray Train runs (`TorchTrainer(train_loop_per_worker=train_loop)`).

Each worker loads the stage's starting model (or the last checkpoint when Ray Train restarts it
after a failure, or `--resume` continues a stopped run), freezes per stage, wraps it for DDP or FSDP,
and streams its shard of the encoded dataset. One optimizer step = `accumulation` micro-batches per
worker; every worker runs the same number of forward/backward passes per step (a worker whose rows
were all skipped runs a zero-loss pass) so the collectives line up. Checkpoints are Hugging Face
directories (`save_pretrained` + processor) plus the optimizer, scheduler and data position.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataengine.train.batching import MicroBatch, step_batches, token_loss_sum
from dataengine.train.checkpoints import (
    LINEAGE_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    checkpoint_step,
    latest_checkpoint,
    write_file_list,
)
from dataengine.train.config import StageSpec
from dataengine.train.model import load_llava, set_trainable

log = logging.getLogger(__name__)

SKIP_REASONS = ("bad_image", "no_sample", "too_long")
LOOP_KEY = "loop"  # Ray Train hands `train_loop` a dict: the LoopConfig sits under this key
OWN_CHECKPOINTS = "seeds"  # under a seed's checkpoints_dir: the checkpoints its workers wrote themselves


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs to train one stage, decided by the trainer on the driver."""

    stage: int
    seed: int
    init_dir: str  # the stage's starting model (a checkpoint, when there is one, wins)
    strategy: str  # ddp | fsdp
    bf16: bool
    hyper: StageSpec
    micro_batch: int
    accumulation: int  # micro-batches per worker per optimizer step
    total_steps: int
    epochs: int
    checkpoint_every: int
    group_by_length: bool
    max_grad_norm: float
    pixel_shape: tuple[int, int, int]
    metrics_path: str
    lineage: dict[str, Any]
    checkpoints_dir: str
    fail_at_step: int | None = None  # fault injection for tests (see `_maybe_fail`)
    fail_rank: int = 0
    shuffle_rows: int = 1024  # local shuffle buffer (rows); 0: the rows in the dataset's order every epoch
    own_checkpoints: bool = False  # rank 0 writes them under checkpoints_dir (several seeds in one Ray Train run)


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: another order every epoch and every training seed, the same order
    again when a restarted attempt replays the epoch (its consumed batches are skipped by index)."""
    return seed * 100_003 + epoch


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Any:
    """Linear warmup over `warmup_ratio` of the steps, then cosine to 0 (or constant), as HF's schedulers."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def apply_lora(model: Any, lora: dict[str, Any]) -> Any:
    """LoRA adapters on the LM's linear layers; the projector stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora["target_modules"]
    if targets == "all-linear":
        targets = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc)"
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=targets, modules_to_save=["multi_modal_projector"])
    return get_peft_model(model, config)


def _plain_model(model: Any) -> Any:
    """The model inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model)


def _state_dict_for_save(model: Any, strategy: str) -> dict[str, Any] | None:
    """Full weights as the stock LLaVA layout (LoRA merged); collective under FSDP (call on all ranks)."""
    inner = _plain_model(model)
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if hasattr(inner, "merge_adapter"):  # peft: merge, copy, unmerge
        inner.merge_adapter()
        base = inner.get_base_model()
        state = {k: v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}
        inner.unmerge_adapter()
        return {_strip_peft(k): v for k, v in state.items()}
    return {k: v.detach() for k, v in inner.state_dict().items()}


def _strip_peft(key: str) -> str:
    return key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def _save_checkpoint(out: Path, model: Any, processor: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                     lineage: dict[str, Any], weights: dict[str, Any]) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    inner = _plain_model(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if hasattr(inner, "merge_adapter"):
        # save as a plain LLaVA: a fresh model object with merged weights, so transformers loads it as is
        plain = LlavaForConditionalGeneration(base.config)
        plain.load_state_dict({k: v for k, v in weights.items() if k in plain.state_dict()}, strict=False)
        plain.generation_config = base.generation_config
        plain.save_pretrained(str(out))
    else:
        base.save_pretrained(str(out), state_dict=weights)
    processor.save_pretrained(str(out))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, out / OPTIMIZER_FILE)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2))
    (out / LINEAGE_FILE).write_text(json.dumps(lineage | {"step": state["step"]}, indent=2))
    write_file_list(out)


def _dummy_batch(pad_id: int, image_token_id: int, image_tokens: int, pixel_shape: tuple[int, ...]) -> MicroBatch:
    """A zero-loss pass: one image's tokens, no labels. Keeps a worker with nothing left in step."""
    import torch

    ids = torch.full((1, image_tokens + 1), image_token_id, dtype=torch.long)
    ids[0, -1] = pad_id
    return MicroBatch(ids, torch.ones_like(ids), torch.full_like(ids, -100), torch.zeros((1, *pixel_shape)), 0)


def _distributed() -> bool:
    """Whether there are other ranks to talk to."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (as is without a process group)."""
    import torch.distributed as dist

    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_start(config: LoopConfig) -> tuple[Any, Any, dict[str, Any], dict[str, Any] | None]:
    """(model, processor, state, optimizer state) from the last checkpoint if any, else the stage's start."""
    import ray.train
    import torch

    # the newest complete one on disk: Ray's own can be older (see dataengine.train.checkpoints);
    # it also covers `--resume`, which points the run at the same storage. Rank 0 chooses for all.
    on_disk = _broadcast(latest_checkpoint(Path(config.checkpoints_dir)))
    checkpoint = ray.train.Checkpoint(str(on_disk)) if on_disk else ray.train.get_checkpoint()
    if checkpoint is None:
        model, processor = load_llava(config.init_dir)
        return model, processor, {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "skips": {}}, None
    with checkpoint.as_directory() as d:
        model, processor = load_llava(d)
        state = json.loads((Path(d) / STATE_FILE).read_text())
        optim = torch.load(Path(d) / OPTIMIZER_FILE, weights_only=False) if (Path(d) / OPTIMIZER_FILE).is_file() else None
    return model, processor, state, optim


@dataclass
class _Worker:
    """One worker's training state: the wrapped model, its optimizer and where it is in the data."""

    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]
    device: Any
    dummy: MicroBatch
    state: dict[str, Any]
    rank: int
    world: int
    skips: Counter[str] = field(default_factory=Counter)


def _setup(config: LoopConfig) -> _Worker:
    """Load the start (or the last checkpoint), freeze for the stage, wrap for DDP/FSDP, build the optimizer."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hp = config.hyper
    torch.manual_seed(config.seed)
    model, processor, state, optim_state = _load_start(config)
    set_trainable(model, config.stage)
    if hp.lora is not None:
        model = apply_lora(model, hp.lora.model_dump())
    llava_config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    device = ray.train.torch.get_device()
    if world > 1 or config.strategy == "fsdp":
        kwargs = {"use_orig_params": True} if config.strategy == "fsdp" else {}
        model = ray.train.torch.prepare_model(model, parallel_strategy=config.strategy, parallel_strategy_kwargs=kwargs)
    else:
        model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.total_steps, hp.warmup_ratio, hp.schedule))
    if optim_state is not None:
        # LoRA adapters restart from the merged weights and FSDP shards its optimizer state differently
        # from the full state saved here: both resume with fresh Adam moments (the schedule continues)
        if hp.lora is None and config.strategy != "fsdp":
            optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    dummy = _dummy_batch(processor.tokenizer.pad_token_id, llava_config.image_token_id, llava_config.image_seq_length,
                         config.pixel_shape)
    skips: Counter[str] = Counter(state.get("skips", {}) if rank == 0 else {})  # saved totals: all workers
    model.train()
    return _Worker(model, processor, optimizer, scheduler, params, device, dummy, state, rank, world, skips)


def _step(w: _Worker, config: LoopConfig, batch: dict[str, Any]) -> tuple[float, float, int]:
    """One optimizer step over this worker's rows of the global batch: (loss per token, tokens, samples),
    summed over all workers."""
    import torch

    micro = step_batches(batch, config.micro_batch, config.group_by_length, w.processor.tokenizer.pad_token_id,
                         config.pixel_shape, w.skips)
    local_tokens = sum(m.tokens for m in micro)
    global_tokens = _all_reduce([float(local_tokens)], "sum")[0]
    passes = int(_all_reduce([float(len(micro))], "max")[0])
    micro += [w.dummy] * (passes - len(micro))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if config.bf16 else nullcontext()
    loss_total = 0.0
    for k, mb in enumerate(micro):
        sync = k == len(micro) - 1 or not hasattr(w.model, "no_sync")
        with (nullcontext() if sync else w.model.no_sync()), autocast:
            logits = w.model(input_ids=mb.input_ids.to(w.device), attention_mask=mb.attention_mask.to(w.device),
                             pixel_values=mb.pixel_values.to(w.device)).logits
            loss_sum = token_loss_sum(logits, mb.labels.to(w.device))
            (loss_sum * w.world / max(global_tokens, 1.0)).backward()
        loss_total += float(loss_sum.detach())
    if global_tokens > 0:
        torch.nn.utils.clip_grad_norm_(w.params, config.max_grad_norm)
        w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)
    w.scheduler.step()
    samples = int(sum(int(m.attention_mask.shape[0]) for m in micro if m.tokens))
    loss = _all_reduce([loss_total], "sum")[0] / max(global_tokens, 1.0)
    return loss, global_tokens, int(_all_reduce([float(samples)], "sum")[0])


def _checkpoint(w: _Worker, config: LoopConfig, final: bool) -> None:
    """Report the step to Ray Train; rank 0 attaches a checkpoint (every rank joins the collectives)."""
    import ray.train

    local = [float(w.skips.get(r, 0)) for r in SKIP_REASONS]
    totals = {r: int(v) for r, v in zip(SKIP_REASONS, _all_reduce(local, "sum"))}
    saved = w.state | {"skips": totals}
    weights = _state_dict_for_save(w.model, config.strategy) if (w.rank == 0 or config.strategy == "fsdp") else None
    metrics = {"step": w.state["step"], "samples": w.state["samples"], "final": final, "skips": totals}
    if config.own_checkpoints:
        if w.rank == 0:
            _save_own_checkpoint(w, config, saved, weights)
        ray.train.report(metrics, checkpoint=None)
    elif w.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(Path(tmp), w.model, w.processor, w.optimizer, w.scheduler, saved,
                             config.lineage | {"stage": config.stage}, weights)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


def _save_own_checkpoint(w: _Worker, config: LoopConfig, saved: dict[str, Any], weights: dict[str, Any]) -> None:
    """A checkpoint written where `latest_checkpoint` finds it, without Ray Train: renamed into place whole."""
    root = Path(config.checkpoints_dir) / OWN_CHECKPOINTS
    target = root / f"checkpoint_{saved['step']:06d}"
    partial = root / f".partial-{target.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _save_checkpoint(partial, w.model, w.processor, w.optimizer, w.scheduler, saved,
                     config.lineage | {"stage": config.stage}, weights)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: `loop_config[LOOP_KEY]` is the `LoopConfig` the trainer built, or a list of
    them (seeds of one stage, trained one after another; a restarted worker skips those that finished)."""
    from dataengine.core.raytools import quiet_worker_logs

    quiet_worker_logs()
    configs = loop_config[LOOP_KEY]
    for config in configs if isinstance(configs, list) else [configs]:
        last = _broadcast(latest_checkpoint(Path(config.checkpoints_dir))) if config.own_checkpoints else None
        if last is not None and (checkpoint_step(last) or 0) >= config.total_steps:
            continue  # this seed finished before a restart
        _train_one(config)


def _train_one(config: LoopConfig) -> None:
    """One stage under one seed, from its start or its newest checkpoint."""
    import ray.train

    w = _setup(config)
    state = w.state
    if state["step"] >= config.total_steps:  # restarted from the last step's checkpoint: only the final report
        _checkpoint(w, config, final=True)
        return
    shard = ray.train.get_dataset_shard("train")
    metrics_path = Path(config.metrics_path)
    last_saved = state["step"]
    for epoch in range(state["epoch"], config.epochs):
        batches = shard.iter_batches(batch_size=config.micro_batch * config.accumulation, batch_format="numpy",
                                     local_shuffle_buffer_size=config.shuffle_rows or None,
                                     local_shuffle_seed=epoch_order_seed(config.seed, epoch) if config.shuffle_rows else None)
        for index, batch in enumerate(batches):
            if epoch == state["epoch"] and index < state["batch_in_epoch"]:
                continue  # consumed before the checkpoint this attempt started from
            started = time.perf_counter()
            lr_used = w.scheduler.get_last_lr()[0]
            loss, tokens, samples = _step(w, config, batch)
            state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1, samples=state["samples"] + samples)
            if w.rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": state["step"], "epoch": epoch, "loss": loss, "lr": lr_used,
                                        "tokens": tokens, "seconds": time.perf_counter() - started,
                                        "time": time.time()}) + "\n")
            _maybe_fail(config, state["step"], w.rank)
            if state["step"] % config.checkpoint_every == 0 and state["step"] < config.total_steps:
                _checkpoint(w, config, final=False)
                last_saved = state["step"]
            if state["step"] >= config.total_steps:
                break
        if state["step"] >= config.total_steps:
            break
        state.update(epoch=epoch + 1, batch_in_epoch=0)
    if state["step"] != last_saved or state["step"] == 0:
        _checkpoint(w, config, final=True)


def _maybe_fail(config: LoopConfig, step: int, rank: int) -> None:
    """Fault injection for tests: at `fail_at_step` the `fail_rank` worker's process dies once (`os._exit`,
    no exception, no cleanup: as if the OOM killer took it); a marker file remembers it happened."""
    fail = config.fail_at_step
    if fail and step == fail and rank == config.fail_rank:
        marker = Path(config.metrics_path).with_name(f"failed-at-{fail}")
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            log.warning("injected failure: killing training worker rank %d (pid %d) at step %d", rank, os.getpid(), step)
            os._exit(1)
