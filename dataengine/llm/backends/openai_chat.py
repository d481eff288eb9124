"""Chat completions against any OpenAI-compatible endpoint (OpenAI, vLLM's server, TGI, ...).

A lean aiohttp client (or the `openai` package's own, `http_client: openai-sdk`) does the HTTP:
connection pooling, per-request timeout, and retries with exponential backoff on 408/409/429/5xx and
timeouts, honouring `Retry-After` (`chat_http.py`). We add
what a data pipeline needs around it: a bound on requests in flight per worker (the cluster-wide
bound is that times the op's actor count), an on-disk reply cache checked before any request, usage
and cost accounting shared by all workers, and a budget that stops the run cleanly.

The API key is read from the environment variable the spec names: on the worker, else the driver's
value shipped with the op (a private attribute, never dumped). It is never part of the spec, the cache
key, logs, run.json or outputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from dataengine.core.fields import OPERATIONAL
from dataengine.llm.backends.base import Reply, Request
from dataengine.llm.backends.chat_http import AiohttpChat, ChatTransport, OpenAISdkChat, RequestFailed
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
    http_client: Literal["aiohttp", "openai-sdk"] = Field(
        json_schema_extra=OPERATIONAL, default="aiohttp",
        description="Who sends the requests: aiohttp (lean: about 0.2 ms of CPU per request) or the openai "
        "package's client (httpx: 0.6-1.2 ms). Same retries, timeouts and reasons either way.")
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


class EndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model, missing key variable): stop the run."""


#: connections per openai-sdk client: httpx's pool scans every connection on each request, so one pool
#: of 256 costs milliseconds of CPU per request; several small pools cost a fraction of that
CONNECTIONS_PER_CLIENT = 32
#: the longest `close` waits for the loop thread (each client's close, then the thread's end)
CLOSE_TIMEOUT_S = 5.0
#: the default endpoint when `base_url` is not given
OPENAI_BASE_URL = "https://api.openai.com/v1"


#: the outcome of a request not sent because the batch is stopping (the endpoint refused us, or the budget)
_NOT_SENT = object()


@dataclass(frozen=True)
class _Sent:
    """What the loop thread hands back for one request: the outcome and, for a reply, what to cache."""

    index: int
    outcome: Completion | RequestFailed | BaseException | object
    key: str | None = None


class OpenAIChat:
    """Async chat completions run from synchronous code: one event loop thread per worker, kept across
    batches so the connection pools stay warm.

    The work is split so the loop thread does only the network: the calling thread builds each
    request's body and cache key, reads the cache, and parses; the loop thread waits on the bound, sends,
    and checks the reply; a writer thread puts each reply in the cache and the usage ledger as it
    arrives, before the caller sees it (so a kill -9 re-sends only the requests in flight and the
    replies still queued for the writer, whatever the caller was doing, and file writes never stall
    the loop). Requests are sent as they are built (`complete_iter` takes an iterable), so the first is
    on the wire before the batch's last prompt is written."""

    def __init__(self, config: OpenAIBackendConfig, cache: ResponseCache | None = None,
                 ledger: UsageLedger | None = None, fallback_key: str | None = None) -> None:
        self.config, self.cache, self.ledger = config, cache, ledger
        self._fallback_key = fallback_key  # the driver's key, when this worker's environment has none
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-loop", daemon=True)
        self._thread.start()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="openai-cache")  # cache and ledger writes
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to its tasks
        lanes = 1 if config.http_client == "aiohttp" else -(-config.max_concurrency // CONNECTIONS_PER_CLIENT)
        sizes = [config.max_concurrency // lanes + (i < config.max_concurrency % lanes) for i in range(lanes)]
        self._lanes = [self._run(self._make_lane(size)) for size in sizes]
        self._next_lane = 0
        self._known_usage = Usage()  # totals read at batch start + what this worker spent since
        self._structured = config.structured_mode()  # auto: json_schema until the endpoint refuses it
        self._halted = False  # set by the loop thread on a refusal or the budget: queued requests stay unsent

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_lane(self, size: int) -> tuple[ChatTransport, asyncio.Semaphore]:
        """A client whose pool keeps `size` connections alive, and the semaphore that bounds it to `size`
        (made on the loop thread: aiohttp's session belongs to the loop it was made on)."""
        env = self.config.api_key_env
        key = (os.environ.get(env) or self._fallback_key) if env else None
        if env and not key:
            raise EndpointError(f"llava_synthesis_mapper: environment variable {env} (openai.api_key_env) is not set "
                                "on the driver or the workers; set it, or set api_key_env: null for an endpoint "
                                "without keys")
        config = self.config
        transport: ChatTransport
        if config.http_client == "aiohttp":
            transport = AiohttpChat(config.base_url or OPENAI_BASE_URL, key, size, config.timeout_s, config.max_retries)
        else:
            transport = OpenAISdkChat(config.base_url, key or "none", size, config.timeout_s, config.max_retries)
        return transport, asyncio.Semaphore(size)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Reply]]:
        """The backend interface over `complete_iter`: a failed request is a reply with its `error`."""
        model = self.config.model
        seen: list[Request] = []

        def messages() -> Iterator[list[dict[str, Any]]]:
            for request in requests:
                seen.append(request)
                yield request.messages or []

        for i, done in self.complete_iter(messages()):
            if isinstance(done, RequestFailed):
                yield seen[i], Reply(model=model, error=done.reason)
            else:
                yield seen[i], Reply(model=model, text=done.content, finish_reason=done.finish_reason,
                                     prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                                     cost_usd=done.cost_usd, cached=done.cached)

    def complete_iter(self, requests: Iterable[list[dict[str, Any]]]) -> Iterator[tuple[int, Completion | RequestFailed]]:
        """(index, reply) for each of `requests` as replies arrive; a failed request yields a `RequestFailed`.

        Each request is sent as soon as it is drawn from `requests` (cache hits are answered at once: a
        request identical to an earlier one of the batch whose reply is already in is one of them), and the
        caller works on early replies while later ones are in flight. At the end, raises
        `BudgetExhausted` (in-flight requests were let finish and cached) when the run's budget is
        reached, or `EndpointError` when the endpoint refused us outright; no request is sent after either.
        """
        if self.ledger is not None:
            self._known_usage = self.ledger.totals()
        arrived: queue.SimpleQueue[_Sent] = queue.SimpleQueue()
        self._halted = False
        pending, ahead = 0, 2 * self.config.max_concurrency
        stop: BaseException | None = None

        def settle(sent: _Sent) -> tuple[int, Completion | RequestFailed] | None:
            nonlocal stop
            outcome = sent.outcome
            if outcome is _NOT_SENT:
                return None
            if isinstance(outcome, RequestFailed) and outcome.fatal:
                stop = stop or EndpointError(f"the LLM endpoint refused the request ({outcome.detail}); "
                                             "check base_url, model and the API key")
            elif isinstance(outcome, BaseException) and not isinstance(outcome, RequestFailed):
                stop = stop or outcome  # BudgetExhausted, or a bug in the loop thread
            else:
                return sent.index, outcome  # a reply is already in the cache (`_record_then_deliver`)
            return None

        for i, messages in enumerate(requests):
            if stop is not None:
                break
            structured = self._structured
            params = self.config.generation_params(structured)
            key = request_key(self.config.model, messages, params)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                yield i, Completion(hit.content, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, 0.0, True)
                continue
            body = self._body(messages, params)
            self._loop.call_soon_threadsafe(self._spawn, _Request(i, messages, structured, key, body), arrived)
            pending += 1
            # replies that came in meanwhile: the caller works on them between sends; past twice the bound
            # in flight, wait for one (bodies with images are large: the queue ahead of the bound stays short)
            while pending:
                try:
                    sent = arrived.get(block=pending >= ahead)
                except queue.Empty:
                    break
                pending -= 1
                if (done := settle(sent)) is not None:
                    yield done
        while pending:
            pending -= 1
            if (done := settle(arrived.get())) is not None:
                yield done
        if stop is not None:
            raise stop

    def _body(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> bytes:
        return json.dumps({"model": self.config.model, "messages": messages, **params},
                          ensure_ascii=False).encode("utf-8")

    def _record_then_deliver(self, sent: _Sent, arrived: queue.SimpleQueue[_Sent]) -> None:
        """On the writer thread: a reply's cache entry and usage line, then the reply to the caller (a
        failed write reaches the caller as the outcome, like a bug in the loop)."""
        assert isinstance(sent.outcome, Completion)
        try:
            self._record(sent.key, sent.outcome)
        except BaseException as e:
            arrived.put(_Sent(sent.index, e))
            return
        arrived.put(sent)

    def _record(self, key: str | None, done: Completion) -> None:
        """A reply's cache entry and usage line (the loop only sends)."""
        if self.ledger is not None:
            self.ledger.record(done.prompt_tokens, done.completion_tokens, done.cost_usd)
        if self.cache is not None and key is not None:
            self.cache.put(key, CachedReply(done.content, done.finish_reason, done.prompt_tokens,
                                            done.completion_tokens))

    def _spawn(self, request: _Request, arrived: queue.SimpleQueue[_Sent]) -> None:
        """On the loop thread: start one request, its outcome to `arrived` whatever happens."""
        async def deliver() -> None:
            try:
                sent = await self._one(request)
                if isinstance(sent.outcome, BudgetExhausted) or getattr(sent.outcome, "fatal", False):
                    self._halted = True
                if isinstance(sent.outcome, Completion):
                    # cached as it arrives, whatever the caller is doing, and before the caller sees it; the
                    # writer hands it on, off the loop (its connection slot is already free)
                    self._writer.submit(self._record_then_deliver, sent, arrived)
                else:
                    arrived.put(sent)
            except BaseException as e:  # a bug, or the loop going away: the caller must not wait forever
                arrived.put(_Sent(request.index, e))
                if not isinstance(e, Exception):
                    raise

        task = self._loop.create_task(deliver())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, request: _Request) -> _Sent:
        sent = await self._attempt(request)
        if isinstance(sent.outcome, RequestFailed) and self._refuses_schema(sent.outcome, request.structured):
            if self._structured == "json_schema":  # the first refusal; requests in flight with it follow it here
                log.warning("the endpoint refuses response_format json_schema (%s); sending requests without it "
                            "from now on (replies are parsed from the shapes models write)", sent.outcome.detail[:200])
                self._structured = "none"
            sent = await self._attempt(request)
        return sent

    def _refuses_schema(self, failed: RequestFailed, sent: str) -> bool:
        """A 400 about the response format, to a request that carried the schema under `structured: auto`."""
        if failed.reason != "bad_request" or sent != "json_schema" or self.config.structured != "auto":
            return False
        detail = failed.detail.lower()
        return any(word in detail for word in ("response_format", "json_schema", "structured", "guided"))

    async def _attempt(self, request: _Request) -> _Sent:
        """One request, sent with the structured mode in force when it gets a connection, not when it
        was queued (the endpoint may have refused the schema meanwhile)."""
        config = self.config
        transport, semaphore = self._lanes[self._next_lane]
        self._next_lane = (self._next_lane + 1) % len(self._lanes)
        async with semaphore:
            if self._halted:
                return _Sent(request.index, _NOT_SENT)
            if self._structured != request.structured:
                request.structured = self._structured
                params = config.generation_params(request.structured)
                request.key = request_key(config.model, request.messages, params)
                request.body = self._body(request.messages, params)
            over = config.budget.exceeded(self._known_usage)
            if over:
                return _Sent(request.index, BudgetExhausted(over))
            try:
                data = await transport.complete(request.body)
            except RequestFailed as failed:
                return _Sent(request.index, failed)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost = config.cost(prompt_tokens, completion_tokens)
        self._known_usage.add(prompt_tokens, completion_tokens, cost)
        return _Sent(request.index, Completion(choice["message"].get("content"), choice.get("finish_reason"),
                                               prompt_tokens, completion_tokens, cost, False), request.key)

    def close(self) -> None:
        """Close the clients and stop the loop, waiting at most CLOSE_TIMEOUT_S for each: called from
        `__del__`, possibly at interpreter exit, when the loop's daemon thread is already frozen; an
        unbounded wait there kept a stopped run's actor process alive forever after Ray had shut down."""
        if self._loop.is_running() and self._thread.is_alive():
            try:
                for transport, _ in self._lanes:
                    asyncio.run_coroutine_threadsafe(transport.close(), self._loop).result(timeout=CLOSE_TIMEOUT_S)
            except Exception:  # a timeout or a failing close: the process is going away anyway
                log.debug("openai clients not closed cleanly", exc_info=True)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=CLOSE_TIMEOUT_S)
        self._writer.shutdown(wait=True)  # replies already received are written before the ledger closes
        if self.ledger is not None:
            self.ledger.close()


@dataclass
class _Request:
    """One request on its way: the body and cache key for the structured mode it carries."""

    index: int
    messages: list[dict[str, Any]]
    structured: str
    key: str
    body: bytes
