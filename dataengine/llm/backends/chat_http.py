"""How one chat-completion request travels: the openai SDK's client, or a lean aiohttp client.

Both answer `await complete(body) -> dict` (the response JSON, its first choice checked) or raise
`RequestFailed` with a short stable reason, after the same retries: 408/409/429/5xx, timeouts and
broken connections, with exponential backoff and jitter (0.5 s doubling to 8 s, as the SDK does), a
server's `Retry-After` / `retry-after-ms` honoured up to a minute.

Why two: the SDK builds every request through httpx (request objects, header merging, a pure-Python
HTTP parser) and costs 0.6-1.2 ms of CPU per request here; aiohttp parses HTTP in C and costs about
0.2 ms. At hundreds of requests per second per worker that is the difference between a client that
keeps the endpoint busy and one that is the bottleneck (bench/synthesize.py). The SDK stays as
`http_client: openai-sdk` for endpoints that need what only it does.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from typing import Any, Protocol

#: statuses worth another try (the openai SDK's set: 408 timeout, 409 lock, 429 rate, 5xx)
RETRY_STATUSES = frozenset({408, 409, 429})
#: the SDK's backoff: 0.5 s doubling to 8 s, times a jitter of 0.75-1
INITIAL_RETRY_DELAY_S, MAX_RETRY_DELAY_S = 0.5, 8.0
#: a Retry-After longer than this is not waited for (the backoff is used instead)
MAX_RETRY_AFTER_S = 60.0
#: statuses that refuse every request alike (key, permission, model): the run stops
FATAL_STATUSES = frozenset({401, 403, 404})


class RequestFailed(Exception):
    """A request that failed after the client's retries; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str, fatal: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.fatal = reason, detail, fatal


class ChatTransport(Protocol):
    async def complete(self, body: bytes) -> dict[str, Any]:
        """The response JSON of POST /chat/completions with this JSON body; `RequestFailed` else."""
        ...

    async def close(self) -> None:
        ...


def checked_reply(data: Any) -> dict[str, Any]:
    """The response JSON if it holds a first choice with a message; `bad_response` otherwise."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
            raise TypeError("message.content is not text")
    except (KeyError, IndexError, TypeError) as e:
        raise RequestFailed("bad_response", f"no usable choice in the reply ({type(e).__name__}: {e})") from None
    return data


def backoff_delay(retry: int) -> float:
    """Seconds before retry number `retry` (0-based), without a server's word on it."""
    return min(INITIAL_RETRY_DELAY_S * 2 ** retry, MAX_RETRY_DELAY_S) * (1 - 0.25 * random.random())


def retry_after(headers: Any) -> float | None:
    """The server's wait, from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), if sane."""
    value: float | None = None
    try:
        if headers.get("retry-after-ms"):
            value = float(headers["retry-after-ms"]) / 1000
        elif headers.get("retry-after"):
            text = headers["retry-after"]
            try:
                value = float(text)
            except ValueError:
                parsed = email.utils.parsedate_to_datetime(text)
                value = parsed.timestamp() - time.time()
    except (TypeError, ValueError):
        return None
    return value if value is not None and 0 <= value <= MAX_RETRY_AFTER_S else None


def status_failure(status: int, text: str) -> RequestFailed:
    """An HTTP error status as our reason; the endpoint's own message kept as the detail."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    detail = f"HTTP {status}: {message}"
    if status in FATAL_STATUSES:
        return RequestFailed("endpoint", detail, fatal=True)
    if status == 429:
        return RequestFailed("rate_limited", detail)
    return RequestFailed("server_error" if status >= 500 else "bad_request", detail)


class AiohttpChat:
    """One aiohttp session per worker: a connection pool of `connections` kept alive, the key in a
    header built once. Runs on the caller's event loop (created there, used there)."""

    def __init__(self, base_url: str, key: str | None, connections: int, timeout_s: float, max_retries: int) -> None:
        import aiohttp

        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, keepalive_timeout=30.0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))
        self._max_retries = max_retries

    async def complete(self, body: bytes) -> dict[str, Any]:
        import aiohttp

        for attempt in range(self._max_retries + 1):
            wait: float | None = None
            try:
                async with self._session.post(self._url, data=body, headers=self._headers) as response:
                    raw = await response.read()
                    if response.status < 300:
                        try:
                            return checked_reply(json.loads(raw))
                        except ValueError as e:  # a body that is not JSON (cut short, HTML, ...)
                            raise RequestFailed("bad_response", f"the reply is not JSON ({e})") from None
                    failure = status_failure(response.status, raw.decode("utf-8", "replace"))
                    retryable = response.status in RETRY_STATUSES or response.status >= 500
                    should = response.headers.get("x-should-retry")
                    if should in ("true", "false"):
                        retryable = should == "true"
                    if not retryable:
                        raise failure
                    wait = retry_after(response.headers)
            except asyncio.TimeoutError:
                failure = RequestFailed("timeout", "no reply within timeout_s")
            except aiohttp.ClientPayloadError as e:  # the body was cut off mid-way
                failure = RequestFailed("bad_response", f"{type(e).__name__}: {e}")
            except aiohttp.ClientError as e:  # refused, reset, closed early
                failure = RequestFailed("connection", f"{type(e).__name__}: {e}")
            if attempt == self._max_retries:
                raise failure
            await asyncio.sleep(backoff_delay(attempt) if wait is None else wait)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._session.close()


class OpenAISdkChat:
    """The openai package's async client over httpx: its own retries, timeouts and error types."""

    def __init__(self, base_url: str | None, key: str, connections: int, timeout_s: float, max_retries: int) -> None:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        try:  # the openai client's HTTP layer: httpx2 in openai >= 3, httpx before
            import httpx2 as httpx
        except ImportError:
            import httpx

        # keep-alive for every connection (the client's default keeps 100: past that, each request
        # would open and close a connection of its own)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=30.0)
        self._client = AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=max_retries,
                                   http_client=DefaultAsyncHttpxClient(limits=limits, timeout=timeout_s))

    async def complete(self, body: bytes) -> dict[str, Any]:
        try:
            # `post` with a ready body and an untyped reply: the typed `chat.completions.create` re-walks
            # every message through its TypedDict transform, and a typed reply builds pydantic models
            data = await self._client.post("/chat/completions", cast_to=dict, body=json.loads(body))
        except Exception as e:  # the client's own errors, after its retries
            raise sdk_failure(e) from None
        return checked_reply(data)

    async def close(self) -> None:
        await self._client.close()


def sdk_failure(e: Exception) -> RequestFailed:
    """Map the openai client's exceptions to our reasons; `fatal` ones stop the run instead of a row."""
    import openai

    if isinstance(e, RequestFailed):
        return e
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
    return RequestFailed("bad_response", f"{type(e).__name__}: {e}")
