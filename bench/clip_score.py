"""CLIP score op overhead: the whole op (JPEG bytes + captions in, scores out) vs the same model's
forward pass alone on pre-decoded tensors, same batch size, same thread count, side by side.

The model is open_clip ViT-B-32 with random weights (none can be downloaded here; the compute is
the same), saved to a local directory and loaded through `dataengine.models` as a real run would.
Inputs are 256 px JPEGs as the download stage writes them. The ratio op/model-only is the share of
time the op spends on the model: the rest is decode, preprocessing, tokenising and Arrow glue.

Run: `.venv/bin/python bench/clip_score.py [--images 256] [--batch 32] [--no-record]`
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)
from PIL import Image, ImageDraw

from dataengine.core import columns as C


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import open_clip
    import torch

    from dataengine.ops.clip_score import ClipScoreConfig, ClipScoreFilter
    from dataengine.testbed.synthweb.models import save_open_clip

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = open_clip.get_model_config(args.model)
        save_open_clip(open_clip.create_model(args.model, pretrained=None), cfg, Path(tmp) / "clip")
        op = ClipScoreFilter(ClipScoreConfig(model=str(Path(tmp) / "clip"), pretrained=None, device="cpu",
                                             batch_size=args.batch))
    images = jpegs(args.images)
    captions = [f"a photo of {i} coloured circles on a plain background" for i in range(args.images)]
    batches = [pa.table({C.IMAGE: images[i:i + args.batch], C.CAPTION: captions[i:i + args.batch]})
               for i in range(0, args.images, args.batch)]
    # model-only inputs: the same images, decoded and preprocessed, and the same captions, tokenised
    pixels = [torch.stack([op.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i:i + args.batch]])
              for i in range(0, args.images, args.batch)]
    tokens = [op.tokenizer(captions[i:i + args.batch]) for i in range(0, args.images, args.batch)]

    def model_only() -> None:
        with torch.inference_mode():
            for x, t in zip(pixels, tokens):
                a = torch.nn.functional.normalize(op.model.encode_image(x).float(), dim=-1)
                b = torch.nn.functional.normalize(op.model.encode_text(t).float(), dim=-1)
                (a * b).sum(dim=1).numpy()

    def whole_op() -> None:
        for batch in batches:
            op.process(batch)

    results = {}
    for name, fn in (("model only", model_only), ("clip_score_filter op", whole_op)):
        fn()  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        results[name] = args.images / min(times)
    ratio = results["clip_score_filter op"] / results["model only"]
    lines = [f"{args.model} (random weights), batch {args.batch}, {args.images} images, torch threads "
             f"{torch.get_num_threads()}"]
    lines += [f"{name:<24}{rate:>8.1f} images/s" for name, rate in results.items()]
    lines.append(f"op / model-only: {ratio:.1%} (goal: 90% or more)")
    report("clip_score_filter overhead", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
