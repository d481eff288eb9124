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

import base64
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dataengine.llm.prompts import FENCE_CLOSE, FENCE_OPEN, message_text

_INJECTION = re.compile(r"ignore (?:all |any |the )?(?:previous |prior |above )?instructions[^.]*?(?:and |then |, )?(.*)",
                        re.IGNORECASE)
#: objects a hallucinating model adds; none of them is a synthetic-web shape
HALLUCINATED_OBJECTS = ("dog", "bicycle", "umbrella", "clock", "cup", "chair")


def _last_user(messages: list[dict[str, Any]]) -> Any:
    return next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")


def fenced_context(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The JSON between the fence markers of the last user message (None if there is none)."""
    user = message_text(_last_user(messages))
    start, end = user.rfind(FENCE_OPEN), user.rfind(FENCE_CLOSE)
    if start < 0 or end < start:
        return None
    try:
        return json.loads(user[start + len(FENCE_OPEN):end])
    except json.JSONDecodeError:
        return None


def sent_image(messages: list[dict[str, Any]]) -> bytes | None:
    """The image bytes of the last user message's `image_url` part (a base64 data URL), if it has one."""
    content = _last_user(messages)
    for part in content if isinstance(content, list) else []:
        url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) else ""
        if url.startswith("data:") and ";base64," in url:
            return base64.b64decode(url.split(";base64,", 1)[1])
    return None


def describe(context: dict[str, Any]) -> str:
    """A detailed caption of a scene, as a captioning VLM writes one: the scene, then each object with
    its size, colour and place in the frame."""
    sentences = [f"The image shows {context['captions'][0].rstrip('.')}."] if context.get("captions") else []
    for obj in context.get("objects") or []:
        x1, y1, x2, y2 = obj["box"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        where = f"{'top' if cy < 1 / 3 else 'bottom' if cy > 2 / 3 else 'middle'} " \
                f"{'left' if cx < 1 / 3 else 'right' if cx > 2 / 3 else 'centre'}"
        attributes = obj.get("attributes") or {}
        what = " ".join(v for v in (attributes.get("size"), attributes.get("colour"), obj["label"]) if v)
        sentences.append(f"There is a {what} in the {where} of the frame.")
    return " ".join(sentences)


class SceneIndex:
    """The synthetic web's true scenes, found by what an image looks like (its pHash, nearest within
    `max_bits`): a model that sees the image describes the true scene, whatever the web caption says."""

    def __init__(self, codes: np.ndarray, contexts: list[dict[str, Any]], max_bits: int = 32) -> None:
        self.codes, self.contexts, self.max_bits = codes, contexts, max_bits

    @classmethod
    def from_synthweb(cls, web_dir: str | Path) -> SceneIndex:
        import pyarrow.parquet as pq

        from dataengine.dedup.descriptors import decode_rgb, phash
        from dataengine.testbed.synthweb.build import BROKEN, OBJECTS, PATH, TRUE_CAPTION, TRUTH_FILE, boxes_json

        root = Path(web_dir)
        codes, contexts = [], []
        for row in pq.read_table(root / TRUTH_FILE, columns=[PATH, TRUE_CAPTION, OBJECTS, BROKEN]).to_pylist():
            path = _served_file(root, row[PATH]) if row[PATH] else None
            if row[BROKEN] or path is None or not path.is_file():
                continue
            try:
                codes.append(np.frombuffer(phash(decode_rgb(path.read_bytes())), dtype=np.uint8))
            except Exception:  # a file the generator made unreadable on purpose
                continue
            context: dict[str, Any] = {"captions": [row[TRUE_CAPTION]]}
            if row[OBJECTS]:
                context["objects"] = json.loads(boxes_json(row[OBJECTS]))
            contexts.append(context)
        return cls(np.stack(codes) if codes else np.zeros((0, 32), np.uint8), contexts)

    def lookup(self, image: bytes) -> dict[str, Any] | None:
        from dataengine.dedup.descriptors import decode_rgb, hamming, phash

        if not len(self.codes):
            return None
        code = np.frombuffer(phash(decode_rgb(image)), dtype=np.uint8)[None, :]
        distances = hamming(code, self.codes)[0]
        best = int(np.argmin(distances))
        return self.contexts[best] if distances[best] <= self.max_bits else None


def _served_file(root: Path, url_path: str) -> Path:
    """The file a synthetic-web URL path serves: under files/ as is, or (redirect, flaky, slow, opt-out
    routes) the image of that name under files/img/."""
    direct = root / "files" / url_path.lstrip("/")
    return direct if direct.is_file() else root / "files" / "img" / Path(url_path).name


def asked_question(messages: list[dict[str, Any]]) -> str | None:
    user = message_text(_last_user(messages))
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
                 structured_outputs: bool = True, scenes: SceneIndex | None = None) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
        self.hallucination_rate, self.seed = hallucination_rate, seed
        self.style, self.structured_outputs, self.scenes = style, structured_outputs, scenes
        self.seen_images = 0  # requests whose image was found in `scenes`
        self.hallucinated: dict[str, str] = {}  # context JSON -> the object added
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Any:
        from dataengine.testbed.synthweb.llm_server import Reply

        constrained = (body.get("response_format") or {}).get("type") == "json_schema"
        if constrained and not self.structured_outputs:
            return Reply(status=400, content="response_format json_schema is not supported by this server")
        messages = body.get("messages") or []
        context = fenced_context(messages)
        image = sent_image(messages)
        seen = self.scenes.lookup(image) if image is not None and self.scenes is not None else None
        if seen is not None:  # it sees the image: the true scene, whatever the caption says
            with self._lock:
                self.seen_images += 1
            if context is None:  # no description to work from: asked to caption the image
                return Reply(content=describe(seen))
            context = {**seen, "captions": seen["captions"] + [c for c in context.get("captions", [])
                                                                if _INJECTION.search(c)]}
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
