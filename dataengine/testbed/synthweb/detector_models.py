"""Tiny detectors in the standard format, random weights, one per family object_detector_mapper loads:
OWLv2 (with CLIP's own tokenizer), Grounding DINO and DETR,
built from configs and saved with `save_pretrained`, so the op loads them for real.

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


def build_random_grounding_dino(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Grounding DINO (Swin backbone, BERT text encoder over BERT's real
    uncased WordPiece vocabulary) and its processor, saved: the other zero-shot family's shape."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from dataengine.testbed.synthweb.blip_models import bert_vocabulary

    out = Path(out_dir)
    tokenizer = BertTokenizerFast(vocab=bert_vocabulary())
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                      out_features=["stage1", "stage2"])
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=swin, text_config=bert, use_timm_backbone=False,
                                 use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=2,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=10, num_feature_levels=2, encoder_n_points=2,
                                 decoder_n_points=2, max_text_len=32)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(str(out))
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    return out


def build_random_detr(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """A randomly initialised tiny DETR (ResNet backbone from its config) whose classes are `labels`, and
    its image processor, saved: the closed-vocabulary family's shape."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    out = Path(out_dir)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"],
                            layer_type="basic")
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
                        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    DetrForObjectDetection(config).eval().save_pretrained(str(out))
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(str(out))
    return out
