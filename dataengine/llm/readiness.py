"""Is a sample ready for a LLaVA trainer? Checks that fail at training time, moved to data time.

A trainer expands each `<image>` token into the vision tower's patch tokens (576 for LLaVA-1.5 at
336 px) and masks everything but the assistant turns. It breaks, or silently truncates, when a sample
has no or several image tokens for its one image, when roles do not alternate, or when the text plus
the image tokens exceed the LM's context. Each of those is a rejection `not_trainable:<why>` here.
"""

from __future__ import annotations

from typing import Any

from dataengine.llm.validate import GPT, HUMAN, IMAGE_TOKEN

#: LLaVA-1.5 appends this to short-answer questions (VQAv2, GQA, ...) so the model learns when to be brief
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
_SHORT_ANSWER_WORDS = 3
_TURN_OVERHEAD_TOKENS = 4  # role markers and separators a chat template adds per turn (Vicuna-style)


def caption_sample(caption: str, question: str) -> list[dict[str, str]]:
    """Stage-1 alignment data: a brief-description request answered by the caption."""
    return [{"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": GPT, "value": caption.strip()}]


def with_short_answer_prompt(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Append LLaVA-1.5's response-format prompt to questions whose answer is a word or a short phrase."""
    out = [dict(t) for t in turns]
    for i in range(0, len(out) - 1, 2):
        answer = out[i + 1]["value"].strip().rstrip(".")
        if len(answer.split()) <= _SHORT_ANSWER_WORDS and SHORT_ANSWER_PROMPT not in out[i]["value"]:
            out[i]["value"] = f"{out[i]['value'].rstrip()}\n{SHORT_ANSWER_PROMPT}"
    return out


def readiness_problem(turns: Any, images: int = 1) -> str | None:
    """The structural reason a sample cannot be trained on, or None."""
    if not isinstance(turns, list) or len(turns) < 2:
        return "no_turns"
    tokens = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in turns if isinstance(t, dict))
    if tokens != images:
        return "image_tokens"
    if IMAGE_TOKEN not in str(turns[0].get("value", "")):
        return "image_token_position"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") != (HUMAN if i % 2 == 0 else GPT):
            return "roles"
        if not str(turn.get("value", "")).replace(IMAGE_TOKEN, "").strip():
            return "empty_turn"
    if len(turns) % 2:
        return "roles"
    return None


def token_length(turns: list[dict[str, str]], tokenizer: Any, image_tokens: int) -> int:
    """Tokens the trainer will see: each turn's text, a per-turn template overhead, the image's patch tokens."""
    texts = [t["value"].replace(IMAGE_TOKEN, "") for t in turns]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids) + _TURN_OVERHEAD_TOKENS * len(turns) + image_tokens
