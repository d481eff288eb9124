"""A simulated instruction-writing LLM for the synthetic web: answers from the fenced context.

Used behind the fake OpenAI-compatible server (`llm_server.FakeLLMServer`) by tests and benchmarks.
It reads the `<data>` JSON our prompts send, writes a conversation about the captions and boxes in
the reply format the prompts ask for, and misbehaves in known ways so checks can be scored:

- with probability `hallucination_rate` (drawn from a hash of the context, so reruns agree) it adds
  an object that the context does not have: `hallucinated` records which contexts got one;
- it is gullible: a caption that says "ignore ... instructions" and asks for something is obeyed
  (the reply becomes that text), as a weak model might; our validation must still reject it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

from dataengine.llm.prompts import FENCE_CLOSE, FENCE_OPEN

_INJECTION = re.compile(r"ignore (?:all |any |the )?(?:previous |prior |above )?instructions[^.]*?(?:and |then |, )?(.*)",
                        re.IGNORECASE)
#: objects a hallucinating model adds; none of them is a synthetic-web shape
HALLUCINATED_OBJECTS = ("dog", "bicycle", "umbrella", "clock", "cup", "chair")


def fenced_context(messages: list[dict[str, str]]) -> dict[str, Any] | None:
    """The JSON between the fence markers of the last user message (None if there is none)."""
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    start, end = user.rfind(FENCE_OPEN), user.rfind(FENCE_CLOSE)
    if start < 0 or end < start:
        return None
    try:
        return json.loads(user[start + len(FENCE_OPEN):end])
    except json.JSONDecodeError:
        return None


def asked_question(messages: list[dict[str, str]]) -> str | None:
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    match = re.search(r'Use exactly this question for the one turn: "(.*)"', user)
    return match.group(1) if match else None


def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


STYLES = ("json", "fenced", "llava", "chat")


def styled(reply: dict[str, Any], style: str) -> str:
    """The reply's turns written the way models write them: our JSON, JSON in a code fence with a line
    of prose, LLaVA's own "Question:/Answer:" blocks, or a "User:/Assistant:" transcript."""
    turns = reply["turns"]
    if style == "json":
        return json.dumps(reply)
    if style == "fenced":
        return f"Here is the conversation:\n```json\n{json.dumps(reply, indent=2)}\n```"
    if style == "llava":
        return "\n\n".join(f"Question: {t['question']}\nAnswer: {t['answer']}" for t in turns)
    if style == "chat":
        return "\n".join(f"User: {t['question']}\nAssistant: {t['answer']}" for t in turns)
    raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")


class SceneResponder:
    """Callable `(request body) -> Reply` for `FakeLLMServer`.

    `style`: how it writes replies when the request does not constrain the format (`STYLES`); a request
    with `response_format` json_schema gets our JSON, as a model under structured outputs would, unless
    `structured_outputs` is False: then such a request is refused with HTTP 400, as an endpoint without
    the feature does.
    """

    def __init__(self, hallucination_rate: float = 0.0, seed: int = 0, style: str = "json",
                 structured_outputs: bool = True) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
        self.hallucination_rate, self.seed = hallucination_rate, seed
        self.style, self.structured_outputs = style, structured_outputs
        self.hallucinated: dict[str, str] = {}  # context JSON -> the object added
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Any:
        from dataengine.testbed.synthweb.llm_server import Reply

        constrained = (body.get("response_format") or {}).get("type") == "json_schema"
        if constrained and not self.structured_outputs:
            return Reply(status=400, content="response_format json_schema is not supported by this server")
        messages = body.get("messages") or []
        context = fenced_context(messages)
        if context is None:
            return Reply(content="I need a description of the image.")
        for caption in context.get("captions") or []:
            injected = _INJECTION.search(caption)
            if injected:
                return Reply(content=injected.group(1).strip() or "OK")
        reply = self.reply(context, asked_question(messages), messages)
        return Reply(content=json.dumps(reply) if constrained else styled(reply, self.style))

    def reply(self, context: dict[str, Any], question: str | None, messages: list[dict[str, str]]) -> dict[str, Any]:
        captions = context.get("captions") or []
        objects = context.get("objects") or []
        subject = captions[0] if captions else " and ".join(o["label"] for o in objects)
        answer = f"The image shows {subject}."
        key = json.dumps(context, sort_keys=True)
        if _unit(f"{self.seed}:{key}") < self.hallucination_rate:
            extra = HALLUCINATED_OBJECTS[int(_unit(f"{self.seed}:obj:{key}") * len(HALLUCINATED_OBJECTS))]
            answer += f" A {extra} is visible near the edge of the frame."
            with self._lock:
                self.hallucinated[key] = extra
        system = messages[0]["content"] if messages else ""
        if question:  # detail: one turn, the question we were given
            return {"turns": [{"question": question, "answer": answer}]}
        if "reasoning" in system or "step by step" in system:
            return {"turns": [{"question": "What stands out about how the objects are arranged?",
                               "answer": f"{answer} Looking at them one by one, each is clearly separated from the others."}]}
        turns = [{"question": "What is in this picture?", "answer": answer}]
        if objects:
            turns.append({"question": "How many objects can you see?", "answer": f"I can see {len(objects)}."})
        return {"turns": turns}
