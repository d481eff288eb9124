"""A simulated instruction-writing LLM that writes question-answer pairs from the caption it is given.

LLaVA's instruction data was written by a text-only GPT-4 from COCO captions and boxes: whatever the
caption says, the conversation repeats, so a wrong caption becomes wrong answers. `CaptionQAResponder`
does the same on the synthetic web: it reads the groups a caption names ("two red stars and a large
blue circle at the top left") and writes the questions a VQA benchmark asks (how many of a shape, the
colour and place of a shape named once, is a shape there), in our templates' wording
(`pipelines/prompts/templates.yaml`), answered from the caption. Given a caption that names no shape
(a file name, boilerplate) it does what a weak model does: it guesses a scene and answers from the
guess. Every choice is drawn from a hash of (seed, caption), so a rerun writes the same data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.llm.backends.template import Templates, plural
from dataengine.testbed.synthweb.llm_responder import SceneResponder
from dataengine.testbed.synthweb.scenes import _NUMBERS, COLOURS, KINDS, _join, _with_article

_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_GROUP = re.compile(
    rf"\b(a|an|one|two|three|four) (?:(small|medium|large) )?({'|'.join(COLOURS)}) ({'|'.join(KINDS)})s?\b"
    r"(?: (in the center|on the (?:left|right)|at the (?:top left|top right|top|bottom left|bottom right|bottom)))?")


@dataclass(frozen=True)
class Group:
    """Shapes a caption names together: how many, which colour, and (detailed captions) where."""

    count: int
    colour: str
    kind: str
    place: str | None = None  # "at the top left", "on the right", "in the center"


def caption_groups(caption: str) -> list[Group]:
    """The groups a synthetic-web caption names, in order; empty for a caption that names no shape."""
    return [Group(_COUNTS[m.group(1)], m.group(3), m.group(4), m.group(5))
            for m in _GROUP.finditer(caption.lower())]


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def guessed_groups(rng: np.random.Generator) -> list[Group]:
    """What a model that cannot see the image invents when the caption says nothing: one or two groups."""
    kinds = rng.choice(len(KINDS), size=int(rng.integers(1, 3)), replace=False)
    return [Group(int(rng.integers(1, 3)), list(COLOURS)[int(rng.integers(len(COLOURS)))], KINDS[int(k)]) for k in kinds]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:].rstrip(".") + "."


def caption_questions(groups: list[Group], templates: Templates, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs the groups answer: a count per shape, colour and place of a shape named
    once, and whether a named shape and an unnamed one are there."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731 - one-line chooser
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    qa = []
    for kind, named in by_kind.items():
        total = sum(g.count for g in named)
        qa.append((pick(templates.count).format(plural=plural(kind), label=kind), str(total)))
        if total == 1:
            qa.append((pick(templates.colour).format(label=kind), _sentence(named[0].colour)))
            if named[0].place:
                qa.append((pick(templates.position).format(thing=kind), _sentence(named[0].place)))
    if by_kind:
        qa.append((pick(templates.exists).format(label=pick(sorted(by_kind))), "Yes."))
        absent = [k for k in KINDS if k not in by_kind]
        if absent:
            qa.append((pick(templates.exists).format(label=pick(absent)), "No."))
    return qa


def _listing(groups: list[Group]) -> str:
    """Groups as a caption names them ("a red star and two blue circles")."""
    return _join([_with_article(f"{g.colour} {g.kind}") if g.count == 1 else f"{_NUMBERS[g.count]} {g.colour} {g.kind}s"
                  for g in groups])


class CaptionQAResponder(SceneResponder):
    """`SceneResponder` whose conversations are VQA-style questions answered from the first caption of
    the context (boxes, when sent, are ignored: the point is what captions carry into the data).

    `short_first_fraction`: share of conversations that open with a short question instead of a
    request for a brief description (VQA data comes that way); `max_questions`: question turns after
    the first.
    """

    def __init__(self, seed: int = 0, short_first_fraction: float = 0.3, max_questions: int = 5, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.templates = Templates.load()
        self.short_first_fraction, self.max_questions = short_first_fraction, max_questions
        self.guessed = 0  # conversations written about a caption that named no shape

    def reply(self, context: dict[str, Any], question: str | None, messages: list[dict[str, str]]) -> dict[str, Any]:
        caption, groups = next(((c, g) for c in context.get("captions") or [] if (g := caption_groups(c))), (None, []))
        rng = _rng(self.seed, caption or context.get("captions"))
        if caption is not None:
            description = _sentence(caption)
        else:
            groups = guessed_groups(rng)
            description = _sentence(_listing(groups))
            with self._lock:
                self.guessed += 1
        if question:  # a detailed description was asked for: the one turn, answered from the caption
            return {"turns": [{"question": question, "answer": f"The image shows {description[0].lower()}{description[1:]}"}]}
        qa = caption_questions(groups, self.templates, rng)
        qa = [qa[int(j)] for j in rng.permutation(len(qa))]
        if qa and rng.random() < self.short_first_fraction:
            turns = qa[:self.max_questions + 1]
        else:
            brief = self.templates.brief[int(rng.integers(len(self.templates.brief)))]
            turns = [(brief, description), *qa[:self.max_questions]]
        return {"turns": [{"question": q, "answer": a} for q, a in turns]}
