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
import queue
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from dataengine.core.fields import OPERATIONAL
from dataengine.llm.backends.base import Reply, Request
from dataengine.llm.cache import CachedReply, ResponseCache, request_key
from dataengine.llm.prompts import TURNS_SCHEMA
from dataengine.llm.usage import Budget, BudgetExhausted, Usage, UsageLedger

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
    structured: Literal["auto", "json_schema", "json_object", "none"] = Field(
        default="auto", description="response_format: json_schema sends the turns' JSON Schema (OpenAI structured "
        "outputs; vLLM's server decodes to it), json_object asks for any JSON, none sends nothing; auto: "
        "json_schema, and none for the rest of the run once the endpoint refuses it.")
    json_mode: bool = Field(default=False, description="Deprecated: structured: json_object.")
    price_input_per_1m: float = Field(json_schema_extra=OPERATIONAL, default=0.0, ge=0, description="USD per million prompt tokens, for the cost estimate.")
    price_output_per_1m: float = Field(json_schema_extra=OPERATIONAL, default=0.0, ge=0, description="USD per million completion tokens.")
    max_cost_usd: float | None = Field(json_schema_extra=OPERATIONAL, default=None, gt=0, description="Stop the run when the estimated spend reaches this.")
    max_total_tokens: int | None = Field(json_schema_extra=OPERATIONAL, default=None, gt=0, description="Stop the run when this many tokens are used.")

    def structured_mode(self) -> str:
        """What `response_format` the requests carry at first (auto starts with json_schema)."""
        if self.json_mode and self.structured == "auto":
            return "json_object"
        return "json_schema" if self.structured == "auto" else self.structured

    def generation_params(self, structured: str | None = None) -> dict[str, Any]:
        """What besides model and messages decides a reply: part of the cache key. `structured`: the mode
        in force (default: the configured one)."""
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.seed is not None:
            params["seed"] = self.seed
        mode = structured or self.structured_mode()
        if mode == "json_schema":
            params["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "llava_turns", "schema": TURNS_SCHEMA, "strict": True}}
        elif mode == "json_object":
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


#: connections per client: httpx's pool scans every connection on each request, so one pool of 256
#: costs milliseconds of CPU per request; several small pools cost a fraction of that
CONNECTIONS_PER_CLIENT = 32
#: the longest `close` waits for the loop thread (each client's close, then the thread's end)
CLOSE_TIMEOUT_S = 5.0


class OpenAIChat:
    """Async chat completions run from synchronous code: one event loop thread per worker, kept
    across batches so the connection pools stay warm. `max_concurrency` is split over a few clients
    (lanes), each with its own connection pool and its share of the bound."""

    def __init__(self, config: OpenAIBackendConfig, cache: ResponseCache | None = None,
                 ledger: UsageLedger | None = None, fallback_key: str | None = None) -> None:
        self.config, self.cache, self.ledger = config, cache, ledger
        self._fallback_key = fallback_key  # the driver's key, when this worker's environment has none
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-loop", daemon=True)
        self._thread.start()
        lanes = -(-config.max_concurrency // CONNECTIONS_PER_CLIENT)
        sizes = [config.max_concurrency // lanes + (i < config.max_concurrency % lanes) for i in range(lanes)]
        self._lanes = [self._run(self._make_lane(size)) for size in sizes]
        self._next_lane = 0
        self._known_usage = Usage()  # totals read at batch start + what this worker spent since
        self._structured = config.structured_mode()  # auto: json_schema until the endpoint refuses it

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_lane(self, size: int) -> tuple[Any, asyncio.Semaphore]:
        """A client whose pool keeps `size` connections alive, and the semaphore that bounds it to `size`."""
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        try:  # the openai client's HTTP layer: httpx2 in openai >= 3, httpx before
            import httpx2 as httpx
        except ImportError:
            import httpx

        env = self.config.api_key_env
        key = (os.environ.get(env) or self._fallback_key) if env else "none"
        if not key:
            raise EndpointError(f"llava_synthesis_mapper: environment variable {env} (openai.api_key_env) is not set "
                                "on the driver or the workers; set it, or set api_key_env: null for an endpoint "
                                "without keys")
        # keep-alive for every connection (the client's default keeps 100: past that, each request
        # would open and close a connection of its own)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=30.0)
        client = AsyncOpenAI(api_key=key, base_url=self.config.base_url, timeout=self.config.timeout_s,
                             max_retries=self.config.max_retries,
                             http_client=DefaultAsyncHttpxClient(limits=limits, timeout=self.config.timeout_s))
        return client, asyncio.Semaphore(size)

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Reply]]:
        """The backend interface over `complete_iter`: a failed request is a reply with its `error`."""
        model = self.config.model
        for i, done in self.complete_iter([request.messages or [] for request in requests]):
            if isinstance(done, RequestFailed):
                yield requests[i], Reply(model=model, error=done.reason)
            else:
                yield requests[i], Reply(model=model, text=done.content, finish_reason=done.finish_reason,
                                         prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                                         cost_usd=done.cost_usd, cached=done.cached)

    def complete_iter(self, requests: list[list[dict[str, str]]]) -> Iterator[tuple[int, Completion | RequestFailed]]:
        """(index, reply) for each of `requests` as replies arrive; a failed request yields a `RequestFailed`.

        The caller works on early replies while later ones are in flight. At the end, raises
        `BudgetExhausted` (in-flight requests were let finish and cached) when the run's budget is
        reached, or `EndpointError` when the endpoint refused us outright.
        """
        if self.ledger is not None:
            self._known_usage = self.ledger.totals()
        arrived: queue.SimpleQueue = queue.SimpleQueue()

        async def one(i: int, messages: list[dict[str, str]]) -> None:
            arrived.put((i, await self._one(messages)))

        async def run_all() -> None:
            await asyncio.gather(*(one(i, m) for i, m in enumerate(requests)))

        future = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
        stop: Exception | None = None
        for _ in requests:
            i, reply = arrived.get()
            if isinstance(reply, RequestFailed) and reply.fatal:
                stop = stop or EndpointError(f"the LLM endpoint refused the request ({reply.detail}); "
                                             "check base_url, model and the API key")
            elif isinstance(reply, BudgetExhausted):
                stop = stop or reply
            else:
                yield i, reply
        future.result()
        if stop is not None:
            raise stop

    async def _one(self, messages: list[dict[str, str]]) -> Completion | RequestFailed | BudgetExhausted:
        result, sent = await self._attempt(messages)
        if isinstance(result, RequestFailed) and self._refuses_schema(result, sent):
            if self._structured == "json_schema":  # the first refusal; requests in flight with it follow it here
                log.warning("the endpoint refuses response_format json_schema (%s); sending requests without it "
                            "from now on (replies are parsed from the shapes models write)", result.detail[:200])
                self._structured = "none"
            result, _ = await self._attempt(messages)
        return result

    def _refuses_schema(self, failed: RequestFailed, sent: str) -> bool:
        """A 400 about the response format, to a request that carried the schema under `structured: auto`."""
        if failed.reason != "bad_request" or sent != "json_schema" or self.config.structured != "auto":
            return False
        detail = failed.detail.lower()
        return any(word in detail for word in ("response_format", "json_schema", "structured", "guided"))

    async def _attempt(self, messages: list[dict[str, str]]) -> tuple[Completion | RequestFailed | BudgetExhausted, str]:
        """One request (or a cache hit) and the structured mode it was sent with: the mode in force when
        it gets a connection, not when it was queued."""
        from openai.types.chat import ChatCompletion

        config = self.config
        structured = self._structured
        params = config.generation_params(structured)
        key = request_key(config.model, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return Completion(hit.content, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, 0.0,
                                  True), structured
        client, semaphore = self._lanes[self._next_lane]
        self._next_lane = (self._next_lane + 1) % len(self._lanes)
        async with semaphore:
            if self._structured != structured:  # the endpoint refused the schema while this one queued
                structured = self._structured
                params = config.generation_params(structured)
                key = request_key(config.model, messages, params)
            over = config.budget.exceeded(self._known_usage)
            if over:
                return BudgetExhausted(over), structured
            try:
                # `post` with a ready body: the typed `chat.completions.create` re-walks every message
                # through its TypedDict transform, milliseconds per request with few-shot prompts
                response = await client.post("/chat/completions", cast_to=ChatCompletion,
                                             body={"model": config.model, "messages": messages, **params})
                choice = response.choices[0]
                content, finish = choice.message.content, choice.finish_reason
                usage = response.usage
                prompt_tokens = int(usage.prompt_tokens) if usage else 0
                completion_tokens = int(usage.completion_tokens) if usage else 0
            except Exception as e:  # the client's own errors, after its retries
                return _failure(e), structured
        cost = config.cost(prompt_tokens, completion_tokens)
        self._known_usage.add(prompt_tokens, completion_tokens, cost)
        if self.ledger is not None:
            self.ledger.record(prompt_tokens, completion_tokens, cost)
        if self.cache is not None:
            self.cache.put(key, CachedReply(content, finish, prompt_tokens, completion_tokens))
        return Completion(content, finish, prompt_tokens, completion_tokens, cost, False), structured

    def close(self) -> None:
        """Close the clients and stop the loop, waiting at most CLOSE_TIMEOUT_S for each: called from
        `__del__`, possibly at interpreter exit, when the loop's daemon thread is already frozen; an
        unbounded wait there kept a stopped run's actor process alive forever after Ray had shut down."""
        if self._loop.is_running() and self._thread.is_alive():
            try:
                for client, _ in self._lanes:
                    asyncio.run_coroutine_threadsafe(client.close(), self._loop).result(timeout=CLOSE_TIMEOUT_S)
            except Exception:  # a timeout or a failing close: the process is going away anyway
                log.debug("openai clients not closed cleanly", exc_info=True)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=CLOSE_TIMEOUT_S)
