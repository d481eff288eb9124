"""A local OpenAI-compatible chat-completions server that can misbehave on demand.

An LLM client (retries, timeouts, concurrency limits) is only as well tested as the failures it has
seen, and a real endpoint fails rarely and never on cue. This fake speaks enough of the wire protocol
for the real `openai` client to parse it, and a `Responder` decides per request what it answers:
content, an error status with headers, a delay, a hang, a malformed body, a truncated completion.

It is a raw asyncio protocol on its own event loop in a daemon thread rather than an
`http.server`: a benchmark holds hundreds of requests open at once, and a thread per connection
would measure the server's scheduler instead of the client. Statistics cover
`POST /v1/chat/completions` only, so `sum(status_counts.values())` matches the requests answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
MODEL_ID = "fake"
LISTEN_BACKLOG = 2048  # a benchmark opens hundreds of connections at once; the default 100 drops SYNs
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CHOICES = 128
MALFORMED_BODY = b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"index": 0, '
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error",
                429: "requests"}


@dataclass
class Reply:
    """What the server answers to one chat-completion request."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float | None = None  # None: the server's current `latency`
    hang: bool = False
    malformed: bool = False
    finish_reason: str = "stop"
    prompt_tokens: int | None = None  # None: estimated from the request's text
    completion_tokens: int | None = None  # None: estimated from `content`


Responder = Callable[[dict], Reply]


def default_responder(body: dict) -> Reply:
    """A constant answer: most tests care about the client's behaviour, not the text."""
    return Reply(content="ok")


class BadRequest(Exception):
    """A request the server refuses before routing; the connection is closed after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    keep_alive: bool


@dataclass
class Answer:
    """A response decided but not yet written."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


# --- HTTP/1.1 parsing -------------------------------------------------------------------------------

def parse_request(buf: bytearray) -> tuple[Request, int] | None:
    """The first complete request in `buf` and the bytes it used, or None while it is incomplete.

    Parsing whole requests from a buffer (rather than reading line by line) keeps the per-request
    cost to a few `find`s, which matters at thousands of requests a second on two cores.
    """
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise BadRequest(431, "request head too large")
        return None
    method, path, version, headers = _parse_head(bytes(buf[:head_end]).decode("latin-1"))
    found = _read_body(buf, head_end + 4, headers)
    if found is None:
        return None
    body, end = found
    return Request(method, path, headers, body, _keep_alive(version, headers)), end


def _parse_head(head: str) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers; names lower-cased because HTTP header names are case-insensitive."""
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, f"malformed request line {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, f"malformed header line {line[:100]!r}")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return parts[0], parts[1].split("?", 1)[0], parts[2], headers


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked to keep it."""
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _read_body(buf: bytearray, start: int, headers: dict[str, str]) -> tuple[bytes, int] | None:
    """The body after the head at `start` and where it ends, or None while it is incomplete."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(buf, start)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(400, "invalid Content-Length") from None
    if length < 0 or length > MAX_BODY_BYTES:
        raise BadRequest(413 if length > 0 else 400, f"unacceptable Content-Length {length}")
    if len(buf) < start + length:
        return None
    return bytes(buf[start:start + length]), start + length


def _read_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A `Transfer-Encoding: chunked` body (extensions and trailers skipped), or None if incomplete."""
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
        except ValueError:
            raise BadRequest(400, "malformed chunk size") from None
        pos = line_end + 2
        if size == 0:
            return _skip_trailers(buf, pos, bytes(body))
        if len(body) + size > MAX_BODY_BYTES:
            raise BadRequest(413, "request body too large")
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise BadRequest(400, "malformed chunk")
        body += buf[pos:pos + size]
        pos += size + 2


def _skip_trailers(buf: bytearray, pos: int, body: bytes) -> tuple[bytes, int] | None:
    """Consume trailer lines up to the empty line that ends a chunked body."""
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        if line_end == pos:
            return body, pos + 2
        pos = line_end + 2


def encode_response(status: int, body: bytes, headers: dict[str, str], keep_alive: bool) -> bytes:
    """One HTTP/1.1 response; `headers` may override the defaults (case-insensitively)."""
    out = {"content-type": ("Content-Type", "application/json"),
           "content-length": ("Content-Length", str(len(body))),
           "connection": ("Connection", "keep-alive" if keep_alive else "close")}
    for name, value in headers.items():
        out[name.lower()] = (name, value)
    out["content-length"] = ("Content-Length", str(len(body)))  # framing is never the caller's to break
    reason = _reason(status)
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{n}: {v}" for n, v in out.values()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# --- OpenAI-shaped bodies ---------------------------------------------------------------------------

def error_body(status: int, message: str | None = None, code: str | None = None) -> bytes:
    """The `{"error": {...}}` shape the openai client reads its exception message from."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if status == 429 and code is None:
        code = "rate_limit_exceeded"
    error = {"message": message or _reason(status), "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def estimate_prompt_tokens(body: dict) -> int:
    """About four characters a token over every message's text: close enough for usage accounting."""
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return max(1, chars // 4)


def completion_body(body: dict, reply: Reply, n: int, request_id: str) -> bytes:
    """A `chat.completion` object with `n` identical choices, echoing the request's model."""
    message = {"role": "assistant", "content": reply.content, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else estimate_prompt_tokens(body)
    completion = reply.completion_tokens
    if completion is None:
        completion = n * max(1, len(reply.content or "") // 4)
    return json.dumps({
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or MODEL_ID,
        "choices": [{**choice, "index": i} for i in range(n)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
        "system_fingerprint": None,
    }).encode()


def models_body() -> bytes:
    return json.dumps({"object": "list", "data": [
        {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "dataengine"}]}).encode()


def check_chat_body(raw: bytes) -> tuple[dict | None, str | None]:
    """The parsed body (when it is a JSON object) and the reason to refuse it, if any."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "request body is not valid JSON"
    if not isinstance(body, dict):
        return None, "request body must be a JSON object"
    if not isinstance(body.get("messages"), list):
        return body, "'messages' is a required property and must be a list"
    if body.get("stream"):
        return body, "streaming not supported by the fake"
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        return body, f"'n' must be an integer from 1 to {MAX_CHOICES}"
    return body, None


# --- statistics -------------------------------------------------------------------------------------

class _Stats:
    """Counters written by the loop thread and read by tests from theirs, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.status_counts: dict[int, int] = {}
        self.bodies: list[dict] = []
        self.headers_seen: list[dict[str, str]] = []

    def received(self, body: dict | None, headers: dict[str, str]) -> None:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if body is not None:
                self.bodies.append(body)
                self.headers_seen.append(headers)

    def done(self, status: int | None) -> None:
        """The request left the server: answered with `status`, or abandoned (None)."""
        with self.lock:
            self.in_flight -= 1
            if status is not None:
                self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def reset(self) -> None:
        """Forget history but not the present: requests still in flight stay counted."""
        with self.lock:
            self.requests = 0
            self.max_in_flight = self.in_flight
            self.status_counts = {}
            self.bodies = []
            self.headers_seen = []


# --- the connection protocol ------------------------------------------------------------------------

class _Connection(asyncio.Protocol):
    """One client connection: requests answered one after another (HTTP/1.1 keep-alive).

    Reading never pauses, even while a request is being answered, so a client that gives up is
    noticed at once: its task is cancelled and a hung or delayed request stops counting as in flight.
    """

    def __init__(self, server: FakeLLMServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task | None = None
        self.expect_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """The client left (or the server closed): abandon the request being answered, if any."""
        self.server._connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def eof_received(self) -> bool:
        """A half-close counts as the client leaving: no client of this server waits after one."""
        return False

    def data_received(self, data: bytes) -> None:
        if not self.writable():
            return
        self.buf += data
        if self.task is None:
            self._next_request()

    def _next_request(self) -> None:
        """Start answering the next complete request in the buffer, if there is one."""
        try:
            parsed = parse_request(self.buf)
        except BadRequest as e:
            self.buf.clear()
            self.write(encode_response(e.status, error_body(e.status, str(e)), {}, False), close=True)
            return
        if parsed is None:
            self._maybe_continue()
            return
        request, used = parsed
        del self.buf[:used]
        self.expect_sent = False
        self.task = self.loop.create_task(self._answer(request))

    def _maybe_continue(self) -> None:
        """Say `100 Continue` to a client that waits for it before sending a body."""
        head_end = self.buf.find(b"\r\n\r\n")
        if self.expect_sent or head_end < 0 or b"100-continue" not in self.buf[:head_end].lower():
            return
        self.expect_sent = True
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _answer(self, request: Request) -> None:
        try:
            if request.method == "POST" and request.path == CHAT_PATH:
                await self._chat(request)
            elif request.method == "GET" and request.path == MODELS_PATH:
                self.respond(request, 200, models_body())
            else:
                message = f"no route for {request.method} {request.path}"
                self.respond(request, 404, error_body(404, message, "unknown_url"))
        except Exception as e:  # a bad Reply or a bug must not leave the client waiting forever
            log.exception("fake LLM server failed on %s %s", request.method, request.path)
            self.respond(request, 500, error_body(500, f"fake server error: {type(e).__name__}: {e}"))
        finally:
            self.task = None
        if self.writable() and self.buf:
            self._next_request()

    async def _chat(self, request: Request) -> None:
        """Answer a chat completion; statistics are settled before the answer leaves, so a client
        that has its response never sees the request still counted in flight."""
        body, problem = check_chat_body(request.body)
        self.server._stats.received(body, request.headers)
        answer: Answer | None = None
        try:
            if problem is not None:
                answer = Answer(400, error_body(400, problem))
            else:
                answer = await self._reply(body or {})
        finally:
            sent = answer if answer is not None and self.writable() else None
            self.server._stats.done(sent.status if sent is not None else None)
        if sent is not None:
            self.respond(request, sent.status, sent.body, sent.headers)

    async def _reply(self, body: dict) -> Answer | None:
        """Ask the responder and wait as it says; None when the connection closed meanwhile."""
        reply = self._ask(body)
        if reply.hang:
            await self.loop.create_future()  # until cancelled: the client left or the server stopped
        delay = self.server.latency if reply.delay is None else reply.delay
        if delay > 0:
            await asyncio.sleep(delay)
        if not self.writable():
            return None
        return Answer(reply.status, self._reply_body(body, reply), reply.headers)

    def _ask(self, body: dict) -> Reply:
        """The responder's reply; a responder that raises answers 500 so the test sees why."""
        try:
            return self.server.responder(body)
        except Exception as e:
            log.exception("fake LLM responder raised")
            return Reply(content=f"responder raised {type(e).__name__}: {e}", status=500)

    def _reply_body(self, body: dict, reply: Reply) -> bytes:
        if reply.malformed:
            return MALFORMED_BODY
        if not 200 <= reply.status < 300:
            return error_body(reply.status, reply.content)
        n = body.get("n") or 1
        return completion_body(body, reply, n, self.server._next_id())

    def respond(self, request: Request, status: int, body: bytes,
                headers: dict[str, str] | None = None) -> None:
        """Write one response, with the `x-request-id` the openai client exposes as `_request_id`."""
        headers = {"x-request-id": f"req_{self.server._next_id()}", **(headers or {})}
        self.write(encode_response(status, body, headers, request.keep_alive), close=not request.keep_alive)

    def writable(self) -> bool:
        """False once the client left or the server closed: writing then would only log warnings."""
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes, close: bool = False) -> None:
        if not self.writable():
            return
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()  # flushes what was written first


# --- the server -------------------------------------------------------------------------------------

class FakeLLMServer:
    """An OpenAI-compatible `/v1/chat/completions` on 127.0.0.1, answering what `responder` says.

    `responder` runs in the server's event-loop thread (keep it cheap; a slow one stalls every
    connection) and may be replaced while the server runs, as may `latency`.
    """

    def __init__(self, responder: Responder | None = None, latency: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.responder: Responder = responder or default_responder
        self.latency = latency
        self.host = host
        self.port = port
        self._stats = _Stats()
        self._connections: set[_Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _next_id(self) -> str:
        return f"{next(self._ids):08d}"

    # statistics (copies, so a caller never iterates a list the loop thread is appending to)
    @property
    def requests(self) -> int:
        return self._stats.requests

    @property
    def in_flight(self) -> int:
        return self._stats.in_flight

    @property
    def max_in_flight(self) -> int:
        return self._stats.max_in_flight

    @property
    def status_counts(self) -> dict[int, int]:
        with self._stats.lock:
            return dict(self._stats.status_counts)

    @property
    def bodies(self) -> list[dict]:
        with self._stats.lock:
            return list(self._stats.bodies)

    @property
    def headers_seen(self) -> list[dict[str, str]]:
        with self._stats.lock:
            return list(self._stats.headers_seen)

    @property
    def open_connections(self) -> int:
        """Client connections open now: a check that a client pools (or leaks) connections."""
        return len(self._connections)

    def reset_stats(self) -> None:
        self._stats.reset()

    # life cycle
    def start(self) -> FakeLLMServer:
        """Listen and serve from a daemon thread; returns once the port is known."""
        if self._thread is not None:
            raise RuntimeError("FakeLLMServer already started")
        self.loop = asyncio.new_event_loop()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="fake-llm-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            self.stop()
            raise RuntimeError("FakeLLMServer failed to start") from self._error
        return self

    def stop(self) -> None:
        """Close the listener and every connection (hung requests included), then join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._stop is not None and self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        thread.join(10)
        if thread.is_alive():
            log.warning("fake LLM server thread did not stop within 10 s")
        self._stop = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        assert self.loop is not None
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:  # reported by start() when it happens before listening
            self._error = e
            if self._ready.is_set():
                log.exception("fake LLM server stopped on an error")
        finally:
            self._ready.set()
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), self.host, self.port,
                                          backlog=LISTEN_BACKLOG, reuse_address=True)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(server)

    async def _shutdown(self, server: asyncio.Server) -> None:
        """Stop listening, drop every connection, and let the answering tasks see they are gone."""
        server.close()
        tasks = [c.task for c in self._connections if c.task is not None]
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in tasks:  # connection_lost cancels them too, but only on a later loop iteration
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        await server.wait_closed()
