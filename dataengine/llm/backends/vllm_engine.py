"""The `vllm` backend: generation inside the cluster with Ray Data LLM (`ray.data.llm`, vLLM engine).

Ray Data LLM is a dataset-level processor (chat template, tokenise, vLLM engine on GPU actors,
detokenise), so the synthesis stage runs in three steps on the stream (`dataengine.engine.raydata`):
the op's *prepare* phase writes each alive row's chat messages into `_llm_messages`; the processor
generates (`preprocess_row` / `postprocess_row` below translate our rows to its rows and back); the
op's *finish* phase parses and validates the replies exactly as for the `openai` backend. Rows that
are already rejected still pass through the engine (the processor sees every row) with a one-token
placeholder request, and their placeholder reply is ignored.

Needs `pip install "ray[llm]"` (vLLM) on GPU nodes; the engine is not exercised without a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dataengine.core import columns as C
from dataengine.llm.backends.base import Reply, Request
from dataengine.llm.prompts import TURNS_SCHEMA

REQUEST_COLUMN = C.LLM_REQUEST
#: generated text, finish reason, prompt tokens, completion tokens
REPLY_COLUMNS = (C.LLM_REPLY_TEXT, C.LLM_REPLY_FINISH, C.LLM_REPLY_PROMPT_TOKENS, C.LLM_REPLY_COMPLETION_TOKENS)
_PLACEHOLDER = [{"role": "user", "content": "."}]


class VLLMBackendConfig(BaseModel):
    """vLLM engine settings for Ray Data LLM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="Hub id or local directory of the instruction-tuned LLM.")
    tensor_parallel_size: int = Field(default=1, gt=0, description="GPUs per engine replica.")
    replicas: int = Field(default=1, gt=0, description="Engine replicas (data parallel).")
    engine_batch_size: int = Field(default=64, gt=0, description="Rows per request batch sent to an engine.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context length; default: the model's.")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type, e.g. H100, A100.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="More vLLM engine arguments.")
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int = Field(default=1024, gt=0)
    structured: Literal["json_schema", "none"] = Field(
        default="json_schema", description="json_schema: the engine decodes to the turns' JSON Schema (vLLM "
                                           "structured outputs); none: free text, parsed as the openai backend's is.")

    def sampling_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.structured == "json_schema":  # a JSON string: one plain column in the rows Ray Data carries
            params["structured_outputs"] = {"json": json.dumps(TURNS_SCHEMA)}
        return params

    def processor_kwargs(self, images: bool = False) -> dict[str, Any]:
        """Keyword arguments of `ray.data.llm.vLLMEngineProcessorConfig`; `images`: the messages carry
        image parts (OpenAI content format), which Ray Data LLM's multimodal stage turns into model inputs."""
        engine = {"tensor_parallel_size": self.tensor_parallel_size, **self.engine_kwargs}
        if self.max_model_len:
            engine["max_model_len"] = self.max_model_len
        kwargs: dict[str, Any] = {"model_source": self.model, "engine_kwargs": engine, "concurrency": self.replicas,
                                  "batch_size": self.engine_batch_size}
        if self.accelerator_type:
            kwargs["accelerator_type"] = self.accelerator_type
        if images:
            kwargs["prepare_multimodal_stage"] = {"enabled": True}
        return kwargs


def request_json(messages: list[dict[str, str]]) -> str:
    """The prepare phase's request column: a row's chat messages, as the engine's preprocess reads them."""
    return json.dumps(messages, ensure_ascii=False)


@dataclass(frozen=True)
class EngineReplies:
    """The finish phase behind `generate()`: the replies the engine wrote into the rows (no cost here:
    the cluster's GPUs are not billed per token)."""

    model: str

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Reply]]:
        text, finish, prompt_tokens, completion_tokens = REPLY_COLUMNS
        for request in requests:
            row = request.row or {}
            yield request, Reply(model=self.model, text=row.get(text), finish_reason=row.get(finish),
                                 prompt_tokens=row.get(prompt_tokens), completion_tokens=row.get(completion_tokens),
                                 cost_usd=0.0, cached=False)

    def close(self) -> None:
        pass


def preprocess_row(row: dict[str, Any], config: VLLMBackendConfig) -> dict[str, Any]:
    """Our row -> the processor's row: `messages` and `sampling_params` added, everything else kept."""
    request = row.get(REQUEST_COLUMN)
    messages = json.loads(request) if request else _PLACEHOLDER
    sampling = config.sampling_params() if request else {"temperature": 0.0, "max_tokens": 1}
    return {**row, "messages": messages, "sampling_params": sampling}


def postprocess_row(row: dict[str, Any], config: VLLMBackendConfig) -> dict[str, Any]:
    """The processor's row -> our row with `REPLY_COLUMNS`; the processor's own columns dropped."""
    asked = bool(row.get(REQUEST_COLUMN))
    generated = int(row.get("num_generated_tokens") or 0)
    reply = {
        REPLY_COLUMNS[0]: row.get("generated_text") if asked else None,
        REPLY_COLUMNS[1]: ("length" if generated >= config.max_tokens else "stop") if asked else None,
        REPLY_COLUMNS[2]: int(row.get("num_input_tokens") or 0) if asked else None,
        REPLY_COLUMNS[3]: generated if asked else None,
    }
    engine_columns = {"messages", "sampling_params", "generated_text", "num_generated_tokens", "num_input_tokens",
                      "prompt", "prompt_token_ids", "generated_tokens", "request_id", "time_taken_llm", "params",
                      "batch_uuid", "embeddings", "metrics", "__inference_error__"}
    kept = {k: v for k, v in row.items() if k not in engine_columns}
    return {**kept, **reply}
