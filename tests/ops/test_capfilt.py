"""CapFilt ops on tiny BLIP models built from configs and loaded with from_pretrained (random weights:
these tests check the ops' mechanics; tests/test_blip_models.py checks trained quality)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dataengine.core import columns as C
from dataengine.models.loaders import load_blip
from dataengine.models.sources import ModelNotFound
from dataengine.ops import apply_stage
from dataengine.ops.blip_caption import BlipCaptionConfig, BlipCaptionMapper, _strip_prompt
from dataengine.ops.capfilt import CapfiltConfig, CapfiltFilter
from dataengine.testbed.synthweb.blip_models import build_random_blip_captioner, build_random_blip_itm
from tests.conftest import encode_jpeg


@pytest.fixture(scope="module")
def blip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    return str(build_random_blip_captioner(root / "captioner")), str(build_random_blip_itm(root / "itm", seed=1))


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    return encode_jpeg(Image.new("RGB", (80, 60), colour))


def _batch() -> pa.Table:
    return pa.table({C.UID: ["a", "b", "c", "d"], C.IMAGE: [_jpeg((220, 30, 30)), None, b"not an image", _jpeg((30, 30, 220))],
                     C.CAPTION: ["a red square", "x", "y", "a blue square"]})


def test_captioner_writes_k_captions_deterministically(blip_dirs):
    captioner, _ = blip_dirs
    op = BlipCaptionMapper(BlipCaptionConfig(model=captioner, num_captions=4, device="cpu", max_new_tokens=8))
    rows = apply_stage(op, _batch(), "cap", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in rows] == [None, "no_image", "decode_error", None]
    for row in (rows[0], rows[3]):
        assert len(row[C.SYNTHETIC_CAPTIONS]) == 4 and all(c.strip() for c in row[C.SYNTHETIC_CAPTIONS])
        assert len(set(row[C.SYNTHETIC_CAPTIONS])) > 1  # nucleus sampling: diverse
    again = apply_stage(op, _batch(), "cap", 0).to_pylist()
    assert [r[C.SYNTHETIC_CAPTIONS] for r in again] == [r[C.SYNTHETIC_CAPTIONS] for r in rows]  # seeded by uids
    beam = BlipCaptionMapper(BlipCaptionConfig(model=captioner, num_captions=2, decoding="beam", device="cpu",
                                               max_new_tokens=8, prompt=None))
    assert [len(c or []) for c in beam.process(_batch()).column(C.SYNTHETIC_CAPTIONS).to_pylist()] == [2, 0, 0, 2]


def test_prompt_is_stripped():
    assert _strip_prompt("a picture of a red circle", "a picture of") == "a red circle"
    assert _strip_prompt("two stars", "a picture of") == "two stars"


def test_itm_shortcut_equals_the_models_own_forward(blip_dirs):
    import torch

    _, itm = blip_dirs
    op = CapfiltFilter(CapfiltConfig(model=itm, device="cpu"))
    image = Image.open(io.BytesIO(_jpeg((220, 30, 30))))
    texts = ["a red square", "two blue circles on a white background", "a star"]
    ours = op.match_probabilities(image, texts)
    inputs = op.processor(images=[image] * 3, text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = op.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"]).itm_score
    assert ours == pytest.approx(torch.softmax(logits, -1)[:, 1].numpy(), abs=1e-5)


def test_capfilt_keeps_captions_above_threshold_best_first(blip_dirs):
    _, itm = blip_dirs
    batch = _batch().append_column(C.SYNTHETIC_CAPTIONS, pa.array(
        [["a red circle", "a green star"], None, ["x"], []], pa.list_(pa.string())))
    probe = CapfiltFilter(CapfiltConfig(model=itm, device="cpu"))
    scores = probe.match_probabilities(Image.open(io.BytesIO(_jpeg((220, 30, 30)))), ["a red square", "a red circle", "a green star"])
    threshold = float(sorted(scores)[1])  # exactly two of the three pass
    op = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=threshold, prefer="score"))
    rows = apply_stage(op, batch, "capfilt", 0).to_pylist()
    blue = probe.match_probabilities(Image.open(io.BytesIO(_jpeg((30, 30, 220)))), ["a blue square"])[0]
    assert [r[C.REJECT_REASON] for r in rows] == [None, "no_image", "decode_error",
                                                  None if blue >= threshold else "capfilt_no_match"]
    first = rows[0]
    assert first[C.WEB_CAPTION_ITM] == pytest.approx(scores[0], abs=1e-5)
    assert first[C.SYNTHETIC_CAPTION_ITM] == pytest.approx(list(scores[1:]), abs=1e-5)
    texts = ["a red square", "a red circle", "a green star"]
    expected = [t for _, t in sorted(zip(scores, texts), key=lambda p: -p[0])][:2]
    assert first[C.CAPTIONS_KEPT] == expected
    assert first[C.CAPTION_BEST] == expected[0]
    assert first[C.CAPTION_BEST_SOURCE] == ("web" if expected[0] == "a red square" else "synthetic")
    strict = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=0.999))
    assert strict.process(batch).column(C.REJECT_REASON).to_pylist()[0] == "capfilt_no_match"


def test_missing_blip_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="holds no config.json"):
        load_blip(str(tmp_path / "empty"), "caption", device="cpu")
    with pytest.raises(ModelNotFound, match="cannot load BLIP itm model 'no-such-org/no-such-blip'"):
        load_blip("no-such-org/no-such-blip", "itm", device="cpu")


def test_prefer_web_keeps_a_passing_web_caption_as_best(blip_dirs):
    _, itm = blip_dirs
    batch = _batch().append_column(C.SYNTHETIC_CAPTIONS, pa.array(
        [["a red circle", "a green star"], None, ["x"], ["a blue circle"]], pa.list_(pa.string())))
    low = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=0.0)).process(batch).to_pylist()
    assert [low[i][C.CAPTION_BEST] for i in (0, 3)] == ["a red square", "a blue square"]
    assert [low[i][C.CAPTION_BEST_SOURCE] for i in (0, 3)] == ["web", "web"]
    web_score = low[0][C.WEB_CAPTION_ITM]
    above_web = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=min(1.0, web_score + 1e-6)))
    row = above_web.process(batch).to_pylist()[0]  # the web caption fails: the best synthetic one that passes, if any
    passing = [c for c, p in zip(["a red circle", "a green star"], low[0][C.SYNTHETIC_CAPTION_ITM]) if p > web_score]
    assert row[C.CAPTION_BEST] == (max(passing, key=lambda c: low[0][C.SYNTHETIC_CAPTION_ITM][["a red circle", "a green star"].index(c)]) if passing else None)


def test_blips_prepared_pixels_are_the_processors_own(blip_dirs):
    """The preparer resizes on uint8 as BLIP's image processor does and the device normalises as it does."""
    import numpy as np
    import torch

    from dataengine.models.loaders import hf_image_prep
    from dataengine.models.pixels import to_model_input

    captioner, _ = blip_dirs
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    resize, size, mean, std = hf_image_prep(captioner)
    ours = to_model_input(resize(image)[None], torch.device("cpu"), torch.float32, mean, std, scale=None)
    op = BlipCaptionMapper(BlipCaptionConfig(model=captioner, device="cpu"))
    theirs = op.processor(images=[image], return_tensors="pt")["pixel_values"]
    assert size == tuple(theirs.shape[-2:]) and torch.equal(ours, theirs)


def test_synthetic_captions_can_be_held_to_a_stricter_bar_and_replace_a_passing_web_one_by_a_margin(blip_dirs):
    """Where the captioner's mistakes score like the truth, a row whose web caption fails is rejected
    rather than given a synthetic caption below `synthetic_threshold`; under prefer: score, a synthetic
    caption displaces a passing web caption only by `margin`."""
    _, itm = blip_dirs
    texts, web = ["a red square", "a red circle", "a green star"], np.array([0.6, 0.7, 0.3])
    strict = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=0.5, synthetic_threshold=0.9))
    assert strict._rank(texts, web, True)[C.CAPTION_BEST] == "a red square"  # the web caption passes
    failing = strict._rank(texts, np.array([0.4, 0.8, 0.3]), True)
    assert failing[C.REJECT_REASON] == "capfilt_no_match" and failing[C.CAPTION_BEST] is None
    default = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=0.5))
    assert default._rank(texts, np.array([0.4, 0.8, 0.3]), True)[C.CAPTION_BEST] == "a red circle"
    by_score = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=0.5, prefer="score"))
    assert by_score._rank(texts, web, True)[C.CAPTION_BEST] == "a red circle"  # 0.7 > 0.6
    margin = CapfiltFilter(CapfiltConfig(model=itm, device="cpu", threshold=0.5, prefer="score", margin=0.2))
    assert margin._rank(texts, web, True)[C.CAPTION_BEST] == "a red square"  # 0.7 < 0.6 + 0.2
    assert margin._rank(texts, np.array([0.6, 0.85, 0.3]), True)[C.CAPTION_BEST] == "a red circle"  # 0.85 > 0.8
    assert margin._rank(texts, np.array([0.6, 0.85, 0.3]), True)[C.CAPTIONS_KEPT] == ["a red circle", "a red square"]
