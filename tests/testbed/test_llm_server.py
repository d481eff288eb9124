"""The fake OpenAI server, checked through the real `openai` client: if the client parses it, it is faithful.

Also pins down what the openai client does with each misbehaviour, since an LLM client built on it
has to handle exactly those exceptions (a malformed body is a `json.JSONDecodeError`, not an APIError).
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from collections.abc import Callable, Iterator

import openai
import pytest
from openai.types.chat import ChatCompletion

from dataengine.testbed.synthweb.llm_server import FakeLLMServer, Reply, parse_request

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say something nice"}]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as s:
        yield s


def client(server: FakeLLMServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=server.base_url, max_retries=0, **kw)


def async_client(server: FakeLLMServer, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="test", base_url=server.base_url, max_retries=0, **kw)


def ask(c: openai.OpenAI, **kw) -> ChatCompletion:
    return c.chat.completions.create(model=kw.pop("model", "gpt-test"), messages=kw.pop("messages", MESSAGES), **kw)


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll: the server's loop thread updates its statistics a moment after the client returns."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def raw_exchange(server: FakeLLMServer, data: bytes) -> bytes:
    """Send raw bytes and read until the server closes: for framing the openai client never uses."""
    with socket.create_connection((server.host, server.port), timeout=3) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def allow_file_descriptors(n: int) -> None:
    """Both ends of every connection live in this process; a default soft limit of 1,024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def chat_request() -> bytes:
    payload = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    return b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)


# --- what the openai client sees -------------------------------------------------------------------

def test_completion_parses_with_content_usage_and_finish_reason(server):
    server.responder = lambda body: Reply(content="hello there", prompt_tokens=11, completion_tokens=3)
    r = ask(client(server), temperature=0.2)
    assert isinstance(r, ChatCompletion)
    assert r.object == "chat.completion" and r.model == "gpt-test" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "hello there"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 3, 14)
    assert server.bodies == [{"model": "gpt-test", "messages": MESSAGES, "temperature": 0.2}]
    assert server.requests == 1 and server.status_counts == {200: 1} and server.in_flight == 0


def test_default_reply_and_estimated_usage(server):
    r = ask(client(server))
    assert r.choices[0].message.content == "ok"
    prompt_chars = sum(len(m["content"]) for m in MESSAGES)
    assert r.usage.prompt_tokens == prompt_chars // 4 and r.usage.completion_tokens == 1


def test_finish_reason_length_is_returned_not_raised(server):
    """The openai client does not treat a truncated completion as an error: the caller must check."""
    server.responder = lambda body: Reply(content="The answer is", finish_reason="length")
    r = ask(client(server), max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "The answer is"


def test_n_choices(server):
    server.responder = lambda body: Reply(content="same")
    r = ask(client(server), n=2)
    assert [(c.index, c.message.content) for c in r.choices] == [(0, "same"), (1, "same")]


def test_429_with_retry_after_is_a_rate_limit_error(server):
    server.responder = lambda body: Reply(status=429, headers={"Retry-After": "1"}, content="slow down")
    with pytest.raises(openai.RateLimitError) as info:
        ask(client(server))
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["message"] == "slow down" and info.value.body["code"] == "rate_limit_exceeded"
    assert server.status_counts == {429: 1}


def test_500_is_an_internal_server_error(server):
    server.responder = lambda body: Reply(status=500)
    with pytest.raises(openai.InternalServerError) as info:
        ask(client(server))
    assert info.value.body["type"] == "server_error"


def test_hang_times_out_and_leaves_nothing_in_flight(server):
    server.responder = lambda body: Reply(hang=True)
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        ask(client(server, timeout=0.5))
    assert time.monotonic() - start < 3
    assert wait_for(lambda: server.in_flight == 0)
    assert server.requests == 1 and server.status_counts == {}  # nothing was ever answered


def test_malformed_body_raises_json_decode_error(server):
    """A 200 whose JSON is broken escapes the openai client as a bare `json.JSONDecodeError`.

    It is not an `openai.APIError` and is not retried, so an LLM client must catch `ValueError` itself.
    """
    server.responder = lambda body: Reply(malformed=True)
    with pytest.raises(json.JSONDecodeError) as info:
        ask(client(server))
    assert not isinstance(info.value, openai.OpenAIError)


def test_non_json_content_type_returns_text(server):
    """With a non-JSON content type the openai client returns the body as a `str`, not a ChatCompletion."""
    server.responder = lambda body: Reply(malformed=True, headers={"Content-Type": "text/html"})
    r = ask(client(server))
    assert isinstance(r, str) and r.startswith('{"id"')


def test_max_in_flight_counts_concurrent_requests(server):
    server.latency = 0.3

    async def burst() -> list[ChatCompletion]:
        c = async_client(server)
        try:
            return await asyncio.gather(*(c.chat.completions.create(model="m", messages=MESSAGES) for _ in range(20)))
        finally:
            await c.close()

    start = time.monotonic()
    results = asyncio.run(burst())
    assert time.monotonic() - start < 2  # concurrent, not 20 x 0.3 s
    assert [r.choices[0].message.content for r in results] == ["ok"] * 20
    assert server.max_in_flight == 20 and server.in_flight == 0 and server.status_counts == {200: 20}


def test_authorization_header_is_recorded(server):
    ask(client(server))
    headers = server.headers_seen[0]
    assert headers["authorization"] == "Bearer test"
    assert headers["content-type"] == "application/json"


def test_delay_overrides_latency_and_responder_sees_the_body(server):
    seen = []
    server.latency = 5.0

    def responder(body: dict) -> Reply:
        seen.append(body["messages"][-1]["content"])
        return Reply(content=body["messages"][-1]["content"].upper(), delay=0.05)

    server.responder = responder
    start = time.monotonic()
    r = ask(client(server))
    assert time.monotonic() - start < 2
    assert r.choices[0].message.content == "SAY SOMETHING NICE" and seen == ["say something nice"]


def test_responder_exception_answers_500(server):
    def broken(body: dict) -> Reply:
        raise KeyError("nope")

    server.responder = broken
    with pytest.raises(openai.InternalServerError) as info:
        ask(client(server))
    assert "KeyError" in info.value.body["message"]


def test_streaming_is_refused_with_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client(server), stream=True)
    assert "streaming" in info.value.body["message"]


def test_models_route(server):
    assert [m.id for m in client(server).models.list()] == ["fake"]
    assert server.requests == 0  # statistics count chat completions only


def test_reset_stats(server):
    ask(client(server))
    server.reset_stats()
    assert (server.requests, server.max_in_flight, server.status_counts, server.bodies, server.headers_seen) == (
        0, 0, {}, [], [])


# --- the wire, below the openai client -------------------------------------------------------------

def test_invalid_json_and_missing_messages_answer_400(server):
    raw = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                               b"Connection: close\r\n\r\n{nope")
    status, headers, body = split_response(raw)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client(server).post("/chat/completions", body={"model": "m"}, cast_to=object)
    assert "messages" in info.value.body["message"]
    assert server.requests == 2 and server.status_counts == {400: 2} and server.bodies == [{"model": "m"}]


def test_unknown_route_answers_404_json(server):
    status, _, body = split_response(raw_exchange(server, b"GET /v1/nothing HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert status == 404 and "no route" in json.loads(body)["error"]["message"]


def test_chunked_request_body(server):
    payload = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (payload[:10], payload[10:]))
    raw = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                               b"Connection: close\r\n\r\n" + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
    status, _, body = split_response(raw)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "ok"
    assert server.bodies == [{"model": "m", "messages": MESSAGES}]


def test_keep_alive_pipelined_requests_then_close(server):
    close = chat_request().replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    raw = raw_exchange(server, chat_request() + close)
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and server.requests == 2


def test_parse_request_waits_for_a_complete_body():
    head = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 4\r\n\r\n"
    assert parse_request(bytearray(head + b"{}")) is None
    request, used = parse_request(bytearray(head + b"{}{}GET"))
    assert request.body == b"{}{}" and used == len(head) + 4 and request.keep_alive


def test_stop_closes_hung_connections_promptly():
    server = FakeLLMServer(lambda body: Reply(hang=True)).start()
    sock = socket.create_connection((server.host, server.port), timeout=3)
    sock.sendall(chat_request())
    assert wait_for(lambda: server.in_flight == 1)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 2 and server.in_flight == 0
    assert sock.recv(100) == b""  # the server closed it without an answer
    sock.close()


def test_a_thousand_hung_connections_at_once_then_stop():
    """1,000 open connections each with a request in flight (waiting on the server, not on a clock)."""
    allow_file_descriptors(2200)
    server = FakeLLMServer(lambda body: Reply(hang=True)).start()

    async def main() -> list[bytes]:
        conns = await asyncio.gather(*(asyncio.open_connection(server.host, server.port) for _ in range(1000)))
        for _, writer in conns:
            writer.write(chat_request())
        assert await asyncio.to_thread(wait_for, lambda: server.in_flight == 1000, 10)
        assert server.open_connections == 1000
        start = time.monotonic()
        await asyncio.to_thread(server.stop)
        assert time.monotonic() - start < 3
        tails = await asyncio.gather(*(reader.read() for reader, _ in conns))
        for _, writer in conns:
            writer.close()
        return tails

    assert asyncio.run(main()) == [b""] * 1000  # closed without an answer
    assert server.in_flight == 0 and server.requests == 1000 and server.status_counts == {}


def test_a_thousand_concurrent_requests_answered():
    allow_file_descriptors(2200)

    async def one(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat_request())
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return head

    async def all_of_them(port: int) -> list[bytes]:
        return await asyncio.gather(*(one(port) for _ in range(1000)))

    with FakeLLMServer(latency=0.5) as server:
        heads = asyncio.run(all_of_them(server.port))
        assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
        assert server.status_counts == {200: 1000} and server.in_flight == 0
        assert server.max_in_flight > 100  # overlapping (all 1,000 when the machine is not busy)
