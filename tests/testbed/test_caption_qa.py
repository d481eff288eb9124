"""The simulated instruction writer of the demo: questions answered from the caption it is given, so a true
caption gives the benchmark's own answers and a wrong caption gives wrong ones."""

from __future__ import annotations

import json

import numpy as np

from dataengine.llm.backends.template import Templates
from dataengine.llm.prompts import build_messages, load_prompt_sets
from dataengine.testbed.synthweb.caption_qa import CaptionQAResponder, Group, caption_groups, caption_questions
from dataengine.testbed.synthweb.scenes import caption_scene, generate_scene
from dataengine.testbed.vqa_benchmark import build_benchmark, normalise


def test_caption_groups_read_every_caption_template():
    assert caption_groups("a photo of two red stars, a blue circle and a cyan star") == [
        Group(2, "red", "star"), Group(1, "blue", "circle"), Group(1, "cyan", "star")]
    assert caption_groups("a large green hexagon at the top left and a small pink square on the right") == [
        Group(1, "green", "hexagon", "at the top left"), Group(1, "pink", "square", "on the right")]
    assert caption_groups("an orange diamond in the center on a beige background") == [
        Group(1, "orange", "diamond", "in the center")]
    assert caption_groups("IMG_0042.jpg") == [] and caption_groups("stock photo 00321 all rights reserved") == []
    for i in range(300):  # every true caption names exactly its scene's (colour, shape) counts
        rng = np.random.default_rng([11, i])
        scene = generate_scene(rng)
        groups = caption_groups(caption_scene(scene, rng))
        truth: dict[tuple[str, str], int] = {}
        for o in scene.objects:
            truth[(o.colour, o.kind)] = truth.get((o.colour, o.kind), 0) + 1
        assert {(g.colour, g.kind): g.count for g in groups} == truth


def test_a_true_caption_answers_as_the_benchmark_does_and_a_wrong_one_does_not():
    """For benchmark scenes, the questions written from the true caption that the benchmark also asks get
    the benchmark's answers; written from another scene's caption, many do not."""
    templates = Templates.load()
    captions: list[str] = []
    _, questions = build_benchmark(60, image_size=16, captions=captions)
    truth = {(q.image_index, q.question): normalise(q.answer) for q in questions if q.kind != "describe"}
    agree = disagree = asked = wrong_caption_right = wrong_caption_asked = 0
    for i, caption in enumerate(captions):
        for j, caption_used in ((i, caption), ((i + 1) % len(captions), captions[(i + 1) % len(captions)])):
            for question, answer in caption_questions(caption_groups(caption_used), templates, np.random.default_rng(0)):
                if (i, question) not in truth:
                    continue
                if j == i:
                    asked += 1
                    agree += normalise(answer) == truth[(i, question)]
                    disagree += normalise(answer) != truth[(i, question)]
                else:
                    wrong_caption_asked += 1
                    wrong_caption_right += normalise(answer) == truth[(i, question)]
    assert asked > 60 and disagree == 0 and agree == asked
    assert wrong_caption_asked > 30 and wrong_caption_right < 0.7 * wrong_caption_asked


def test_the_responder_reads_our_prompts_and_guesses_when_the_caption_says_nothing():
    responder = CaptionQAResponder(seed=3)
    prompts = load_prompt_sets(None, ["conversation"])["conversation"]
    body = lambda caption: {"messages": build_messages(prompts, {"captions": [caption]})}  # noqa: E731
    reply = json.loads(responder(body("two red stars and a blue circle")).content)
    answers = {t["question"]: t["answer"] for t in reply["turns"]}
    assert any("stars" in q and a == "2" for q, a in answers.items()), answers
    assert all(a != "Yes." for q, a in answers.items() if "square" in q)
    assert json.loads(responder(body("two red stars and a blue circle")).content) == reply  # same caption, same data
    assert responder.guessed == 0
    guessed = json.loads(responder(body("IMG_0042.jpg")).content)
    assert responder.guessed == 1 and len(guessed["turns"]) >= 2  # a weak model writes answers anyway
