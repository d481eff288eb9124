"""What the ops that call an LLM share: the image as the model gets it, the openai backend opened with
the run's cache, usage ledger and key, and the API key carried from the driver to workers that lack it."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from pydantic import SecretStr

from dataengine.core.layout import LLM_CACHE_DIR, LLM_USAGE_DIR
from dataengine.io.imaging import ImageOptions, process_image
from dataengine.llm.backends.openai_chat import OpenAIBackendConfig, OpenAIChat
from dataengine.llm.cache import ResponseCache
from dataengine.llm.usage import UsageLedger


def image_data_url(data: bytes, max_side: int) -> str:
    """A row's image as a JPEG data URL, its long side at most `max_side` (never upscaled): what an
    OpenAI-compatible vision model takes in a message. `ImageRejected` (`decode_error`, ...)."""
    jpeg = process_image(data, ImageOptions(image_size=max_side, resize_mode="keep_ratio_largest",
                                            resize_only_if_bigger=True, encode_format="jpeg", encode_quality=90))
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.data).decode("ascii")


def driver_key(openai: OpenAIBackendConfig | None) -> SecretStr | None:
    """The driver's API key (for workers whose environment lacks the variable), if it has one."""
    env = openai.api_key_env if openai else None
    return SecretStr(os.environ[env]) if env and os.environ.get(env) else None


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
