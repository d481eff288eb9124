"""What the demo's BLIP captioner and ITM filter (and its CLIP) learned, on held-out clean scenes of the
synthetic web (drawn in the web's shapes and squashed square, as the demo's downloads reach the models).

CapFilt on the demo can only be as good as these two tiny models. For each kind of one-edit hard
negative (colour, shape, count, binding, size, place, background: `blip_models.hard_negative`'s edits)
the ITM filter's rejection rate at 0.5 and how often it ranks the edit below the true caption (0.5 =
blind to that attribute); for the captioner, how often a nucleus-sampled caption names exactly the
scene's (colour, shape) pairs, its colours, its shapes. The demo CLIP gets the same edits: how often it
scores the edit below the true caption (it has no accept threshold of its own).

Run: `.venv/bin/python bench/demo_models.py [--models DIR] [--n 300] [--no-record]` (default: the cached demo
models of the current recipe, trained first if missing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)

from dataengine.testbed.synthweb import blip_models as B
from dataengine.testbed.synthweb.models import _web_like_pairs, ensure_demo_models

HELD_OUT_SEED = 987654  # never a training seed


def one_edit_captions(captions: list[str]) -> dict[str, tuple[list[int], list[str]]]:
    """Per kind of one-edit hard negative (`blip_models.one_edits`): the rows it applies to and their
    edited captions, drawn once so every model is scored on the same ones."""
    out = {}
    for name, edit in B.one_edits(np.random.default_rng(5)).items():
        rows, negatives = [], []
        for i, caption in enumerate(captions):
            changed = edit(caption)
            if changed and changed != caption:
                rows.append(i)
                negatives.append(B._fix_articles(changed))
        out[name] = (rows, negatives)
    return out


def clip_ranks(clip_dir: Path, images: list, captions: list[str], edited: dict[str, tuple[list[int], list[str]]]) -> list[str]:
    """How often the CLIP (loaded as `clip_score_filter` loads it) scores each edit below the true caption."""
    import torch

    from dataengine.models.loaders import load_open_clip

    model, preprocess, tokenizer = load_open_clip(str(clip_dir), device="cpu")
    with torch.inference_mode():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)

        def score(rows: list[int], texts: list[str]) -> np.ndarray:
            return (image[rows] * model.encode_text(tokenizer(texts), normalize=True)).sum(-1).numpy()

        truth = score(list(range(len(captions))), captions)
        lines = [f"CLIP ({clip_dir}): edit scored below the true caption (0.5 = blind to it)"]
        for name, (rows, negatives) in edited.items():
            lines.append(f"{name:>14} {len(rows):>5} {np.mean(score(rows, negatives) < truth[rows]):>12.3f}")
    return lines


def main() -> None:
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="a directory with blip-captioner/ and blip-itm/ (default: the demo's)")
    parser.add_argument("--clip", help="an open_clip directory (default: the demo's CLIP)")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    paths = {} if args.models and args.clip else ensure_demo_models(vlm=False)
    if args.models:
        captioner_dir, itm_dir = Path(args.models) / "blip-captioner", Path(args.models) / "blip-itm"
    else:
        captioner_dir, itm_dir = paths["blip-captioner"], paths["blip-itm"]
    clip_dir = Path(args.clip) if args.clip else paths["clip"]
    images, captions = _web_like_pairs(args.n, 128, HELD_OUT_SEED)  # web-shaped, squashed as the processor does
    processor = BlipProcessor.from_pretrained(str(itm_dir))
    itm = BlipForImageTextRetrieval.from_pretrained(str(itm_dir)).eval()
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]

    def match(rows: list[int], texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            embeds = itm.vision_model(pixel_values=pixels[rows]).last_hidden_state
            enc = processor.tokenizer(texts, padding="longest", truncation=True, max_length=64, return_tensors="pt")
            logits = B._itm_logits(itm, embeds, enc["input_ids"], enc["attention_mask"])
        return torch.softmax(logits, -1)[:, 1].numpy()

    truth = match(list(range(args.n)), captions)
    others = match(list(range(args.n)), [captions[(i + 7) % args.n] for i in range(args.n)])
    lines = [f"ITM filter ({itm_dir}), {args.n} held-out scenes: true captions accepted {np.mean(truth >= 0.5):.3f}; "
             f"other scenes' captions rejected {np.mean(others < 0.5):.3f}",
             f"{'hard negative':>14} {'n':>5} {'rejected':>9} {'below truth':>12}"]
    edited = one_edit_captions(captions)
    for name, (rows, negatives) in edited.items():
        scores = match(rows, negatives)
        lines.append(f"{name:>14} {len(rows):>5} {np.mean(scores < 0.5):>9.3f} {np.mean(scores < truth[rows]):>12.3f}")
    lines += clip_ranks(clip_dir, images, captions, edited)
    captioner = BlipForConditionalGeneration.from_pretrained(str(captioner_dir)).eval()
    cap_processor = BlipProcessor.from_pretrained(str(captioner_dir))
    torch.manual_seed(0)
    with torch.inference_mode():
        out = captioner.generate(pixel_values=cap_processor(images=images, return_tensors="pt")["pixel_values"],
                                 max_new_tokens=24, do_sample=True, top_p=0.9)
    written = cap_processor.batch_decode(out, skip_special_tokens=True)
    pairs = [(B.colour_shape_pairs(w), B.colour_shape_pairs(c)) for w, c in zip(written, captions)]
    lines.append(f"captioner ({captioner_dir}), nucleus 0.9: exact (colour, shape) pairs "
                 f"{np.mean([a == b for a, b in pairs]):.3f}; colours {np.mean([{x for x, _ in a} == {x for x, _ in b} for a, b in pairs]):.3f}; "
                 f"shapes {np.mean([{y for _, y in a} == {y for _, y in b} for a, b in pairs]):.3f}")
    report("bench/demo_models.py: what the demo's BLIP captioner and ITM filter learned", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
