"""The one interface every synthesis backend answers: `generate(requests)` -> one `Reply` per request.

The op decides what to ask (the response type, the fixed question, the chat messages) and checks what
comes back (parse, validate, ground); a backend only writes: an OpenAI-compatible endpoint, the replies
Ray Data LLM's vLLM engine wrote into the rows, or our templates. A reply is either text to parse or,
from a backend that writes structure itself (the templates), the turns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Request:
    """One row's request. LLM backends read `messages`; the template backend writes from `context`."""

    index: int  # the row's position in its batch
    uid: str
    context: dict[str, Any]  # captions best first, and boxes
    kind: str | None = None  # response type the op drew (LLM backends); the template backend draws its own
    question: str | None = None  # `detail`: the question asked, kept as the first human turn
    messages: list[dict[str, str]] | None = None
    row: dict[str, Any] | None = None  # the row's columns (vllm: the engine's reply lives there)


@dataclass(frozen=True)
class Reply:
    """What a backend wrote for one request, and what it cost; `error` is a transient failure after
    retries (a short stable code), for the op to stop on or reject with."""

    model: str
    text: str | None = None
    turns: list[dict[str, str]] | None = None
    kind: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    cached: bool | None = None
    error: str | None = None


class Backend(Protocol):
    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Reply]]:
        """A reply for each request, in any order (as they arrive)."""
        ...

    def close(self) -> None:
        ...


def row_seed(uid: str, seed: int) -> int:
    """A row's own random seed: fixed by (uid, seed), so a resumed or repeated run draws the same."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uid}".encode()).digest()[:8], "little")
