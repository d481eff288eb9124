"""The GPU check (run by bench/gpu_check.sh on one H100/H200): each model stage's feed, bf16 numerics,
a short FSDP stage-2 run. Nothing is downloaded: random weights in the real architectures.

Sections, each printing its own lines and never stopping the others (a failure prints FAILED and why):
1. per model stage: the actor's items/s (`Op.infer`: arrays to the device, normalising, the model,
   results to Arrow) vs the model-only forward on the same device tensors, the GPU's utilisation while
   the actor runs, and the prepare half's cost per item per core (what it takes in CPUs to feed it);
2. the engine end to end: synthetic web -> download -> clip_score_filter (ViT-L-14, num_gpus 1, prepare in
   tasks) through Ray Data, rows/s and the GPU's utilisation;
3. bf16 vs fp32 on the same batches: CLIP scores and caption perplexities;
4. a 20-step stage-2 FSDP run of a LLaVA (CLIP ViT-L-14-336 tower + a Qwen2-0.5B-shaped LM).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dataengine.core import columns as C
from dataengine.ops.base import Op

DEVICE = "cuda"  # `--device cpu`: a smoke run of sections 1-3 on a machine without a GPU (small sizes)
WORDS = "a red circle and two blue squares on a white background near the top left of the picture".split()


def section(title: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            print(f"\n== {title}", flush=True)
            started = time.perf_counter()
            try:
                fn(*args)
            except Exception:  # the check goes on: one broken section must not hide the others
                print(f"FAILED: {traceback.format_exc(limit=6)}", flush=True)
            print(f"({time.perf_counter() - started:.0f} s)", flush=True)
        return run
    return wrap


class Utilisation:
    """Mean GPU utilisation (NVML, %) while the block runs, sampled every 50 ms."""

    def __enter__(self) -> Utilisation:
        import torch

        self.samples: list[int] = []
        self.stop = threading.Event()

        def poll() -> None:
            while not self.stop.is_set() and torch.cuda.is_available():
                self.samples.append(torch.cuda.utilization())
                time.sleep(0.05)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the feed bench's rows and prepared rows
from model_stage_feed import prepared_rows, rows  # noqa: E402

# ---- models: real architectures, random weights --------------------------------------------------

def build_models(root: Path) -> dict[str, Path]:
    import open_clip
    import torch
    import torchvision
    import transformers

    from dataengine.testbed.synthweb.blip_models import build_blip_processor
    from dataengine.testbed.synthweb.models import save_open_clip
    from dataengine.testbed.synthweb.tokenizer import build_caption_tokenizer

    torch.manual_seed(0)
    out: dict[str, Path] = {}
    for name in ("ViT-L-14", "ViT-L-14-336"):
        out[name] = save_open_clip(open_clip.create_model(name, pretrained=None), open_clip.get_model_config(name),
                                   root / name)
    # BLIP-large: ViT-L/16 at 384 px, BERT-base text
    processor = build_blip_processor(None, image_size=384)
    tok = processor.tokenizer
    text = {"vocab_size": len(tok), "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id, "encoder_hidden_size": 1024}
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 16}
    config = transformers.BlipConfig(text_config=text, vision_config=vision, projection_dim=256,
                                     image_text_hidden_size=256)
    for kind, cls in (("blip-captioner", "BlipForConditionalGeneration"), ("blip-itm", "BlipForImageTextRetrieval")):
        getattr(transformers, cls)(config).eval().save_pretrained(str(root / kind))
        processor.save_pretrained(str(root / kind))
        out[kind] = root / kind
    # a Qwen2-0.5B-shaped causal LM with a small BPE vocabulary trained here (the logits keep Qwen's width)
    lm_tok = build_caption_tokenizer([" ".join(WORDS)] * 50 + ["USER: ASSISTANT: How many? Two."], root / "qwen",
                                     vocab_size=300)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id, pad_token_id=lm_tok.pad_token_id,
    )).save_pretrained(str(root / "qwen"))
    out["qwen"] = root / "qwen"
    # SSCD's trunk: ResNet-50, GeM pooling, a 512-d projection, scripted as SSCD ships it
    trunk = torch.nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2])

    class Sscd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.project = trunk, torch.nn.Linear(2048, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = self.trunk(x).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1.0 / 3)
            return self.project(pooled)

    torch.jit.script(Sscd().eval()).save(str(root / "sscd.torchscript.pt"))
    out["sscd"] = root / "sscd.torchscript.pt"
    return out


def stage_ops(models: dict[str, Path], batch: int) -> list[tuple[Op, Any, Callable[[Op, pa.Table], Callable[[], None]]]]:
    """(op on the GPU in bf16, its preparer, a model-only forward over a prepared batch) per model stage."""
    from dataengine.ops.blip_caption import BlipCaptionConfig, BlipCaptionMapper
    from dataengine.ops.capfilt import CapfiltConfig, CapfiltFilter
    from dataengine.ops.clip_score import ClipScoreConfig, ClipScoreFilter
    from dataengine.ops.dedup import Dedup, DedupConfig
    from dataengine.ops.perplexity import PerplexityConfig, PerplexityFilter

    gpu = dict(device=DEVICE, batch_size=batch)
    configs = [
        (ClipScoreFilter, ClipScoreConfig(model=str(models["ViT-L-14"]), pretrained=None, **gpu), clip_forward),
        (PerplexityFilter, PerplexityConfig(model=str(models["qwen"]), **gpu), perplexity_forward),
        (BlipCaptionMapper, BlipCaptionConfig(model=str(models["blip-captioner"]), num_captions=5, max_new_tokens=20,
                                              **gpu), blip_caption_forward),
        (CapfiltFilter, CapfiltConfig(model=str(models["blip-itm"]), **gpu), capfilt_forward),
        (Dedup, DedupConfig(descriptor="sscd", model=str(models["sscd"]), **gpu), sscd_forward),
    ]
    return [(cls(config), cls.preparer(config), forward) for cls, config, forward in configs]


def clip_forward(op: Any, prepared: pa.Table) -> Callable[[], None]:
    import torch

    from dataengine.models.pixels import pixels_array, to_model_input, tokens_array
    from dataengine.ops.clip_score import PIXELS, TOKENS

    prep = op.prepare
    images = to_model_input(pixels_array(prepared.column(PIXELS), *prep.size), op.device, op.dtype, prep.mean, prep.std)
    tokens = torch.from_numpy(tokens_array(prepared.column(TOKENS)).copy()).long().to(op.device)

    def forward() -> None:
        with torch.inference_mode():
            op.model.encode_image(images), op.model.encode_text(tokens)
    return forward


def perplexity_forward(op: Any, prepared: pa.Table) -> Callable[[], None]:
    import torch

    from dataengine.models.pixels import padded
    from dataengine.ops.perplexity import TOKENS

    ids, mask = padded(prepared.column(TOKENS), 0)
    ids_t, mask_t = torch.from_numpy(ids).to(op.device), torch.from_numpy(mask).to(op.device)

    def forward() -> None:
        with torch.inference_mode():
            op.model(input_ids=ids_t, attention_mask=mask_t)
    return forward


def blip_caption_forward(op: Any, prepared: pa.Table) -> Callable[[], None]:
    import torch

    from dataengine.models.pixels import pixels_array, to_model_input
    from dataengine.ops.blip_caption import PIXELS

    config, prep = op.config, op.prepare
    pixels = to_model_input(pixels_array(prepared.column(PIXELS), *prep.size), op.device, op.dtype, prep.mean,
                            prep.std, scale=None)
    n = pixels.shape[0]
    ids = op.prompt["input_ids"].repeat(n, 1).to(op.device)
    mask = op.prompt["attention_mask"].repeat(n, 1).to(op.device)

    def forward() -> None:
        with torch.inference_mode():
            op.model.generate(pixel_values=pixels, input_ids=ids.clone(), attention_mask=mask, do_sample=True, top_p=0.9,
                              top_k=0, max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                              num_return_sequences=config.num_captions)
    return forward


def capfilt_forward(op: Any, prepared: pa.Table) -> Callable[[], None]:
    import torch

    from dataengine.models.pixels import padded, pixels_array, to_model_input
    from dataengine.ops.capfilt import PIXELS, TOKENS

    prep = op.prepare
    pixels = to_model_input(pixels_array(prepared.column(PIXELS), *prep.size), op.device, op.dtype, prep.mean,
                            prep.std, scale=None)
    tokens = prepared.column(TOKENS).combine_chunks()
    per_row = np.diff(tokens.offsets.to_numpy())
    ids, mask = (torch.from_numpy(a).to(op.device) for a in padded(tokens.flatten(), 0))
    pair_image = torch.from_numpy(np.repeat(np.arange(len(per_row)), per_row)).to(op.device)

    def forward() -> None:
        with torch.inference_mode():
            embeds = op.model.vision_model(pixel_values=pixels).last_hidden_state[pair_image]
            image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=op.device)
            text = op.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds,
                                         encoder_attention_mask=image_mask)
            op.model.itm_head(text.last_hidden_state[:, 0, :])
    return forward


def sscd_forward(op: Any, prepared: pa.Table) -> Callable[[], None]:
    import torch

    from dataengine.dedup.descriptors import IMAGENET_MEAN, IMAGENET_STD
    from dataengine.models.pixels import pixels_array, to_model_input
    from dataengine.ops.dedup import PIXELS

    size = op.config.image_size
    x = to_model_input(pixels_array(prepared.column(PIXELS), size, size), op.sscd.device, torch.float32,
                       IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())

    def forward() -> None:
        with torch.inference_mode():
            op.sscd.model(x), op.sscd.model(torch.flip(x, dims=[3]))
    return forward


def timed(fn: Callable[[], None], repeats: int) -> float:
    import torch

    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


@section("1. model stages on the GPU: the actor vs the model-only forward")
def stage_feed(models: dict[str, Path], batch: int) -> None:
    table = rows(batch)
    print(f"{'op':<22}{'actor items/s':>14}{'model-only':>12}{'ratio':>7}{'GPU util':>9}{'prepare ms/item/core':>22}"
          f"{'cores to feed':>14}")
    for op, preparer, forward in stage_ops(models, batch):
        started = time.perf_counter()
        prepared = prepared_rows(preparer, table)
        prepare_ms = (time.perf_counter() - started) / table.num_rows * 1e3
        with Utilisation() as util:
            actor_s = timed(lambda: op.infer(prepared), 5)
        actor = prepared.num_rows / actor_s
        model = prepared.num_rows / timed(forward(op, prepared), 5) if forward else float("nan")
        print(f"{op.name:<22}{actor:>14,.0f}{model:>12,.0f}{actor / model:>7.2f}{util.mean:>8.0f}%{prepare_ms:>22.2f}"
              f"{actor * prepare_ms / 1e3:>14.1f}", flush=True)


@section("2. the engine: download -> clip_score_filter (ViT-L-14, 1 GPU, prepare in tasks)")
def engine_run(models: dict[str, Path], root: Path, n_images: int) -> None:
    from dataengine.engine.runner import run_pipeline
    from dataengine.engine.spec import parse_spec
    from dataengine.testbed.synthweb import SynthWebServer, build_synthweb, write_url_list

    web = build_synthweb(root / "web", n_images, seed=0, sizes=(640,), size_weights=(1.0,))
    with SynthWebServer(web) as server:
        urls = write_url_list(web, server.base_url)
        spec = parse_spec({"name": "gpu", "input": {"path": str(urls), "id_col": "id", "shard_rows": 500},
                           "output": str(root / "run"),
                           "stages": [{"op": "download", "allow_private_networks": True, "batch_size": 64},
                                      {"op": "clip_score_filter", "model": str(models["ViT-L-14"]), "pretrained": None,
                                       "num_gpus": 1 if DEVICE == "cuda" else 0, "prepare_in": "tasks",
                                       "batch_size": 256, "min_score": -1.0}]})
        started = time.perf_counter()
        with Utilisation() as util:
            result = run_pipeline(spec)
        seconds = time.perf_counter() - started
    clip = result.stages[-1]
    print(f"{clip['in']} rows scored in {seconds:.1f} s ({clip['in'] / seconds:,.1f} rows/s end to end, download "
          f"included); GPU utilisation {util.mean:.0f}% over the run; mean batch fill {clip.get('mean_batch_fill')}")


@section("3. bf16 vs fp32 on the same batches")
def numerics(models: dict[str, Path], batch: int) -> None:
    from scipy.stats import spearmanr

    from dataengine.ops.clip_score import ClipScoreConfig, ClipScoreFilter
    from dataengine.ops.perplexity import PerplexityConfig, PerplexityFilter

    table = rows(batch)
    for label, cls, config, column in (
        ("clip_score (ViT-L-14)", ClipScoreFilter, ClipScoreConfig(model=str(models["ViT-L-14"]), pretrained=None,
                                                                   device=DEVICE), C.CLIP_SCORE),
        ("perplexity (Qwen2-0.5B shape)", PerplexityFilter, PerplexityConfig(model=str(models["qwen"]), device=DEVICE),
         C.TEXT_PPL),
    ):
        values = {}
        for dtype in ("float32", "bfloat16"):
            op = cls(config.model_copy(update={"dtype": dtype}))
            values[dtype] = np.array(op.process(table).column(column).to_pylist(), dtype=np.float64)
        a, b = values["float32"], values["bfloat16"]
        rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-6)
        print(f"{label:<32} max |diff| {np.abs(a - b).max():.4g}, max relative {rel.max():.3g}, "
              f"Spearman {spearmanr(a, b).statistic:.4f} over {len(a)} rows", flush=True)


@section("4. a 20-step stage-2 FSDP run: LLaVA of CLIP ViT-L-14-336 + a Qwen2-0.5B-shaped LM")
def fsdp(models: dict[str, Path], root: Path) -> None:
    from dataengine.core.layout import stage_dir
    from dataengine.testbed.synthweb.train_rows import make_train_rows, write_train_run
    from dataengine.train.config import TrainSpec
    from dataengine.train.trainer import train_stage

    run = write_train_run(root / "train-run", make_train_rows(160))
    spec = TrainSpec.model_validate({
        "model": {"vision": str(models["ViT-L-14-336"]), "lm": str(models["qwen"])}, "stages": [2],
        "stage2": {"lr": 2e-5, "global_batch": 8, "micro_batch": 8, "max_steps": 20, "max_length": 1024,
                   "checkpoint_every": 20},
        "eval": {"heldout_fraction": 0.0}, "use_gpu": True, "strategy": "fsdp", "precision": "bfloat16", "workers": 1})
    started = time.perf_counter()
    result = train_stage(run, spec, 2)
    metrics = stage_dir(run, 2) / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    losses = [round(s["loss"], 3) for s in steps]
    print(f"{result['steps']} steps in {time.perf_counter() - started:.0f} s; losses {losses[:3]} ... {losses[-3:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--only", nargs="*", type=int, help="run these sections only (1-4)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke run of the check's code on a machine without a GPU (section 4 needs one)")
    args = parser.parse_args()
    import ray
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (this check is for a GPU machine; --device cpu smoke-runs it)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'CPU'}")
    wanted = set(args.only or [1, 2, 3, 4])
    if DEVICE == "cpu":
        wanted.discard(4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        models = build_models(root)
        print(f"models built in {time.perf_counter() - started:.0f} s: {', '.join(models)}")
        if 1 in wanted:
            stage_feed(models, args.batch)
        if 3 in wanted:
            numerics(models, 64)
        if wanted & {2, 4}:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
            if 2 in wanted:
                engine_run(models, root, args.images)
            if 4 in wanted:
                fsdp(models, root)
            ray.shutdown()


if __name__ == "__main__":
    main()
