"""object_detector_mapper on tiny detectors of each family built from configs: OWLv2, Grounding DINO,
DETR (random weights: these tests check the mechanics: boxes in synthesis's form, the threshold,
existing boxes kept, labels named; the real transformers loading and post-processing)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from PIL import Image

from dataengine.core import columns as C
from dataengine.ops import apply_stage
from dataengine.ops.object_detector import ObjectDetectorConfig, ObjectDetectorMapper, label_named
from dataengine.testbed.synthweb.detector_models import (
    build_clip_tokenizer,
    build_random_detr,
    build_random_grounding_dino,
    build_random_owlv2,
)
from tests.conftest import encode_jpeg

LABELS = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def owlv2(tmp_path_factory):
    return build_random_owlv2(tmp_path_factory.mktemp("owlv2"))


def _batch() -> pa.Table:
    jpegs = [encode_jpeg(Image.new("RGB", size, colour)) for size, colour in (((80, 60), "red"), ((50, 90), "blue"))]
    return pa.table({C.UID: ["a", "b", "c", "d", "e"],
                     C.IMAGE: [*jpegs, None, b"not an image", jpegs[0]],
                     C.BOXES: [None, None, None, None, '[{"label": "cat", "box": [0, 0, 1, 1]}]']})


def test_boxes_are_written_in_synthesis_form_best_first_above_the_threshold(owlv2):
    op = ObjectDetectorMapper(ObjectDetectorConfig(model=str(owlv2), labels=LABELS, threshold=0.0, max_objects=5,
                                                   device="cpu"))
    out = apply_stage(op, _batch(), "detect", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in out] == [None, None, "no_image", "decode_error", None]
    assert out[4][C.BOXES] == '[{"label": "cat", "box": [0, 0, 1, 1]}]'  # an annotated row keeps its boxes
    for row in out[:2]:
        found = json.loads(row[C.BOXES])
        assert 1 <= len(found) <= 5
        assert [f["score"] for f in found] == sorted((f["score"] for f in found), reverse=True)
        for f in found:
            assert f["label"] in LABELS
            x1, y1, x2, y2 = f["box"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
    strict = ObjectDetectorMapper(ObjectDetectorConfig(model=str(owlv2), labels=LABELS, threshold=1.0, device="cpu"))
    assert json.loads(strict.process(_batch().slice(0, 1)).column(C.BOXES)[0].as_py()) == []


def test_detections_are_transformers_own_post_processing_normalised(owlv2):
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    image = Image.new("RGB", (80, 60), "red")
    op = ObjectDetectorMapper(ObjectDetectorConfig(model=str(owlv2), labels=LABELS, threshold=0.0, max_objects=100,
                                                   device="cpu"))
    ours = op.detect([image])[0]
    model, processor = AutoModelForZeroShotObjectDetection.from_pretrained(owlv2), AutoProcessor.from_pretrained(owlv2)
    with torch.inference_mode():
        outputs = model(**processor(text=[LABELS], images=[image], return_tensors="pt"))
    theirs = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=[(80, 80)],
                                                              text_labels=[LABELS])[0]
    inside = [(s, b) for s, b in zip(theirs["scores"].tolist(), theirs["boxes"].tolist())
              if min(b[2], 80) / 80 > max(b[0], 0) / 80 and min(b[3], 60) / 60 > max(b[1], 0) / 60]
    best_score, best_box = max(inside)
    assert ours[0]["score"] == pytest.approx(best_score, abs=1e-4)
    expected = [min(max(v, 0.0), 1.0) for v in (best_box[0] / 80, best_box[1] / 60, best_box[2] / 80, best_box[3] / 60)]
    assert ours[0]["box"] == pytest.approx(expected, abs=1e-4)


def test_the_clip_tokenizer_built_here_matches_open_clips(tmp_path):
    import open_clip

    ours = build_clip_tokenizer(tmp_path)(["a large red circle next to two stars"])["input_ids"][0]
    theirs = open_clip.get_tokenizer("ViT-B-32")(["a large red circle next to two stars"])[0].tolist()
    assert ours == theirs[:len(ours)] and len(ours) == 10


def _check_boxes(found: list[dict], names: list[str]) -> None:
    assert [f["score"] for f in found] == sorted((f["score"] for f in found), reverse=True)
    for f in found:
        assert f["label"] in names
        x1, y1, x2, y2 = f["box"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


def test_grounding_dino_boxes_are_named_by_the_labels_their_words_match(tmp_path):
    """Grounding DINO answers with the prompt's words above `text_threshold`, not label ids."""
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    path = build_random_grounding_dino(tmp_path / "gdino")
    image = Image.new("RGB", (80, 60), "red")
    op = ObjectDetectorMapper(ObjectDetectorConfig(model=str(path), labels=LABELS, threshold=0.0, text_threshold=0.0,
                                                   max_objects=100, device="cpu"))
    out = apply_stage(op, _batch(), "detect", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in out] == [None, None, "no_image", "decode_error", None]
    for row in out[:2]:
        found = json.loads(row[C.BOXES])
        assert found
        _check_boxes(found, LABELS)
    ours = op.detect([image])[0]
    model, processor = AutoModelForZeroShotObjectDetection.from_pretrained(path), AutoProcessor.from_pretrained(path)
    with torch.inference_mode():
        outputs = model(**processor(text=[LABELS], images=[image], return_tensors="pt"))
    theirs = processor.post_process_grounded_object_detection(outputs, threshold=0.0, text_threshold=0.0,
                                                              target_sizes=[(60, 80)])[0]
    names = [label_named(t, LABELS) for t in theirs["text_labels"]]
    assert _as_found(ours) == _as_found(_normalised(theirs, names, 80, 60))


def test_detr_boxes_carry_the_models_own_class_names(tmp_path):
    import torch
    from transformers import AutoModelForObjectDetection, AutoProcessor

    path = build_random_detr(tmp_path / "detr", ["circle", "square", "star"])
    image = Image.new("RGB", (50, 90), "blue")
    op = ObjectDetectorMapper(ObjectDetectorConfig(model=str(path), threshold=0.0, max_objects=100, device="cpu"))
    found = op.detect([image])[0]
    assert found
    _check_boxes(found, ["circle", "square", "star"])
    model, processor = AutoModelForObjectDetection.from_pretrained(path), AutoProcessor.from_pretrained(path)
    with torch.inference_mode():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    theirs = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(90, 50)])[0]
    names = [model.config.id2label[int(label)] for label in theirs["labels"]]
    assert _as_found(found) == _as_found(_normalised(theirs, names, 50, 90))


def _normalised(result: dict, names: list[str | None], width: int, height: int) -> list[dict]:
    """transformers' post-processed detections as the op writes them (clipped, normalised, named)."""
    found = []
    for score, box, name in zip(result["scores"].tolist(), result["boxes"].tolist(), names):
        box = [round(min(max(v, 0.0), 1.0), 4) for v in (box[0] / width, box[1] / height, box[2] / width, box[3] / height)]
        if name is not None and box[2] > box[0] and box[3] > box[1]:
            found.append({"label": name, "box": box, "score": round(float(score), 4)})
    return found


def _as_found(found: list[dict]) -> list[tuple]:
    return sorted((f["score"], f["label"], tuple(f["box"])) for f in found)


def test_matched_words_name_the_label_they_mention_first():
    assert label_named("circle", LABELS) == "circle"
    assert label_named("red circle.", LABELS) == "circle"
    assert label_named("star. circle.", LABELS) == "star"
    assert label_named("[SEP]", LABELS) is None
