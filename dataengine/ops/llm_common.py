"""What the ops that call an LLM share: their config's private state and vllm phases, the op's life
(requirements, binding to the run, closing the backend), the image as the model gets it, the openai
backend opened with the run's cache, usage ledger and key, and the API key carried from the driver to
workers that lack it."""

from __future__ import annotations

import base64
import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, TypeVar

import pyarrow as pa
from pydantic import PrivateAttr, SecretStr

from dataengine.core import columns as C
from dataengine.core.layout import LLM_CACHE_DIR, LLM_USAGE_DIR
from dataengine.io.imaging import ImageOptions, process_image
from dataengine.llm.backends.base import Backend, Request
from dataengine.llm.backends.openai_chat import OpenAIBackendConfig, OpenAIChat
from dataengine.llm.backends.vllm_engine import (
    REQUEST_COLUMN,
    VLLMBackendConfig,
    postprocess_row,
    preprocess_row,
    request_json,
)
from dataengine.llm.cache import ResponseCache
from dataengine.llm.usage import UsageLedger
from dataengine.ops.base import Op, OpConfig, RayLLMStage, Requirement

OpConfigT = TypeVar("OpConfigT", bound=OpConfig)

#: what a `backend: vllm` LLM stage needs on its nodes
VLLM_REQUIREMENT = Requirement("vllm", "pip install 'dataengine[vllm]' (Ray Data LLM and vLLM, on GPU nodes)")


class LLMOpConfig(OpConfig):
    """What an LLM stage's config carries besides its fields: where the run keeps the reply cache and
    usage (`_run_dir`, set by `bind_run`), the vllm phase this copy runs (`_phase`: "prepare" writes the
    requests, None reads the engine's replies), and the driver's API key for workers whose environment
    lacks the variable. Private attributes are never dumped into the spec or run.json nor shown in a repr."""

    _run_dir: str | None = PrivateAttr(default=None)
    _phase: str | None = PrivateAttr(default=None)
    _api_key: SecretStr | None = PrivateAttr(default=None)

    def with_phase(self, phase: str | None) -> "LLMOpConfig":
        copy = self.model_copy()
        copy._phase = phase
        return copy

    @property
    def uses_engine(self) -> bool:
        return getattr(self, "backend", None) == "vllm"

    @property
    def preparing(self) -> bool:
        """The vllm prepare phase: this copy writes each row's request for the engine."""
        return self.uses_engine and self._phase == "prepare"

    @property
    def finishing(self) -> bool:
        """The vllm finish phase: this copy reads the replies the engine wrote into the rows."""
        return self.uses_engine and self._phase != "prepare"


LLMConfigT = TypeVar("LLMConfigT", bound=LLMOpConfig)


class LLMOp(Op[LLMConfigT]):
    """An op that asks an LLM: an actor holding its backend (closed with the op), bound to the run (its
    cache, usage and key), needing vLLM on its nodes with `backend: vllm`."""

    stateful: ClassVar[bool] = True
    backend: Backend | None = None

    @classmethod
    def requires(cls, config: LLMConfigT) -> list[Requirement]:
        return [VLLM_REQUIREMENT] if config.uses_engine else []

    @classmethod
    def bind_run(cls, config: LLMConfigT, run_dir: Path) -> LLMConfigT:
        return bound_to_run(config, run_dir)

    def __del__(self) -> None:
        if getattr(self, "backend", None) is not None:
            self.backend.close()


def engine_stage(config: LLMOpConfig, vllm: VLLMBackendConfig, images: bool) -> RayLLMStage:
    """The Ray Data LLM stage between the op's prepare copy and its finish copy."""
    return RayLLMStage(prepare=config.with_phase("prepare"), processor_kwargs=vllm.processor_kwargs(images=images),
                       preprocess=functools.partial(preprocess_row, config=vllm),
                       postprocess=functools.partial(postprocess_row, config=vllm))


def engine_requests(requests: Iterable[Request], reasons: list[str | None]) -> pa.Table:
    """The prepare phase's output: each row's chat messages as JSON for the engine (null for rows already
    rejected, with their reasons)."""
    asked: list[str | None] = [None] * len(reasons)
    for request in requests:
        asked[request.index] = request_json(request.messages or [])
    return pa.table({REQUEST_COLUMN: pa.array(asked, pa.string()), C.REJECT_REASON: pa.array(reasons, pa.string())})


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
