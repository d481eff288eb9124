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


def open_clip_image_prep(model: str, pretrained: str | None = None) -> tuple[Any, tuple[int, int], tuple, tuple]:
    """What `load_open_clip`'s preprocessing does before ToTensor + Normalize (resize, crop, RGB: a PIL image
    in, one out), the (height, width) it yields, and the mean and std, read from the configs open_clip
    would use (built-in, tag, local directory or hub cache) without building the model: a prepare task
    needs them and must not load weights."""
    import json
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    name, tag = open_clip_name(model, pretrained)
    cfg = asdict(PreprocessCfg())
    if name.startswith("local-dir:"):
        config = json.loads((Path(name.removeprefix("local-dir:")) / OPEN_CLIP_CONFIG).read_text())
    elif name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        config = _get_hf_config(name.removeprefix("hf-hub:"), cache_dir=os.environ.get("OPEN_CLIP_CACHE"))
    else:
        config = {"model_cfg": open_clip.get_model_config(name) or {}}
        if tag:
            cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(name, tag))
    cfg = merge_preprocess_dict(cfg, config.get("preprocess_cfg", {}))
    size = (config.get("model_cfg") or {}).get("vision_cfg", {}).get("image_size")
    if size is not None:  # the model's own size wins, as in open_clip.create_model
        cfg["size"] = size
    steps = image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms
    if [type(t).__name__ for t in steps[-2:]] not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
        raise ModelNotFound(f"open_clip's preprocessing for {model!r} does not end in ToTensor + Normalize: "
                            f"{[type(t).__name__ for t in steps]}")
    height, width = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else tuple(cfg["size"])

    def prep(image: Any) -> Any:
        for step in steps[:-2]:
            image = step(image)
        return image

    return prep, (height, width), tuple(cfg["mean"]), tuple(cfg["std"])


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


def hf_image_prep(model: str) -> tuple[Any, tuple[int, int], tuple, tuple]:
    """A transformers model's image preprocessing split where `open_clip_image_prep` splits open_clip's:
    the resize its image processor does (on uint8, as the processor does: a PIL image in, H x W x 3 uint8
    out), the (height, width), and mean and std already multiplied by 1/rescale_factor, as the processor
    fuses them, so `to_model_input(..., scale=None)` on the device gives the processor's very numbers.
    Reads the processor's config only (local directory or hub cache), never the weights."""
    import numpy as np
    import torch
    from transformers import AutoImageProcessor

    processor = from_local_or_hub(model, lambda source, local_only: AutoImageProcessor.from_pretrained(
        source, local_files_only=local_only), "image processor", needs_config=False)
    size = processor.size
    if not (getattr(size, "height", None) and getattr(size, "width", None)):
        raise ModelNotFound(f"the image processor of {model!r} does not resize to a fixed height x width ({size})")
    factor = 1.0 / processor.rescale_factor if processor.do_rescale else 1.0
    mean = (torch.tensor(processor.image_mean) * factor).tolist()  # float32, as the processor computes them
    std = (torch.tensor(processor.image_std) * factor).tolist()

    def prep(image: Any) -> Any:
        tensor = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return processor.resize(tensor, size=size, resample=processor.resample).permute(1, 2, 0).numpy()

    return prep, (size.height, size.width), tuple(mean), tuple(std)