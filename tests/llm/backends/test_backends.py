"""The backends behind `generate()`: one reply per request, the template's drawn from the row's own seed,
the engine's read from the row (the openai backend: tests/ops/test_llava_synthesis_openai.py, on a server)."""

from __future__ import annotations

from dataengine.core import columns as C
from dataengine.llm.backends.base import Request
from dataengine.llm.backends.template import TemplateBackend, Templates
from dataengine.llm.backends.vllm_engine import REPLY_COLUMNS, EngineReplies

CONTEXT = {"captions": ["a red circle"], "objects": [{"label": "circle", "box": [0.1, 0.1, 0.4, 0.4]},
                                                     {"label": "star", "box": [0.6, 0.6, 0.9, 0.9]}]}


def test_the_template_backend_answers_every_request_the_same_way_each_time():
    backend = TemplateBackend(Templates.load(None), seed=3, max_qa_turns=2)
    requests = [Request(i, f"uid-{i}", CONTEXT) for i in range(20)]
    first = list(backend.generate(requests))
    again = list(backend.generate(list(reversed(requests))))
    assert [request.index for request, _ in first] == list(range(20))
    by_uid = {request.uid: reply for request, reply in again}
    assert all(reply == by_uid[request.uid] for request, reply in first)  # fixed by (uid, seed), not by order
    assert all(reply.model == "template" and reply.turns and reply.text is None for _, reply in first)
    assert {reply.kind for _, reply in first} <= {"brief", "detailed"} and len({r.kind for _, r in first}) == 2
    other_seed = TemplateBackend(Templates.load(None), seed=4, max_qa_turns=2)
    assert [r.turns for _, r in other_seed.generate(requests)] != [r.turns for _, r in first]


def test_the_engine_backend_reads_the_replies_the_engine_wrote_into_the_rows():
    text, finish, prompt_tokens, completion_tokens = REPLY_COLUMNS
    row = {C.UID: "a", text: "reply", finish: "stop", prompt_tokens: 50, completion_tokens: 7}
    [(request, reply)] = list(EngineReplies("org/model").generate([Request(4, "a", CONTEXT, "detail", None, [], row)]))
    assert request.index == 4
    assert (reply.model, reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens) == \
        ("org/model", "reply", "stop", 50, 7)
    assert reply.cost_usd == 0.0 and reply.cached is False and reply.error is None


def test_closing_the_openai_backend_never_waits_forever_on_a_stuck_loop(monkeypatch):
    """At interpreter exit the loop's daemon thread can be frozen: `close` (called from the op's
    `__del__`) once waited on it forever, and a stopped run's actor process outlived Ray."""
    import threading
    import time

    from dataengine.llm.backends import openai_chat
    from dataengine.llm.backends.openai_chat import OpenAIBackendConfig, OpenAIChat

    monkeypatch.setattr(openai_chat, "CLOSE_TIMEOUT_S", 0.3)
    backend = OpenAIChat(OpenAIBackendConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None))
    release = threading.Event()
    backend._loop.call_soon_threadsafe(release.wait)  # the loop thread is stuck from now on
    started = time.monotonic()
    backend.close()
    assert time.monotonic() - started < 3  # two bounded waits, not forever
    release.set()
    backend._thread.join(timeout=5)
    assert not backend._thread.is_alive()  # once unstuck, the stop it was sent ends the loop
