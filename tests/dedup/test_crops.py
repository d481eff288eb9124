"""Cropped copies: thumbnails, histogram candidates, and verification by alignment on synthetic-web scenes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dataengine.dedup.crops import (
    THUMB_SIDE,
    CropRule,
    candidate_pairs,
    crop_pairs,
    crops_of_references,
    histogram,
    is_copy,
    read_thumbnail,
    thumbnail,
)
from dataengine.dedup.descriptors import decode_rgb
from dataengine.testbed.synthweb.render import encode_jpeg, render_scene
from dataengine.testbed.synthweb.scenes import Scene, SceneObject


def _scene(*objects: tuple[str, str, tuple[float, float, float, float]], background: str = "beige") -> Scene:
    return Scene(tuple(SceneObject(kind, colour, "medium", "center", box) for kind, colour, box in objects), background,
                 texture=0.6)


TWO = _scene(("star", "blue", (0.15, 0.2, 0.4, 0.5)), ("circle", "red", (0.55, 0.45, 0.85, 0.8)))


def _downloaded(rgb: np.ndarray, quality: int = 85) -> np.ndarray:
    """As the download stage stores an image: JPEG, long side 256."""
    h, w = rgb.shape[:2]
    scale = 256 / max(h, w)
    resized = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    from PIL import Image

    return decode_rgb(encode_jpeg(Image.fromarray(resized), quality))


def _render(scene: Scene, seed: int = 0) -> np.ndarray:
    return np.asarray(render_scene(scene, 480, 360, np.random.default_rng(seed)))


def _thumb(rgb: np.ndarray) -> np.ndarray:
    return read_thumbnail(thumbnail(_downloaded(rgb)))


def test_thumbnail_keeps_the_aspect_ratio_and_the_pixels():
    rgb = np.zeros((90, 160, 3), np.uint8)
    rgb[:, 80:] = (200, 10, 30)
    data = thumbnail(rgb)
    pixels = read_thumbnail(data)
    assert THUMB_SIDE == 96 and pixels.shape == (54, 96, 3) and data.startswith(b"\x89PNG")
    assert pixels[27, 90].tolist() == [200, 10, 30] and pixels[27, 2].tolist() == [0, 0, 0]  # lossless
    with pytest.raises(ValueError, match="not a dedup thumbnail"):
        read_thumbnail(b"junk")


@pytest.mark.parametrize("mirror", [False, True], ids=["crop", "mirrored crop"])
@pytest.mark.parametrize("fraction", [0.86, 0.93])
def test_a_crop_aligns_inside_its_original(mirror, fraction):
    original = _render(TWO)
    h, w = original.shape[:2]
    ch, cw = round(h * fraction), round(w * fraction)
    crop = original[h - ch:, w - cw:]  # the bottom-right corner: the largest shift a crop this size can have
    crop = np.ascontiguousarray(crop[:, ::-1]) if mirror else crop
    a, b = _thumb(original), _thumb(crop)
    assert is_copy(a, b) and is_copy(b, a)


def test_distinct_scenes_that_look_alike_do_not_align():
    """What global descriptors merge on flat scenes: the same objects moved a little, one object of a busier
    scene alone, the same layout recoloured, and the same scene drawn twice with its own colour jitter and
    lighting are not copies; an 80% crop is at the edge of the search and still found."""
    original = _thumb(_render(TWO))
    moved = _scene(("star", "blue", (0.22, 0.2, 0.47, 0.5)), ("circle", "red", (0.5, 0.45, 0.8, 0.8)))
    alone = _scene(("star", "blue", (0.15, 0.2, 0.4, 0.5)))
    recoloured = _scene(("star", "green", (0.15, 0.2, 0.4, 0.5)), ("circle", "red", (0.55, 0.45, 0.85, 0.8)))
    for other in (moved, alone, recoloured):
        assert not is_copy(original, _thumb(_render(other))), other
    assert not any(is_copy(original, _thumb(_render(TWO, seed))) for seed in range(1, 6))  # drawn again
    full = _render(TWO)
    h, w = full.shape[:2]
    assert is_copy(original, _thumb(full[: round(h * 0.8), : round(w * 0.8)]))
    assert not is_copy(original, _thumb(full[: round(h * 0.7), : round(w * 0.7)]))  # below min_side 0.8
    assert is_copy(original, _thumb(full[: round(h * 0.7), : round(w * 0.7)]), CropRule(min_side=0.65))


def test_candidates_are_nearest_histograms_within_the_radius():
    hists = np.array([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 0.5, 0.5]], np.float32)
    assert candidate_pairs(hists, radius=2.0, neighbours=3).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert candidate_pairs(hists, radius=0.25, neighbours=3).tolist() == [[0, 1], [1, 2]]  # L1 0.2 each; 0-2 is 0.4
    assert candidate_pairs(hists, radius=0.45, neighbours=1).tolist() == [[0, 1], [1, 2]]  # 0's nearest is 1, 2's is 1
    assert candidate_pairs(hists[:1], radius=2.0, neighbours=3).shape == (0, 2)
    uniform = histogram(np.full((8, 8, 3), 100, np.float32))
    assert uniform.sum() == pytest.approx(1.0) and uniform.max() == 1.0


def test_crop_pairs_finds_the_crop_among_look_alikes_and_skips_known_pairs():
    original = _render(TWO)
    h, w = original.shape[:2]
    crop = original[round(h * 0.05): round(h * 0.95), round(w * 0.1): round(w * 0.98)]
    moved = _render(_scene(("star", "blue", (0.22, 0.2, 0.47, 0.5)), ("circle", "red", (0.5, 0.45, 0.8, 0.8))), seed=3)
    thumbs = [thumbnail(_downloaded(x)) for x in (moved, original, crop)]
    assert crop_pairs(thumbs).tolist() == [[1, 2]]
    assert crop_pairs([None, thumbs[1], None, thumbs[2]]).tolist() == [[1, 3]]  # rows without an image take no part
    assert crop_pairs(thumbs, known=np.array([[1, 2]])).shape == (0, 2)
    assert crop_pairs(thumbs[:1]).shape == (0, 2)


def test_crops_of_references_names_the_reference_each_row_crops():
    original = _render(TWO)
    h, w = original.shape[:2]
    other = _render(_scene(("hexagon", "green", (0.5, 0.1, 0.8, 0.5)), background="dark grey"), seed=2)
    references = [thumbnail(_downloaded(other)), thumbnail(_downloaded(original))]
    rows = [thumbnail(_downloaded(original[: round(h * 0.9), round(w * 0.08):])), None,
            thumbnail(_downloaded(_render(_scene(("star", "blue", (0.22, 0.2, 0.47, 0.5)),
                                                 ("circle", "red", (0.5, 0.45, 0.8, 0.8))), seed=3))),
            thumbnail(_downloaded(np.ascontiguousarray(other[:, ::-1])))]
    assert crops_of_references(rows, references) == {0: 1, 3: 0}  # the crop, and the mirrored copy
    assert crops_of_references(rows, []) == {} and crops_of_references([None], references) == {}
