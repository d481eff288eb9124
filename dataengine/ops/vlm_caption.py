"""`vlm_caption_mapper`: a vision-language model writes a detailed caption from the image itself.

ShareGPT4V showed that detailed captions written by a model that sees the image (GPT-4V, then its own
captioner) beat web alt-text as training data; ALLaVA writes such a caption first and then the
questions and answers from it (caption-then-QA). Here the caption goes to `vlm_caption`; with
`as_candidate` it is also appended to `synthetic_captions`, so `capfilt_filter` scores it like BLIP's
candidates, and `llava_synthesis_mapper` puts it first in its context.

The image is sent re-encoded as JPEG (long side at most `image_max_side`) in a base64 data URL, in the
OpenAI chat content format, to an OpenAI-compatible endpoint (`backend: openai`: GPT-4o class, or
vLLM serving Qwen2.5-VL or LLaVA-OneVision) or through Ray Data LLM on the cluster's GPUs
(`backend: vllm`). The prompt is ours: `pipelines/prompts/vlm_caption.yaml`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.core.fields import OPERATIONAL
from dataengine.io.imaging import ImageRejected
from dataengine.llm.backends.base import Request
from dataengine.llm.backends.openai_chat import OpenAIBackendConfig
from dataengine.llm.backends.vllm_engine import EngineReplies, VLLMBackendConfig
from dataengine.llm.prompts import default_prompts_dir, load_yaml, with_image
from dataengine.ops.base import RayLLMStage, register_op
from dataengine.ops.llm_common import LLMOp, LLMOpConfig, engine_requests, engine_stage, image_data_url, open_openai

log = logging.getLogger(__name__)

PROMPT_FILE = "vlm_caption.yaml"


class VlmCaptionConfig(LLMOpConfig):
    """Detailed captions from a vision-language model."""

    op: Literal["vlm_caption_mapper"] = "vlm_caption_mapper"
    backend: Literal["openai", "vllm"] = Field(default="openai", description="Who sees the image.")
    openai: OpenAIBackendConfig | None = Field(
        default_factory=lambda: OpenAIBackendConfig(model="gpt-4o-mini"),
        description="Endpoint settings (backend: openai); default: gpt-4o-mini at OpenAI, key in OPENAI_API_KEY.")
    vllm: VLLMBackendConfig | None = Field(default=None, description="Engine settings (backend: vllm).")
    prompt_file: str | None = Field(default=None, description="System prompt and instruction; default: "
                                                              "pipelines/prompts/vlm_caption.yaml.")
    image_max_side: int = Field(default=768, gt=0, description="Longest side of the image sent, in pixels.")
    as_candidate: bool = Field(default=True, description="Also append the caption to synthetic_captions "
                                                         "(capfilt_filter scores it).")
    min_words: int = Field(default=5, ge=1, description="Shorter captions are rejected as vlm_caption_too_short.")
    transient_errors: Literal["fail", "reject"] = Field(
        default="fail", json_schema_extra=OPERATIONAL, description="After retries, a timeout/429/5xx stops the run "
        "(resume later: replies already received are cached) or rejects the row as llm_error:<why>.")
    cache_dir: str | None = Field(default=None, json_schema_extra=OPERATIONAL,
                                  description="Reply cache; default: <run>/_state/llm-cache.")
    concurrency: int | None = Field(default=1, gt=0, description="Actors; requests in flight = this x max_concurrency.")
    batch_size: int = Field(default=64, gt=0, description="Rows per batch.")

    @model_validator(mode="after")
    def _backend_settings(self) -> VlmCaptionConfig:
        if self.backend == "openai" and self.openai is None:
            raise ValueError("backend openai needs an `openai:` section (model, base_url, ...)")
        if self.backend == "vllm" and self.vllm is None:
            raise ValueError("backend vllm needs a `vllm:` section (a vision-language model, engine_kwargs, ...)")
        return self


@register_op
class VlmCaptionMapper(LLMOp[VlmCaptionConfig]):
    """Write `vlm_caption` from the image with a vision-language model; reject what fails."""

    Config = VlmCaptionConfig

    def __init__(self, config: VlmCaptionConfig) -> None:
        super().__init__(config)
        prompt = load_yaml(Path(config.prompt_file) if config.prompt_file else default_prompts_dir() / PROMPT_FILE)
        self.system, self.instruction = str(prompt["system"]).strip(), str(prompt["instruction"]).strip()
        if config.uses_engine:
            self.backend = EngineReplies(config.vllm.model if config.vllm else "vllm")
        elif config.openai is not None:  # captions are prose: no response_format
            self.backend = open_openai(config.openai.model_copy(update={"structured": "none", "json_mode": False}),
                                       config._run_dir, config.cache_dir, config._api_key)

    @classmethod
    def ray_llm_stage(cls, config: VlmCaptionConfig) -> RayLLMStage | None:
        if not config.uses_engine or config.vllm is None:
            return None
        return engine_stage(config, config.vllm.model_copy(update={"structured": "none"}), images=True)

    def process(self, batch: pa.Table) -> pa.Table:
        config = self.config
        finishing = config.finishing
        wanted = {C.UID, C.SYNTHETIC_CAPTIONS, *(_REPLY_COLUMNS if finishing else (C.IMAGE,))}
        rows = batch.select([c for c in batch.column_names if c in wanted]).to_pylist()
        reasons: list[str | None] = [None] * len(rows)
        requests = []
        for i, row in enumerate(rows):
            if finishing:
                requests.append(Request(i, row[C.UID], {}, row=row))
                continue
            if not row.get(C.IMAGE):
                reasons[i] = "no_image"
                continue
            try:
                url = image_data_url(row[C.IMAGE], config.image_max_side)
            except ImageRejected as e:
                reasons[i] = e.reason
                continue
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": with_image(self.instruction, url)}]
            requests.append(Request(i, row[C.UID], {}, messages=messages, row=row))
        if config.preparing:
            return engine_requests(requests, reasons)
        assert self.backend is not None
        captions: list[str | None] = [None] * len(rows)
        raw: list[str | None] = [None] * len(rows)
        failed = None
        for request, reply in self.backend.generate(requests):
            i = request.index
            if reply.error is not None:
                failed = failed or f"VLM request for row {request.uid} failed after retries ({reply.error})"
                reasons[i] = f"llm_error:{reply.error}"
                continue
            caption = " ".join((reply.text or "").split())
            if reply.finish_reason == "length":
                reasons[i], raw[i] = "llm_invalid:truncated", reply.text
            elif len(caption.split()) < config.min_words:
                reasons[i], raw[i] = ("llm_invalid:empty" if not caption else "vlm_caption_too_short"), reply.text
            else:
                captions[i] = caption
        if failed and config.transient_errors == "fail":
            raise RuntimeError(f"{failed}; the run stops here and a rerun resumes (replies received so far are cached)")
        columns: dict[str, pa.Array] = {C.VLM_CAPTION: pa.array(captions, pa.string())}
        if config.as_candidate:
            columns[C.SYNTHETIC_CAPTIONS] = pa.array(
                [[*(row.get(C.SYNTHETIC_CAPTIONS) or []), c] if c else row.get(C.SYNTHETIC_CAPTIONS)
                 for row, c in zip(rows, captions)], pa.list_(pa.string()))
        columns[C.LLM_RAW_RESPONSE] = pa.array(raw, pa.string())
        columns[C.REJECT_REASON] = pa.array(reasons, pa.string())
        return pa.table(columns)


#: what the finish phase reads of a row (vllm): the engine's reply
_REPLY_COLUMNS = (C.LLM_REPLY_TEXT, C.LLM_REPLY_FINISH, C.LLM_REPLY_PROMPT_TOKENS, C.LLM_REPLY_COMPLETION_TOKENS)
