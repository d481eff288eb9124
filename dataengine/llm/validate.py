"""Validate LLaVA-style conversations an LLM (or a template) produced, before they become data.

A conversation is a list of turns `{"from": "human"|"gpt", "value": str}` as LLaVA's JSON has them.
It is valid when the turns alternate human/gpt starting with human and ending with gpt, every turn
is non-empty and within the length limits, `<image>` appears exactly once and in the first human
turn, and nothing leaks the context the model was given: no mention of captions or bounding boxes,
no normalised coordinates. Every failure is an `InvalidConversation` whose `reason` becomes the
row's `llm_invalid:<reason>` rejection.

Examples:
    >>> turns = validate_conversation([{"from": "human", "value": "What is red?<image>"},
    ...                                {"from": "gpt", "value": "The circle."}])
    >>> turns[0]["value"]
    '<image>\\nWhat is red?'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"

_LEAKS = (
    ("leak_caption", re.compile(r"\bcaptions?\b|\bcaptioned\b", re.IGNORECASE)),
    ("leak_box", re.compile(r"\bbounding[\s-]*box(es)?\b|\bbbox(es)?\b", re.IGNORECASE)),
    # [0.12, 0.34, 0.56, 0.78] or (0.1, 0.2): normalised coordinates copied from the context
    ("leak_coordinates", re.compile(r"[\[(]\s*[01]?\.\d+\s*,\s*[01]?\.\d+(\s*,\s*[01]?\.\d+){0,2}\s*[\])]")),
)


class InvalidConversation(ValueError):
    """A conversation that must not become training data; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    @property
    def reject_reason(self) -> str:
        return f"llm_invalid:{self.reason}"


@dataclass(frozen=True)
class Limits:
    max_turns: int = 20
    max_turn_chars: int = 2000
    max_total_chars: int = 8000


def validate_conversation(turns: list[dict], limits: Limits = Limits()) -> list[dict]:
    """Check `turns`; return them normalised (stripped, `<image>\\n` leading the first human turn)."""
    if not isinstance(turns, list) or not turns:
        raise InvalidConversation("empty", "no turns")
    if len(turns) > limits.max_turns:
        raise InvalidConversation("too_many_turns", f"{len(turns)} turns > {limits.max_turns}")
    if len(turns) % 2:
        raise InvalidConversation("roles", f"{len(turns)} turns: a conversation ends with a gpt answer")
    out, total = [], 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) - {"from", "value"}:
            raise InvalidConversation("format", f"turn {i} is not a {{'from', 'value'}} mapping")
        expected = HUMAN if i % 2 == 0 else GPT
        if turn.get("from") != expected:
            raise InvalidConversation("roles", f"turn {i} is from {turn.get('from')!r}, expected {expected!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise InvalidConversation("empty_turn", f"turn {i} is empty")
        value = value.strip()
        if len(value) > limits.max_turn_chars:
            raise InvalidConversation("too_long", f"turn {i} has {len(value)} characters > {limits.max_turn_chars}")
        total += len(value)
        out.append({"from": expected, "value": value})
    if total > limits.max_total_chars:
        raise InvalidConversation("too_long", f"{total} characters in all > {limits.max_total_chars}")
    _check_image_token(out)
    for i, turn in enumerate(out):
        text = turn["value"].replace(IMAGE_TOKEN, " ")
        for reason, pattern in _LEAKS:
            match = pattern.search(text)
            if match:
                raise InvalidConversation(reason, f"turn {i} says {match.group(0)!r}")
    return out


def _check_image_token(turns: list[dict]) -> None:
    counts = [t["value"].count(IMAGE_TOKEN) for t in turns]
    if sum(counts) != 1 or counts[0] != 1:
        where = ", ".join(f"turn {i}: {c}" for i, c in enumerate(counts) if c) or "none"
        raise InvalidConversation("image_token", f"{IMAGE_TOKEN} must appear once, in the first human turn ({where})")
    question = turns[0]["value"].replace(IMAGE_TOKEN, "").strip()
    if not question:
        raise InvalidConversation("empty_turn", "the first human turn holds only the image")
    turns[0]["value"] = f"{IMAGE_TOKEN}\n{question}"
