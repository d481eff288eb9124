"""A tiny zero-shot detector in the standard format: OWLv2 with random weights and CLIP's own tokenizer,
built from configs and saved with `save_pretrained`, so `object_detector_mapper` loads it for real.

CLIP's byte-level BPE ships inside open_clip (`bpe_simple_vocab_16e6.txt.gz`); the vocabulary and merges
files transformers' `CLIPTokenizer` reads are derived from it as CLIP derives its own, so token ids match
open_clip's (tested).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def build_clip_tokenizer(out_dir: str | Path) -> Any:
    """transformers' `CLIPTokenizer` over open_clip's BPE (49,408 tokens), its files saved in `out_dir`."""
    import open_clip
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="!")


def build_random_owlv2(out_dir: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """A randomly initialised 2-layer OWLv2 (patch 16) and its processor, saved: zero-shot detection's shape."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer(out / "tokenizer-files")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = Owlv2Config(text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 16},
                         vision_config={**small, "image_size": image_size, "patch_size": 16}, projection_dim=32)
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(config).eval().save_pretrained(str(out))
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer)
    processor.save_pretrained(str(out))
    return out
