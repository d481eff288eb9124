"""Chat completions against any OpenAI-compatible endpoint (OpenAI, vLLM's server, TGI, ...).

The `openai` package's async client does the HTTP: connection pooling, per-request timeout, and
retries with exponential backoff on 408/409/429/5xx and timeouts, honouring `Retry-After`. We add
what a data pipeline needs around it: a bound on requests in flight per worker (the cluster-wide
bound is that times the op's actor count), an on-disk reply cache checked before any request, usage
and cost accounting shared by all workers, and a budget that stops the run cleanly.

The API key is read from the environment variable the spec names: on the worker, else the driver's
value shipped with the op (a private attribute, never dumped). It is never part of the spec, the cache
key, logs, run.json or outputs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from dataengine.llm.cache import CachedReply, ResponseCache, request_key
from dataengine.llm.usage import Budget, BudgetExhausted, Usage, UsageLedger
from dataengine.ops.base import OPERATIONAL

log = logging.getLogger(__name__)
T = TypeVar("T")


class OpenAIBackendConfig(BaseModel):
    """Where the endpoint is, how to call it, and what it may cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="Model name the endpoint serves, e.g. gpt-4o-mini or a vLLM model id.")
    base_url: str | None = Field(default=None, description="Endpoint, e.g. http://vllm:8000/v1; default: OpenAI's.")
    api_key_env: str | None = Field(json_schema_extra=OPERATIONAL, default="OPENAI_API_KEY",
                                    description="Environment variable holding the API key; null: the endpoint needs none.")
    max_concurrency: int = Field(json_schema_extra=OPERATIONAL, default=32, gt=0, description="Requests in flight per worker (actor).")
    timeout_s: float = Field(json_schema_extra=OPERATIONAL, default=120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(json_schema_extra=OPERATIONAL, default=5, ge=0, description="Retries on 408/409/429/5xx/timeouts, with backoff and Retry-After.")
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int = Field(default=1024, gt=0, description="Completion token limit; a reply cut there is rejected.")
    seed: int | None = Field(default=None, description="Sampling seed, where the endpoint supports one.")
    json_mode: bool = Field(default=False, description="Ask for response_format json_object (OpenAI, vLLM support it).")
    price_input_per_1m: float = Field(json_schema_extra=OPERATIONAL, default=0.0, ge=0, description="USD per million prompt tokens, for the cost estimate.")
    price_output_per_1m: float = Field(json_schema_extra=OPERATIONAL, default=0.0, ge=0, description="USD per million completion tokens.")
    max_cost_usd: float | None = Field(json_schema_extra=OPERATIONAL, default=None, gt=0, description="Stop the run when the estimated spend reaches this.")
    max_total_tokens: int | None = Field(json_schema_extra=OPERATIONAL, default=None, gt=0, description="Stop the run when this many tokens are used.")

    def generation_params(self) -> dict[str, Any]:
        """What besides model and messages decides a reply: part of the cache key."""
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.seed is not None:
            params["seed"] = self.seed
        if self.json_mode:
            params["response_format"] = {"type": "json_object"}
        return params

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input_per_1m + completion_tokens * self.price_output_per_1m) / 1e6

    @property
    def budget(self) -> Budget:
        return Budget(self.max_cost_usd, self.max_total_tokens)


@dataclass(frozen=True)
class Completion:
    """One reply: its text and what it cost (0 when it came from the cache)."""

    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached: bool


class RequestFailed(Exception):
    """A request that failed after the client's retries; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str, fatal: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.fatal = reason, detail, fatal


class EndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model, missing key variable): stop the run."""


def _failure(e: Exception) -> RequestFailed:
    """Map the openai client's exceptions to our reasons; `fatal` ones stop the run instead of a row."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return RequestFailed("timeout", str(e))
    if isinstance(e, openai.APIConnectionError):
        return RequestFailed("connection", str(e))
    if isinstance(e, openai.RateLimitError):
        return RequestFailed("rate_limited", str(e))
    if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        return RequestFailed("endpoint", f"{type(e).__name__}: {e}", fatal=True)
    if isinstance(e, openai.APIStatusError):
        kind = "server_error" if e.status_code >= 500 else "bad_request"
        return RequestFailed(kind, f"HTTP {e.status_code}: {e}")
    if isinstance(e, openai.APIResponseValidationError):
        return RequestFailed("bad_response", str(e))
    return RequestFailed("bad_response", f"{type(e).__name__}: {e}")


class OpenAIChat:
    """Async chat completions run from synchronous code: one event loop thread per worker, kept
    across batches so the connection pool stays warm."""

    def __init__(self, config: OpenAIBackendConfig, cache: ResponseCache | None = None,
                 ledger: UsageLedger | None = None, fallback_key: str | None = None) -> None:
        self.config, self.cache, self.ledger = config, cache, ledger
        self._fallback_key = fallback_key  # the driver's key, when this worker's environment has none
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-loop", daemon=True)
        self._thread.start()
        self._client = self._run(self._make_client())
        self._semaphore = self._run(self._make_semaphore())
        self._known_usage = Usage()  # totals read at batch start + what this worker spent since

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_client(self) -> Any:
        from openai import AsyncOpenAI

        env = self.config.api_key_env
        key = (os.environ.get(env) or self._fallback_key) if env else "none"
        if not key:
            raise EndpointError(f"llava_synthesis_mapper: environment variable {env} (openai.api_key_env) is not set "
                                "on the driver or the workers; set it, or set api_key_env: null for an endpoint "
                                "without keys")
        return AsyncOpenAI(api_key=key, base_url=self.config.base_url, timeout=self.config.timeout_s,
                           max_retries=self.config.max_retries)

    async def _make_semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.config.max_concurrency)

    def complete_many(self, requests: list[list[dict[str, str]]]) -> list[Completion | RequestFailed]:
        """Replies for `requests` in order; a failed request is a `RequestFailed` in its place.

        Raises `BudgetExhausted` (after letting in-flight requests finish and caching them) when the
        run's budget is reached, and `EndpointError` when the endpoint refuses us outright.
        """
        if self.ledger is not None:
            self._known_usage = self.ledger.totals()
        results = self._run(self._gather(requests))
        fatal = next((r for r in results if isinstance(r, RequestFailed) and r.fatal), None)
        if fatal is not None:
            raise EndpointError(f"the LLM endpoint refused the request ({fatal.detail}); check base_url, model and the API key")
        budget_stop = next((r for r in results if isinstance(r, BudgetExhausted)), None)
        if budget_stop is not None:
            raise budget_stop
        return results  # type: ignore[return-value]

    async def _gather(self, requests: list[list[dict[str, str]]]) -> list[Any]:
        return list(await asyncio.gather(*(self._one(m) for m in requests), return_exceptions=False))

    async def _one(self, messages: list[dict[str, str]]) -> Completion | RequestFailed | BudgetExhausted:
        config = self.config
        params = config.generation_params()
        key = request_key(config.model, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return Completion(hit.content, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, 0.0, True)
        async with self._semaphore:
            over = config.budget.exceeded(self._known_usage)
            if over:
                return BudgetExhausted(over)
            try:
                response = await self._client.chat.completions.create(model=config.model, messages=messages, **params)
                choice = response.choices[0]
                content, finish = choice.message.content, choice.finish_reason
                usage = response.usage
                prompt_tokens = int(usage.prompt_tokens) if usage else 0
                completion_tokens = int(usage.completion_tokens) if usage else 0
            except Exception as e:  # the client's own errors, after its retries
                return _failure(e)
        cost = config.cost(prompt_tokens, completion_tokens)
        self._known_usage.add(prompt_tokens, completion_tokens, cost)
        if self.ledger is not None:
            self.ledger.record(prompt_tokens, completion_tokens, cost)
        if self.cache is not None:
            self.cache.put(key, CachedReply(content, finish, prompt_tokens, completion_tokens))
        return Completion(content, finish, prompt_tokens, completion_tokens, cost, False)

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._run(self._client.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)
