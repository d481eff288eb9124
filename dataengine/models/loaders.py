"""Load a resolved model (open_clip, causal LM, tokenizer, BLIP) offline, on its device and dtype.

Examples:
    >>> model, preprocess, tokenizer = load_open_clip("ViT-B-32", "laion2b_s34b_b79k")  # doctest: +SKIP
    >>> lm, lm_tokenizer = load_causal_lm("Qwen/Qwen2.5-0.5B", device="auto")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from dataengine.models.devices import DeviceName, DtypeName, select_device, select_dtype
from dataengine.models.sources import (
    OPEN_CLIP_CONFIG,
    ModelNotFound,
    from_local_or_hub,
    hf_cache_dir,
    hub_offline,
    resolve_model_ref,
)

log = logging.getLogger(__name__)


def open_clip_name(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """The (model_name, pretrained) open_clip understands for a spec's reference, or ModelNotFound."""
    import open_clip

    model = resolve_model_ref(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise ModelNotFound(f"{path} is a directory but holds no {OPEN_CLIP_CONFIG} (an open_clip model directory "
                                "has open_clip_config.json and open_clip_model.safetensors)")
        return f"local-dir:{path.resolve()}", None
    if model.startswith(("hf-hub:", "local-dir:")):
        return model, None
    if model not in open_clip.list_models():
        raise ModelNotFound(f"open_clip has no architecture {model!r} and no directory {path} exists "
                            f"(architectures: e.g. {', '.join(open_clip.list_models()[:5])}, ...)")
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(pretrained).expanduser().is_file():
            raise ModelNotFound(f"checkpoint file {pretrained!r} for {model} not found")
        return model, str(Path(pretrained).expanduser())
    if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise ModelNotFound(f"open_clip has no pretrained tag {pretrained!r} for {model} "
                            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(model))})")
    return model, pretrained


def load_open_clip(model: str, pretrained: str | None = None, device: DeviceName = "auto",
                   dtype: DtypeName = "auto") -> tuple[Any, Any, Any]:
    """Load an open_clip model, its eval preprocessing and its tokenizer, in eval mode."""
    import open_clip

    name, tag = open_clip_name(model, pretrained)
    torch_device = select_device(device)
    precision = {"float32": "fp32", "bfloat16": "pure_bf16", "float16": "pure_fp16"}[
        str(select_dtype(dtype, torch_device)).removeprefix("torch.")]
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, device=torch_device, precision=precision, cache_dir=os.environ.get("OPEN_CLIP_CACHE"))
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as e:
        where = "the local directory" if name.startswith("local-dir:") else \
            f"the hub cache ({hf_cache_dir()}){' with HF_HUB_OFFLINE set' if hub_offline() else ' and the hub'}"
        raise ModelNotFound(f"cannot load open_clip model {model!r} (pretrained {pretrained!r}) from {where}: {e}") from e
    clip.eval()
    log.info("loaded open_clip %s (%s) on %s as %s", model, pretrained, torch_device, precision)
    return clip, preprocess, tokenizer


def load_causal_lm(model: str, device: DeviceName = "auto", dtype: DtypeName = "auto") -> tuple[Any, Any]:
    """Load a transformers causal LM and its tokenizer (local dir or hub id, cache first), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = select_device(device)
    torch_dtype = select_dtype(dtype, torch_device)
    lm, tokenizer = from_local_or_hub(model, lambda source, local_only: (
        AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, dtype=torch_dtype),
        AutoTokenizer.from_pretrained(source, local_files_only=local_only)), "causal LM")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    lm.to(torch_device).eval()
    log.info("loaded causal LM %s on %s as %s", model, torch_device, torch_dtype)
    return lm, tokenizer


def load_tokenizer(model: str) -> Any:
    """A transformers tokenizer by local directory or hub id (cache first; the hub only when online)."""
    from transformers import AutoTokenizer

    return from_local_or_hub(model, lambda source, local_only: AutoTokenizer.from_pretrained(
        source, local_files_only=local_only), "tokenizer", needs_config=False)


def load_blip(model: str, task: str, device: DeviceName = "auto", dtype: DtypeName = "auto") -> tuple[Any, Any]:
    """A BLIP model and its processor, in eval mode: `task` is "caption" (`BlipForConditionalGeneration`,
    e.g. Salesforce/blip-image-captioning-large) or "itm" (`BlipForImageTextRetrieval`, e.g.
    Salesforce/blip-itm-large-coco). Local directory or hub id, cache first."""
    import transformers

    model_class = getattr(transformers, {"caption": "BlipForConditionalGeneration", "itm": "BlipForImageTextRetrieval"}[task])
    torch_device = select_device(device)
    torch_dtype = select_dtype(dtype, torch_device)
    blip, processor = from_local_or_hub(model, lambda source, local_only: (
        model_class.from_pretrained(source, local_files_only=local_only, dtype=torch_dtype),
        transformers.BlipProcessor.from_pretrained(source, local_files_only=local_only)), f"BLIP {task} model")
    blip.to(torch_device).eval()
    log.info("loaded BLIP %s model %s on %s as %s", task, model, torch_device, torch_dtype)
    return blip, processor
