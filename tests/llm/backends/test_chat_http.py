"""The openai backend's two HTTP clients (lean aiohttp, the openai SDK) against the fake server: the
same retries, waits, timeouts and reasons; requests sent as they are built; a refusing endpoint stops
the batch without sending the rest."""

from __future__ import annotations

import collections
import email.utils
import threading
import time

import pytest

from dataengine.llm.backends.chat_http import RequestFailed, retry_after, status_failure
from dataengine.llm.backends.openai_chat import Completion, EndpointError, OpenAIBackendConfig, OpenAIChat
from dataengine.testbed.synthweb.llm_responder import SceneResponder
from dataengine.testbed.synthweb.llm_server import FakeLLMServer, Reply

CLIENTS = ["aiohttp", "openai-sdk"]


@pytest.fixture()
def server():
    with FakeLLMServer(SceneResponder()) as s:
        yield s


def _chat(server: FakeLLMServer, client: str, **settings) -> OpenAIChat:
    config = OpenAIBackendConfig(**{"model": "fake", "base_url": server.base_url, "api_key_env": None,
                                    "http_client": client, "max_concurrency": 4, "timeout_s": 5, "max_retries": 2,
                                    **settings})
    return OpenAIChat(config)


def _messages(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Caption: a large red circle, picture {i}"}] for i in range(n)]


def _complete(chat: OpenAIChat, requests) -> dict[int, Completion | RequestFailed]:
    try:
        return dict(chat.complete_iter(requests))
    finally:
        chat.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_busy_replies_are_retried_after_the_wait_the_server_asks_for(server, client):
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    scene = SceneResponder()

    def twice_busy(body: dict) -> Reply:
        with lock:
            seen[body["messages"][-1]["content"]] += 1
            n = seen[body["messages"][-1]["content"]]
        return Reply(status=429, headers={"Retry-After": "0.3"}) if n <= 2 else scene(body)

    server.responder = twice_busy
    started = time.monotonic()
    done = _complete(_chat(server, client, max_retries=3), _messages(3))
    assert all(isinstance(d, Completion) and d.content for d in done.values()) and len(done) == 3
    assert server.requests == 9 and server.status_counts[429] == 6
    assert time.monotonic() - started >= 0.6  # two waits of 0.3 s, not the 0.5 s+ backoff... nor none


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(("reply", "reason", "attempts"), [
    (Reply(status=500), "server_error", 3),  # retried: 1 + max_retries
    (Reply(status=503, headers={"x-should-retry": "false"}), "server_error", 1),  # the server says no
    (Reply(status=400, content="bad field"), "bad_request", 1),  # not retried
    (Reply(malformed=True), "bad_response", 1),
    (Reply(content="hello", prompt_tokens=3, completion_tokens=1, hang=True), "timeout", 1),
])
def test_failures_end_in_the_same_reason_with_either_client(server, client, reply, reason, attempts):
    server.responder = lambda body: reply
    chat = _chat(server, client, max_retries=2 if reason != "timeout" else 0, timeout_s=0.5 if reason == "timeout" else 5)
    (failed,) = _complete(chat, _messages(1)).values()
    assert isinstance(failed, RequestFailed) and failed.reason == reason
    assert server.requests == attempts


@pytest.mark.parametrize("client", CLIENTS)
def test_an_endpoint_that_refuses_the_key_stops_the_batch_and_nothing_more_is_sent(server, client):
    server.responder = lambda body: Reply(status=401, content="Incorrect API key provided")
    chat = _chat(server, client, max_concurrency=2)
    with pytest.raises(EndpointError, match="Incorrect API key"):
        _complete(chat, iter(_messages(200)))
    assert 1 <= server.requests < 20  # what was in flight when the refusal came back, not the 200


def test_requests_are_sent_while_later_ones_are_still_being_built(server):
    """The first request is on the wire before the caller has built the second: a batch's first wave
    does not wait for every prompt of the batch."""
    seen_before_second: list[int] = []

    def built_slowly():
        yield _messages(1)[0]
        deadline = time.monotonic() + 5
        while server.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_before_second.append(server.requests)
        yield from _messages(3)[1:]

    done = _complete(_chat(server, "aiohttp"), built_slowly())
    assert seen_before_second == [1] and sorted(done) == [0, 1, 2]


def test_the_key_travels_as_a_bearer_header_and_the_default_endpoint_is_openais(server, monkeypatch):
    monkeypatch.setenv("CHAT_HTTP_KEY", "sk-abc")
    chat = _chat(server, "aiohttp", api_key_env="CHAT_HTTP_KEY")
    _complete(chat, _messages(1))
    assert server.headers_seen[0]["authorization"] == "Bearer sk-abc"
    default = OpenAIChat(OpenAIBackendConfig(model="m", api_key_env=None))
    try:
        transport, _ = default._lanes[0]
        assert transport._url == "https://api.openai.com/v1/chat/completions"
    finally:
        default.close()


def test_retry_after_reads_seconds_milliseconds_and_dates_and_ignores_nonsense():
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 25 <= (retry_after({"retry-after": later}) or 0) <= 31
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after": "3600"}) is None  # over a minute: back off as usual instead
    assert retry_after({}) is None


def test_status_failures_keep_the_endpoints_message_and_mark_refusals_fatal():
    refused = status_failure(401, '{"error": {"message": "Incorrect API key provided"}}')
    assert (refused.reason, refused.fatal) == ("endpoint", True) and "Incorrect API key" in refused.detail
    assert status_failure(429, "slow down").reason == "rate_limited"
    assert status_failure(502, "<html>bad gateway</html>").reason == "server_error"
    assert status_failure(422, "{}").reason == "bad_request"


def test_replies_are_cached_as_they_arrive_while_the_caller_is_busy(server, tmp_path):
    """A kill -9 must not pay again for replies the server gave: each is in the cache (and the usage
    ledger) when it arrives, not when the op gets round to it."""
    from dataengine.llm.cache import ResponseCache, request_key
    from dataengine.llm.usage import UsageLedger, read_usage

    config = OpenAIBackendConfig(model="fake", base_url=server.base_url, api_key_env=None, max_concurrency=4,
                                 timeout_s=5, max_retries=0)
    cache = ResponseCache(tmp_path / "cache")
    chat = OpenAIChat(config, cache=cache, ledger=UsageLedger(tmp_path / "usage"))
    server.latency = 0.2  # every request is sent before the first reply is back
    requests = _messages(8)
    keys = [request_key("fake", m, config.generation_params(config.structured_mode())) for m in requests]
    replies = chat.complete_iter(requests)
    try:
        next(replies)  # the caller takes one reply, then is busy elsewhere while the rest come back
        deadline = time.monotonic() + 10
        while server.requests < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert server.requests == 8
        assert sum(cache.get(k) is not None for k in keys) == 8  # all 8, not only the one taken
        assert read_usage(tmp_path / "usage").requests == 8
        assert len(dict(replies)) == 7 and server.requests == 8  # the rest, none sent twice
    finally:
        chat.close()
