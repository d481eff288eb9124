"""open_clip vision towers as transformers `CLIPVisionModel` directories.

`LlavaForConditionalGeneration` builds its vision tower with `AutoModel`, so it takes transformers
CLIP/SigLIP models only; many CLIP towers (and the demo's) are open_clip checkpoints. The layouts map
one to one (the same mapping as transformers' own CLIP conversion script): the converted tower gives
the same embeddings as open_clip's `encode_image` once open_clip's projection is applied to its pooled
output (checked in the tests), and its processor the same normalisation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"


class UnsupportedTower(ValueError):
    """An open_clip tower whose layout has no transformers CLIP equivalent."""


def is_open_clip_dir(path: str | Path) -> bool:
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


def _vision_config(model_cfg: dict[str, Any]) -> Any:
    from transformers import CLIPVisionConfig

    vision = model_cfg["vision_cfg"]
    for key in ("attentional_pool", "no_ln_pre", "final_ln_after_pool", "timm_model_name"):
        if vision.get(key):
            raise UnsupportedTower(f"open_clip vision_cfg.{key} has no transformers CLIP equivalent")
    if vision.get("pool_type", "tok") != "tok":
        raise UnsupportedTower(f"open_clip vision_cfg.pool_type={vision['pool_type']!r}: only 'tok' (CLS) maps to CLIP")
    width = vision["width"]
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"], num_attention_heads=width // vision.get("head_width", 64),
        image_size=vision["image_size"], patch_size=vision["patch_size"], projection_dim=model_cfg["embed_dim"],
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", layer_norm_eps=1e-5)


def _state_dict(visual_state: dict[str, Any], layers: int) -> dict[str, Any]:
    s = visual_state
    out = {
        "vision_model.embeddings.class_embedding": s["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": s["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": s["positional_embedding"],
        "vision_model.pre_layrnorm.weight": s["ln_pre.weight"], "vision_model.pre_layrnorm.bias": s["ln_pre.bias"],
        "vision_model.post_layernorm.weight": s["ln_post.weight"],
        "vision_model.post_layernorm.bias": s["ln_post.bias"],
        "visual_projection.weight": s["proj"].T.contiguous(),
    }
    renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for name, weight, bias in zip("qkv", s[src + "attn.in_proj_weight"].chunk(3), s[src + "attn.in_proj_bias"].chunk(3)):
            out[dst + f"self_attn.{name}_proj.weight"] = weight.contiguous()
            out[dst + f"self_attn.{name}_proj.bias"] = bias.contiguous()
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[dst + f"{new}.{kind}"] = s[src + f"{old}.{kind}"]
    return out


def convert_open_clip_vision(src: str | Path, out_dir: str | Path) -> Path:
    """Write `src`'s (an open_clip model directory) vision tower and image processor to `out_dir`."""
    import open_clip
    from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

    src, out = Path(src), Path(out_dir)
    cfg = json.loads((src / OPEN_CLIP_CONFIG).read_text())
    model_cfg, preprocess = cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    hf_config = _vision_config(model_cfg)
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{src.resolve()}")
    state = _state_dict(clip.visual.state_dict(), hf_config.num_hidden_layers)
    CLIPVisionModelWithProjection(hf_config).load_state_dict(state, strict=True)  # every weight has its place
    # LLaVA reads hidden states: the contrastive projection is not needed. Key prefixes follow the
    # installed transformers' own layout for CLIPVisionModel
    tower = CLIPVisionModel(hf_config)
    prefix = "" if hasattr(tower, "embeddings") else "vision_model."
    tower.load_state_dict({prefix + k.removeprefix("vision_model."): v for k, v in state.items()
                           if not k.startswith("visual_projection.")}, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(str(out))
    size = model_cfg["vision_cfg"]["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=preprocess.get("mean", [0.48145466, 0.4578275, 0.40821073]),
        image_std=preprocess.get("std", [0.26862954, 0.26130258, 0.27577711]),
    ).save_pretrained(str(out))
    log.info("converted open_clip vision tower %s -> %s", src, out)
    return out
