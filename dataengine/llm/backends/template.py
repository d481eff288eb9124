"""The `template` backend: instruction data without an LLM.

A caption becomes a single-turn sample (a brief-description request answered by the caption: the
shape of LLaVA's stage-1 alignment data). Where the input has boxes, a detailed description is built
from them, and short questions with exact answers follow: how many of each label, the colour of a
label that appears once, where an object is (3x3 grid of the box centre), whether a label is in the
image (yes for a present one; no for one drawn from `absent_labels`). Question wordings are ours,
in `pipelines/prompts/templates.yaml`. Everything is drawn from a per-row seed, so a rerun writes the
same samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataengine.llm.backends.base import Reply, Request, row_seed
from dataengine.llm.prompts import PromptError, default_prompts_dir, load_yaml
from dataengine.llm.validate import GPT, HUMAN, IMAGE_TOKEN

TEMPLATES_FILE = "templates.yaml"
_KINDS = ("brief", "detailed", "count", "colour", "position", "exists")
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


@dataclass(frozen=True)
class Templates:
    brief: tuple[str, ...]
    detailed: tuple[str, ...]
    count: tuple[str, ...]
    colour: tuple[str, ...]
    position: tuple[str, ...]
    exists: tuple[str, ...]

    @classmethod
    def load(cls, prompts_dir: str | Path | None = None) -> "Templates":
        path = Path(prompts_dir or default_prompts_dir()) / TEMPLATES_FILE
        doc = load_yaml(path)
        lists = {}
        for kind in _KINDS:
            values = doc.get(kind)
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
                raise PromptError(f"{path}: `{kind}` must be a non-empty list of question templates")
            lists[kind] = tuple(values)
        return cls(**lists)


def grid_position(box: list[float]) -> str:
    """Where a normalised box's centre falls on a 3x3 grid, in words ("top left", "center", "bottom")."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def plural(label: str) -> str:
    """English plural of a label (box, boxes; star, stars)."""
    return label + ("es" if label.endswith(("s", "x", "ch", "sh")) else "s")


def _describe(obj: dict[str, Any]) -> str:
    attributes = obj.get("attributes") or {}
    words = [str(attributes[a]) for a in ("size", "colour", "color") if attributes.get(a)]
    return " ".join([*words, str(obj["label"])])


def _article(words: str) -> str:
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def detailed_description(objects: list[dict[str, Any]]) -> str:
    """Sentences from the boxes: how many of what, and where each one is (the caption is left out: a
    web caption can contradict the boxes, and the boxes are the better source)."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[o["label"]] = counts.get(o["label"], 0) + 1
    total = len(objects)
    summary = ", ".join(f"{_NUMBER_WORDS.get(n, str(n))} {plural(lbl) if n > 1 else lbl}" for lbl, n in counts.items())
    sentences = [f"The image shows {total} object{'s' if total != 1 else ''}: {summary}."]
    for o in objects:
        sentences.append(f"There is {_article(_describe(o))} {_position_phrase(grid_position(o['box']))}.")
    return " ".join(sentences)


def _qa_candidates(objects: list[dict[str, Any]], templates: Templates, rng: np.random.Generator,
                   absent_labels: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    by_label: dict[str, list[dict[str, Any]]] = {}
    for o in objects:
        by_label.setdefault(str(o["label"]), []).append(o)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731 - one-line chooser
    qa = []
    for label, objs in by_label.items():
        qa.append((pick(templates.count).format(plural=plural(label), label=label), str(len(objs))))
        if len(objs) == 1:
            attributes = objs[0].get("attributes") or {}
            colour = attributes.get("colour") or attributes.get("color")
            if colour:
                qa.append((pick(templates.colour).format(label=label), str(colour).capitalize() + "."))
            where = _position_phrase(grid_position(objs[0]["box"]))
            qa.append((pick(templates.position).format(thing=label), where[0].upper() + where[1:] + "."))
    if by_label:
        # POPE-style existence questions: one present label (yes), one absent label (no) when any is known
        present = sorted(by_label)
        qa.append((pick(templates.exists).format(label=pick(present)), "Yes."))
        absent = [a for a in absent_labels if a not in by_label]
        if absent:
            qa.append((pick(templates.exists).format(label=pick(absent)), "No."))
    return qa


def template_conversation(context: dict[str, Any], seed: int, templates: Templates, max_qa_turns: int = 3,
                          detailed_fraction: float = 0.5, absent_labels: tuple[str, ...] = (),
                          short_first_fraction: float = 0.0) -> tuple[str, list[dict[str, str]]]:
    """(instruction type, LLaVA turns) for one image's context, drawn from `seed`. With probability
    `short_first_fraction` the image comes with a short question (type `short`, as in VQA data) instead
    of a description request."""
    rng = np.random.default_rng(seed)
    objects = [o for o in context.get("objects") or [] if o.get("label") and o.get("box")]
    captions = [c for c in context.get("captions") or [] if c and c.strip()]
    caption = captions[0].strip() if captions else None
    candidates = _qa_candidates(objects, templates, rng, absent_labels)
    order = [candidates[int(j)] for j in rng.permutation(len(candidates))]
    detailed = bool(objects) and (rng.random() < detailed_fraction or caption is None)
    if order and rng.random() < short_first_fraction:
        kind, (question, answer) = "short", order.pop(0)
    elif detailed:
        kind, question = "detailed", templates.detailed[int(rng.integers(len(templates.detailed)))]
        answer = detailed_description(objects)
    elif caption:
        kind, question = "brief", templates.brief[int(rng.integers(len(templates.brief)))]
        answer = caption[0].upper() + caption[1:]
    else:
        raise ValueError("no caption and no boxes: nothing to build a sample from")
    turns = [{"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": GPT, "value": answer}]
    for question, answer in order[:max_qa_turns]:
        turns += [{"from": HUMAN, "value": question}, {"from": GPT, "value": answer}]
    return kind, turns


@dataclass(frozen=True)
class TemplateBackend:
    """`generate()` without a model: each row's sample drawn from its own seed, at no cost."""

    templates: Templates
    seed: int = 0
    max_qa_turns: int = 3
    detailed_fraction: float = 0.5
    absent_labels: tuple[str, ...] = ()
    short_first_fraction: float = 0.0

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Reply]]:
        for request in requests:
            kind, turns = template_conversation(request.context, row_seed(request.uid, self.seed), self.templates,
                                                self.max_qa_turns, self.detailed_fraction, self.absent_labels,
                                                self.short_first_fraction)
            yield request, Reply(model="template", turns=turns, kind=kind)

    def close(self) -> None:
        pass
