"""What the ops that call an LLM share: the image as the model gets it, the openai backend opened with
the run's cache, usage ledger and key, and the API key carried from the driver to workers that lack it."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TypeVar

from pydantic import SecretStr

from dataengine.core.layout import LLM_CACHE_DIR, LLM_USAGE_DIR
from dataengine.io.imaging import ImageOptions, process_image
from dataengine.llm.backends.openai_chat import OpenAIBackendConfig, OpenAIChat
from dataengine.llm.cache import ResponseCache
from dataengine.llm.usage import UsageLedger
from dataengine.ops.base import OpConfig, Requirement

#: what a `backend: vllm` LLM stage needs on its nodes
OpConfigT = TypeVar("OpConfigT", bound=OpConfig)

VLLM_REQUIREMENT = Requirement("vllm", "pip install 'dataengine[vllm]' (Ray Data LLM and vLLM, on GPU nodes)")


def image_data_url(data: bytes, max_side: int) -> str:
    """A row's image as a JPEG data URL, its long side at most `max_side` (never upscaled): what an
    OpenAI-compatible vision model takes in a message. `ImageRejected` (`decode_error`, ...)."""
    jpeg = process_image(data, ImageOptions(image_size=max_side, resize_mode="keep_ratio_largest",
                                            resize_only_if_bigger=True, encode_format="jpeg", encode_quality=90))
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.data).decode("ascii")


def bound_to_run(config: OpConfigT, run_dir: Path) -> OpConfigT:
    """An LLM stage's config for this run's workers: where the cache and usage live (`_run_dir`) and, for
    `backend: openai`, the driver's API key for workers whose environment lacks the variable (`_api_key`:
    private attributes are never dumped into the spec, run.json or logs)."""
    bound = config.model_copy()
    bound._run_dir = str(run_dir)  # type: ignore[attr-defined]
    openai: OpenAIBackendConfig | None = getattr(config, "openai", None)
    env = openai.api_key_env if openai and getattr(config, "backend", None) == "openai" else None
    bound._api_key = SecretStr(os.environ[env]) if env and os.environ.get(env) else None  # type: ignore[attr-defined]
    return bound


def state_path(run_dir: str | None, default: str, configured: str | None = None) -> Path | None:
    if configured:
        return Path(configured).expanduser()
    return Path(run_dir) / default if run_dir else None


def open_openai(openai: OpenAIBackendConfig, run_dir: str | None, cache_dir: str | None,
                key: SecretStr | None) -> OpenAIChat:
    """The openai backend with the run's reply cache and usage ledger (shared by every LLM op of a run)."""
    cache = state_path(run_dir, LLM_CACHE_DIR, cache_dir)
    usage = state_path(run_dir, LLM_USAGE_DIR)
    return OpenAIChat(openai, ResponseCache(cache) if cache else None, UsageLedger(usage) if usage else None,
                      key.get_secret_value() if key else None)
