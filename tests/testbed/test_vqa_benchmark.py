"""The synthetic-web VQA benchmark: questions answered from the scene, and scoring."""

from __future__ import annotations

import numpy as np

from dataengine.testbed.vqa_benchmark import Question, build_benchmark, normalise, score


def test_benchmark_answers_are_the_scenes_truth():
    from dataengine.testbed.synthweb.scenes import KINDS, generate_scene

    images, questions = build_benchmark(12, image_size=48)
    assert len(images) == 12 and images[0].size == (48, 48)
    for q in questions:
        scene = generate_scene(np.random.default_rng([7_000_003, q.image_index]))
        kinds = [o.kind for o in scene.objects]
        if q.kind == "count":
            kind = next(k for k in KINDS if f" {k}s " in q.question)
            assert int(q.answer) == kinds.count(kind)
        elif q.kind == "colour":
            kind = next(k for k in KINDS if f" {k}?" in q.question)
            assert q.answer == next(o.colour for o in scene.objects if o.kind == kind) and kinds.count(kind) == 1
        elif q.kind == "exists":
            kind = next(k for k in KINDS if f" {k} " in q.question)
            assert (q.answer == "yes") == (kind in kinds)
        elif q.kind == "describe":
            assert set(q.answer.split("|")) == {f"{o.colour} {o.kind}" for o in scene.objects}
    per_image_exists = [sum(q.kind == "exists" and q.image_index == i for q in questions) for i in range(12)]
    assert all(n in (1, 2) for n in per_image_exists)
    # same seed, same benchmark; the scenes are not the synthetic web's (its seeds are per build, not 7_000_003)
    assert [q.question for q in build_benchmark(12, image_size=48)[1]] == [q.question for q in questions]


def test_scoring_exact_match_pope_and_hallucination():
    assert normalise("At the top left.") == "top left" == normalise("top left")
    assert normalise("Two") == "2" and normalise("Red.") == "red"
    qs = [Question(0, "count", "How many?", "2"), Question(0, "colour", "Colour?", "red"),
          Question(0, "exists", "Is there a star?", "yes"), Question(0, "exists", "Is there a circle?", "no"),
          Question(1, "exists", "Is there a square?", "yes"), Question(1, "exists", "Is there a star?", "no"),
          Question(0, "describe", "Describe.", "red circle|blue star")]
    answers = [" two", " Blue.", " Yes.", " Yes.", " No.", " No.", " A red circle and a green square."]
    result = score(qs, answers)
    assert result["count_accuracy"] == 1.0 and result["colour_accuracy"] == 0.0
    pope = result["pope"]
    assert (pope["accuracy"], pope["precision"], pope["recall"], pope["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5)
    assert result["describe"] == {"chair": 0.5, "recall": 0.5, "objects_named": 2}
    assert result["questions"] == 6 and result["exact_match"] == 3 / 6
