"""Resolve a model reference and load it offline, on the right device and dtype.

One place knows how a spec names a model:
- an open_clip architecture and pretrained tag (`ViT-B-32` + `laion2b_s34b_b79k`), or an
  architecture and a checkpoint file (`ViT-B-32` + `/models/clip.pt`);
- `hf-hub:org/repo` (open_clip) or a Hugging Face hub id (`Qwen/Qwen2.5-0.5B`) for transformers;
- a local directory in the standard layout (`open_clip_config.json` + weights for open_clip,
  `config.json` + weights + tokenizer files for transformers);
- `prefix:name` for a model source registered by a plugin (`dataengine.plugins`), such as the test
  bed's `synthweb-demo:clip`: the source turns it into a local directory.

Hub models are looked up in the local cache first, so a machine without network (or with
`HF_HUB_OFFLINE=1`) loads whatever is cached. A model that cannot be found raises `ModelNotFound`
saying what was looked for and where.

Examples:
    >>> model, preprocess, tokenizer = load_open_clip("ViT-B-32", "laion2b_s34b_b79k")  # doctest: +SKIP
    >>> lm, lm_tokenizer = load_causal_lm("Qwen/Qwen2.5-0.5B", device="auto")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
OPEN_CLIP_CONFIG = "open_clip_config.json"


class ModelNotFound(FileNotFoundError):
    """No model under the given reference: the message says what was looked for and where."""


def select_device(device: DeviceName = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; asking for `cuda` without one is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested, but no CUDA GPU is visible to this worker (set device: auto or cpu)")
    return torch.device(device)


def select_dtype(dtype: DtypeName, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPUs that support it (float16 on older ones) and float32 on the CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cache_dir() -> Path:
    """Our own cache (converted vision towers, the test bed's demo models): $DATAENGINE_CACHE, else
    ~/.cache/dataengine."""
    return Path(os.environ.get("DATAENGINE_CACHE") or Path.home() / ".cache" / "dataengine")


def _hf_cache_dir() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def source_prefix(model: str) -> str | None:
    """The registered model source (`dataengine.plugins.MODEL_SOURCES`) a reference names, if any:
    `synthweb-demo:clip` names the test bed's source; `hf-hub:` and paths are not sources."""
    from dataengine.plugins import MODEL_SOURCES, registered

    prefix, sep, _ = model.partition(":")
    return prefix if sep and prefix in registered(MODEL_SOURCES) else None


def resolve_model_ref(model: str) -> str:
    """A reference with a registered source prefix (`synthweb-demo:lm`) as the local path its source
    gives; any other reference unchanged. The runner resolves a spec's references once, on the driver,
    so workers get plain paths."""
    from dataengine.plugins import MODEL_SOURCES, registered

    prefix = source_prefix(model)
    return str(registered(MODEL_SOURCES)[prefix](model)) if prefix else model


def resolve_model_refs(config: Any) -> Any:
    """A copy of a stage's config (a pydantic model) with each registered-source reference resolved."""
    updates = {name: resolve_model_ref(value) for name, value in config if isinstance(value, str) and source_prefix(value)}
    return config.model_copy(update=updates) if updates else config


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
            f"the hub cache ({_hf_cache_dir()}){' with HF_HUB_OFFLINE set' if _offline() else ' and the hub'}"
        raise ModelNotFound(f"cannot load open_clip model {model!r} (pretrained {pretrained!r}) from {where}: {e}") from e
    clip.eval()
    log.info("loaded open_clip %s (%s) on %s as %s", model, pretrained, torch_device, precision)
    return clip, preprocess, tokenizer


def from_local_or_hub(model: str, load: Callable[[str, bool], T], what: str, needs_config: bool = True) -> T:
    """`load(source, local_files_only)` for a local directory, else a hub id: the cache first, then the hub
    unless HF_HUB_OFFLINE is set. `ModelNotFound` says what was looked for and where."""
    path = Path(resolve_model_ref(model)).expanduser()
    if needs_config and path.exists() and not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} exists but holds no config.json (a transformers model directory is what "
                            "save_pretrained writes)")
    source = str(path) if path.exists() else model
    errors = []
    for local_only in ((True,) if path.exists() or _offline() else (True, False)):
        try:
            return load(source, local_only)
        except (OSError, ValueError) as e:
            errors.append(f"{'cache' if local_only else 'hub'}: {e}")
    where = f"directory {path}" if path.exists() else f"the hub cache ({_hf_cache_dir()})" + \
        (" (HF_HUB_OFFLINE is set, so not the hub)" if _offline() else " and the hub")
    raise ModelNotFound(f"cannot load {what} {model!r} from {where}: " + " | ".join(errors))


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
