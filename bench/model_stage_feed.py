"""Can one actor feed a GPU? Each model stage's CPU costs, split as the engine splits them.

For every model op (clip_score_filter, perplexity_filter, blip_caption_mapper, capfilt_filter, dedup with
SSCD), on the same rows, one thread:
- prepare: the op's CPU half (`Op.preparer`: decode, resize, tokenise) per item, per core: what the
  prepare tasks cost, scaling with the cluster's CPUs;
- actor glue: the op's model half (`Op.infer`) with the model replaced by a zero-cost stand-in that
  returns outputs of the right shape, per item: the actor's own CPU work around the model (arrays to
  tensors, outputs back to Arrow). Scaling and normalising the pixels runs on the GPU on a GPU node, so
  it is left out here (`device_work_elsewhere`). Goal: <= 0.1 ms, i.e. one actor feeds >= 10,000 items/s.
And for clip_score_filter, the whole stage on the CPU (both halves in the actor, the CPU default) against
the model-only forward on the same prepared tensors (goal: >= 0.9).

Models have random weights in real shapes where it matters for the CPU side (open_clip ViT-B-32 at 224 px,
BLIP's 384 px processor, SSCD at 320 px); nothing is downloaded. Inputs are 256 px JPEGs as the download
stage writes them, and web-length captions.

Run: `.venv/bin/python bench/model_stage_feed.py [--items 256] [--no-record]`
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)
from PIL import Image, ImageDraw

from dataengine.core import columns as C
from dataengine.ops.base import Op, drop_prepared

WORDS = "a red circle and two blue squares on a white background near the top left of the picture".split()


def jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (341, 256), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = int(rng.integers(0, 300)), int(rng.integers(0, 220))
            draw.ellipse([x, y, x + 40, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rows(n: int) -> pa.Table:
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 16)))) for _ in range(n)]
    synthetic = [[" ".join(rng.choice(WORDS, size=8)) for _ in range(5)] for _ in range(n)]
    return pa.table({C.UID: [f"u{i}" for i in range(n)], C.IMAGE: jpegs(n), C.CAPTION: captions,
                     C.SYNTHETIC_CAPTIONS: pa.array(synthetic, pa.list_(pa.string()))})


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()  # warm-up: imports, allocator, caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def prepared_rows(preparer: Any, batch: pa.Table) -> pa.Table:
    """The rows the preparer kept, with its columns: what the model's actor gets."""
    out = preparer(batch)
    alive = out.column(C.REJECT_REASON).is_null()
    kept = batch.filter(alive)
    for name in out.column_names:
        if name != C.REJECT_REASON:
            kept = kept.append_column(name, out.column(name).filter(alive))
    return kept


def split_costs(op: Op, preparer: Any, batches: list[pa.Table], stand_in: Callable[[Op], None]) -> tuple[float, float]:
    """(prepare ms per item, actor glue ms per item) over `batches`."""
    prepared: list[pa.Table] = []

    def prepare() -> None:
        prepared[:] = [prepared_rows(preparer, batch) for batch in batches]

    n = sum(b.num_rows for b in batches)
    prepare_s = best_of(prepare)
    stand_in(op)

    def infer() -> None:
        for batch in prepared:
            drop_prepared(op.infer(batch))

    with device_work_elsewhere():
        return prepare_s / n * 1e3, best_of(infer) / n * 1e3


@contextlib.contextmanager
def device_work_elsewhere() -> Iterator[None]:
    """Scaling and normalising pixels happens on the GPU, not on the actor's CPU: here the host's part
    (a tensor over the Arrow buffer) is done and the device's part replaced by a shape-only tensor, so
    the CPU box measures what the actor's CPU does on a GPU node."""
    import torch

    from dataengine.dedup import descriptors
    from dataengine.models.pixels import host_tensor
    from dataengine.ops import blip_caption, capfilt, clip_score

    def host_part(pixels: np.ndarray, device: Any, dtype: Any, mean: Any, std: Any, scale: Any = 255.0) -> Any:
        host = host_tensor(pixels)
        return torch.empty(host.shape[0], host.shape[3], host.shape[1], host.shape[2], device="meta")

    modules = (descriptors, blip_caption, capfilt, clip_score)
    saved = [m.to_model_input for m in modules]
    for m in modules:
        m.to_model_input = host_part
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.to_model_input = fn


# ---- the zero-cost stand-ins: outputs of the right shape, computed once ----------------------------

def clip_stand_in(op: Any) -> None:
    import torch

    dim = op.model.text_projection.shape[1] if op.model.text_projection is not None else 512
    op.model.encode_image = lambda x: torch.ones(x.shape[0], dim)
    op.model.encode_text = lambda t: torch.ones(t.shape[0], dim)


def perplexity_stand_in(op: Any) -> None:
    import torch

    vocab = op.model.config.vocab_size
    op.model = lambda input_ids, attention_mask: SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))


def blip_caption_stand_in(op: Any) -> None:
    import torch

    ids = op.processor.tokenizer(["a picture of a red circle next to two blue squares"], return_tensors="pt")["input_ids"]

    def generate(pixel_values: Any, **kwargs: Any) -> Any:
        return ids.repeat(pixel_values.shape[0] * kwargs["num_return_sequences"], 1)

    op.model = SimpleNamespace(generate=generate)
    del torch


def capfilt_stand_in(op: Any) -> None:
    import torch

    hidden = op.model.config.text_config.hidden_size
    op.model = SimpleNamespace(
        vision_model=lambda pixel_values: SimpleNamespace(last_hidden_state=torch.zeros(pixel_values.shape[0], 1, hidden)),
        text_encoder=lambda input_ids, **kwargs: SimpleNamespace(last_hidden_state=torch.zeros(input_ids.shape[0], 1, hidden)),
        itm_head=lambda x: torch.zeros(x.shape[0], 2),
    )


def sscd_stand_in(op: Any) -> None:
    import torch

    op.sscd.model = lambda x: torch.ones(x.shape[0], 512)


# ---- the models -------------------------------------------------------------------------------

def build_ops(root: Path, batch: int) -> list[tuple[str, Op, Any, Callable[[Op], None]]]:
    import open_clip
    import torch

    from dataengine.ops.blip_caption import BlipCaptionConfig, BlipCaptionMapper
    from dataengine.ops.capfilt import CapfiltConfig, CapfiltFilter
    from dataengine.ops.clip_score import ClipScoreConfig, ClipScoreFilter
    from dataengine.ops.dedup import Dedup, DedupConfig
    from dataengine.ops.perplexity import PerplexityConfig, PerplexityFilter
    from dataengine.testbed.synthweb.blip_models import build_random_blip_captioner, build_random_blip_itm
    from dataengine.testbed.synthweb.models import build_random_causal_lm, build_tiny_sscd, save_open_clip

    torch.manual_seed(0)
    save_open_clip(open_clip.create_model("ViT-B-32", pretrained=None), open_clip.get_model_config("ViT-B-32"),
                   root / "clip")
    lm = build_random_causal_lm(root / "lm", [" ".join(WORDS)] * 50)
    blip = dict(image_size=384, patch_size=32)
    captioner = build_random_blip_captioner(root / "captioner", **blip)
    itm = build_random_blip_itm(root / "itm", **blip)
    sscd = build_tiny_sscd(root / "sscd.torchscript.pt")
    configs = [
        (ClipScoreFilter, ClipScoreConfig(model=str(root / "clip"), pretrained=None, device="cpu", batch_size=batch,
                                          write_embedding=True), clip_stand_in),
        (PerplexityFilter, PerplexityConfig(model=str(lm), device="cpu", batch_size=batch), perplexity_stand_in),
        (BlipCaptionMapper, BlipCaptionConfig(model=str(captioner), device="cpu", batch_size=batch), blip_caption_stand_in),
        (CapfiltFilter, CapfiltConfig(model=str(itm), device="cpu", batch_size=batch), capfilt_stand_in),
        (Dedup, DedupConfig(descriptor="sscd", model=str(sscd), device="cpu", batch_size=batch), sscd_stand_in),
    ]
    return [(cls.name, cls(config), cls.preparer(config), stand_in) for cls, config, stand_in in configs]


def clip_end_to_end(root: Path, batches: list[pa.Table]) -> tuple[float, float]:
    """(whole stage items/s, model-only items/s) for clip_score_filter on the CPU, both halves in the actor."""
    import torch

    from dataengine.models.pixels import pixels_array, to_model_input, tokens_array
    from dataengine.ops.clip_score import PIXELS, TOKENS, ClipScoreConfig, ClipScoreFilter

    op = ClipScoreFilter(ClipScoreConfig(model=str(root / "clip"), pretrained=None, device="cpu"))
    prep = op.prepare
    inputs = []
    for batch in batches:
        prepared = prep(batch)
        inputs.append((to_model_input(pixels_array(prepared.column(PIXELS), *prep.size), op.device, op.dtype,
                                      prep.mean, prep.std), torch.from_numpy(tokens_array(prepared.column(TOKENS))).long()))

    def model_only() -> None:
        with torch.inference_mode():
            for images, tokens in inputs:
                a = torch.nn.functional.normalize(op.model.encode_image(images).float(), dim=-1)
                b = torch.nn.functional.normalize(op.model.encode_text(tokens).float(), dim=-1)
                (a * b).sum(dim=1).numpy()

    def whole() -> None:
        for batch in batches:
            op.process(batch)

    n = sum(b.num_rows for b in batches)
    return n / best_of(whole), n / best_of(model_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    table = rows(args.items)
    batches = [table.slice(i, args.batch) for i in range(0, args.items, args.batch)]
    lines = [f"{args.items} rows (256 px JPEGs, web-length captions), batch {args.batch}, one thread",
             f"{'op':<22}{'prepare ms/item':>16}{'actor glue ms/item':>20}{'actor feeds items/s':>21}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, op, preparer, stand_in in build_ops(root, args.batch):
            prepare_ms, glue_ms = split_costs(op, preparer, batches, stand_in)
            lines.append(f"{name:<22}{prepare_ms:>16.3f}{glue_ms:>20.4f}{1e3 / glue_ms:>21,.0f}")
            print(lines[-1], flush=True)
        torch.set_num_threads(2)
        whole, model = clip_end_to_end(root, batches[:4])
    lines.append(f"clip_score_filter on the CPU (ViT-B-32, 2 threads, both halves in the actor): {whole:.1f} items/s, "
                 f"model-only forward {model:.1f} items/s: {whole / model:.1%} (goal >= 90%)")
    report("model stage feed: prepare tasks and the actor's own CPU per item", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
