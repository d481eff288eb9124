"""The synthetic-web VQA benchmark: questions with known answers about freshly drawn scenes.

Scenes come from their own seed, never from the synthetic web a pipeline downloads, so no benchmark
image can be in the training data. Per image: how many of each shape (exact count), the colour and
the grid position of a shape that appears once, and POPE-style existence questions, one yes (a shape
that is there) and one no (a shape that is not, drawn at random: POPE's "random" setting). Questions use the template backend's wording (`pipelines/prompts/templates.yaml`), so a
model trained on template data is asked in the form it learnt. Answers are compared after
normalisation (case, punctuation, articles, "at the"/"on the", number words); yes/no answers are also
scored by precision, recall, F1 and the yes-ratio, where a model that hallucinates says yes too often.
Each image is also described ("Describe the image briefly."): the colour-shape pairs the description
names are checked against the scene, CHAIR-style (Rohrbach et al. 2018): the share of named objects
that are not there (hallucination), and the share of the scene's objects named (recall). Last, the
perplexity of each image's true caption given the image (`caption_perplexity`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.core import columns as C
from dataengine.llm.backends.template import Templates, grid_position, plural

BENCHMARK_SEED = 7_000_003  # no synthetic web or demo model uses this seed stream
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


@dataclass(frozen=True)
class Question:
    image_index: int
    kind: str
    question: str
    answer: str


def normalise(answer: str) -> str:
    """Lower case, no punctuation or leading article/preposition, numbers as digits."""
    words = re.sub(r"[^a-z0-9 ]", " ", answer.lower()).split()
    while words and words[0] in ("a", "an", "the", "at", "on", "in", "it", "is"):
        words = words[1:]
    return " ".join(_NUMBERS.get(w, w) for w in words)


def build_benchmark(n_images: int, image_size: int = 64, seed: int = BENCHMARK_SEED,
                    captions: list[str] | None = None) -> tuple[list[Any], list[Question]]:
    """`n_images` fresh scenes rendered at `image_size`, and their questions with answers (and, into
    `captions` when given, one true caption per image)."""
    from dataengine.testbed.synthweb.render import render_scene
    from dataengine.testbed.synthweb.scenes import KINDS, caption_scene, generate_scene

    templates = Templates.load()
    images, questions = [], []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        scene = generate_scene(rng)
        images.append(render_scene(scene, image_size, image_size, rng))
        if captions is not None:
            captions.append(caption_scene(scene, np.random.default_rng([seed, i, 1])))
        by_kind: dict[str, list[Any]] = defaultdict(list)
        for obj in scene.objects:
            by_kind[obj.kind].append(obj)
        for kind, objs in sorted(by_kind.items()):
            questions.append(Question(i, "count", templates.count[0].format(plural=plural(kind), label=kind), str(len(objs))))
            if len(objs) == 1:
                questions.append(Question(i, "colour", templates.colour[0].format(label=kind), objs[0].colour))
                questions.append(Question(i, "position", templates.position[0].format(thing=kind),
                                          grid_position(list(objs[0].box))))
        truth_pairs = sorted({f"{o.colour} {o.kind}" for o in scene.objects})
        questions.append(Question(i, "describe", templates.brief[0], "|".join(truth_pairs)))
        present = sorted(by_kind)
        absent = [k for k in KINDS if k not in by_kind]
        questions.append(Question(i, "exists", templates.exists[0].format(label=present[int(rng.integers(len(present)))]), "yes"))
        if absent:
            questions.append(Question(i, "exists", templates.exists[0].format(label=absent[int(rng.integers(len(absent)))]), "no"))
    return images, questions


def answer_questions(model: Any, processor: Any, images: list[Any], questions: list[Question],
                     batch_size: int = 32, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers, batched with left padding, through the model's own chat template."""
    import torch

    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            prompts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}],
                add_generation_prompt=True) for q in chunk]
            inputs = processor(images=[images[q.image_index] for q in chunk], text=prompts, return_tensors="pt",
                               padding=True).to(device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def score(questions: list[Question], answers: list[str]) -> dict[str, Any]:
    """Exact match per question type and overall; POPE accuracy, precision, recall, F1, yes-ratio;
    for descriptions, CHAIR-style object hallucination (share of named colour-shape pairs not in the
    image) and object recall."""
    from dataengine.testbed.synthweb.blip_models import colour_shape_pairs

    right: dict[str, list[bool]] = defaultdict(list)
    tp = fp = fn = tn = yes = 0
    named = hallucinated = true_total = found = 0
    for q, a in zip(questions, answers):
        if q.kind == "describe":
            truth = {tuple(p.split(" ", 1)) for p in q.answer.split("|")}
            pairs = colour_shape_pairs(a)
            named, hallucinated = named + len(pairs), hallucinated + len(pairs - truth)
            true_total, found = true_total + len(truth), found + len(pairs & truth)
            continue
        said = normalise(a)
        right[q.kind].append(said == normalise(q.answer))
        if q.kind == "exists":
            says_yes = said.split()[:1] == ["yes"]
            yes += says_yes
            truth = q.answer == "yes"
            tp += says_yes and truth
            fp += says_yes and not truth
            fn += (not says_yes) and truth
            tn += (not says_yes) and not truth
    result: dict[str, Any] = {f"{k}_accuracy": float(np.mean(v)) for k, v in sorted(right.items())}
    result["exact_match"] = float(np.mean([x for v in right.values() for x in v])) if right else 0.0
    n_exists = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    result["pope"] = {"accuracy": (tp + tn) / n_exists if n_exists else 0.0, "precision": precision, "recall": recall,
                      "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                      "yes_ratio": yes / n_exists if n_exists else 0.0, "questions": n_exists}
    result["describe"] = {"chair": hallucinated / named if named else 0.0, "recall": found / true_total if true_total else 0.0,
                          "objects_named": named}
    result["questions"] = sum(len(v) for v in right.values())
    return result


def caption_perplexity(model: Any, processor: Any, images: list[Any], captions: list[str]) -> float:
    """Perplexity of the true captions given their images, asked as stage 1 asks: a likelihood, so far
    less noisy than generated answers, and the measure caption noise in the training data hurts first."""
    import io

    from dataengine.eval.heldout import heldout_loss
    from dataengine.train.data import encode_row

    rows = []
    for k, (image, caption) in enumerate(zip(images, captions)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append(encode_row({C.UID: str(k), C.IMAGE: buf.getvalue(), C.CAPTION: caption}, processor, 1, 10**6))
    batch = {key: [r.get(key) for r in rows] for key in (C.INPUT_IDS, C.LABELS, C.PIXEL_VALUES, C.SAMPLE_LENGTH, C.SKIP)}
    size = int(processor.image_processor.crop_size["height"])
    return heldout_loss(model, processor, [batch], (3, size, size))["perplexity"]


def run_benchmark(model: Any, processor: Any, n_images: int = 200, image_size: int | None = None,
                  examples: int = 8) -> dict[str, Any]:
    """Build, answer and score the benchmark; keeps a few answered examples for the report."""
    size = image_size or int(processor.image_processor.crop_size["height"])
    captions: list[str] = []
    images, questions = build_benchmark(n_images, size, captions=captions)
    answers = answer_questions(model, processor, images, questions)
    result = score(questions, answers)
    result["caption_perplexity"] = caption_perplexity(model, processor, images, captions)
    result["examples"] = [{"question": q.question, "answer": q.answer, "model": a}
                          for q, a in list(zip(questions, answers))[:examples]]
    return result
