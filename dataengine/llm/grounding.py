"""Grounding check: does an answer name objects that nothing in the context mentions?

An LLM that writes about an image it cannot see will sometimes add objects ("a dog sits beside the
bench") that no caption or box has: the hallucinations CHAIR (Rohrbach et al., 2018) counts for
captioning. We use the same idea: a vocabulary of object words (`pipelines/prompts/objects.txt`, one
object per line with its word forms), the objects the context names (caption words and box labels),
and the objects the answers name. Any object in the answers and not in the context is ungrounded.

It is a word-level check: it misses hallucinated attributes ("a green star" for a red one) and flags
negations ("there is no dog"). On the synthetic web, where the truth is known, its precision and
recall are measured in tests/test_llm_grounding.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dataengine.llm.prompts import default_prompts_dir

OBJECTS_FILE = "objects.txt"


class ObjectVocabulary:
    """Word forms (lower case, may be two words) of known objects, each mapped to its canonical name."""

    def __init__(self, forms: dict[str, str]) -> None:
        if not forms:
            raise ValueError("an object vocabulary needs at least one object")
        self.forms = forms
        # longest forms first so "traffic light" wins over "light"
        alternatives = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(f) for f in alternatives) + r")\b", re.IGNORECASE)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ObjectVocabulary":
        """Read a vocabulary file: one object per line, its word forms comma-separated, `#` comments."""
        path = Path(path) if path else default_prompts_dir() / OBJECTS_FILE
        forms: dict[str, str] = {}
        for line in path.read_text().splitlines():
            words = [w.strip().lower() for w in line.split("#", 1)[0].split(",") if w.strip()]
            for w in words:
                forms.setdefault(w, words[0])
        return cls(forms)

    def objects_in(self, text: str) -> set[str]:
        return {self.forms[m.group(1).lower()] for m in self._pattern.finditer(text)}


def context_objects(context: dict[str, Any], vocabulary: ObjectVocabulary) -> set[str]:
    """Words of the vocabulary the context uses: in captions, box labels and box attributes (an
    attribute such as the colour "orange" is not a fruit the answer made up)."""
    texts = list(context.get("captions") or [])
    for o in context.get("objects") or []:
        texts += [str(o.get("label", "")), *map(str, (o.get("attributes") or {}).values())]
    found: set[str] = set()
    for text in texts:
        found |= vocabulary.objects_in(text)
    return found


def ungrounded_objects(turns: list[dict[str, str]], context: dict[str, Any], vocabulary: ObjectVocabulary) -> list[str]:
    """Objects the gpt turns name that the context does not, sorted (empty = grounded)."""
    named: set[str] = set()
    for turn in turns:
        if turn["from"] == "gpt":
            named |= vocabulary.objects_in(turn["value"])
    return sorted(named - context_objects(context, vocabulary))
