"""Descriptors: pHash invariances, the colour layout beside it, and SSCD TorchScript embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataengine.dedup.descriptors import SscdModel, colour_layout, decode_rgb, hamming, phash
from dataengine.testbed.synthweb.models import build_tiny_sscd
from tests.conftest import encode_jpeg


def _bits(a: bytes, b: bytes) -> int:
    return int(hamming(np.frombuffer(a, np.uint8)[None], np.frombuffer(b, np.uint8)[None])[0, 0])


@pytest.mark.parametrize("hash_size", [8, 16])
def test_phash_is_flip_invariant_and_robust_to_resize_and_reencode(hash_size):
    rng = np.random.default_rng(3)
    base = np.zeros((120, 160, 3), np.uint8)
    base[20:70, 10:60] = (200, 30, 30)
    base[60:110, 90:150] = (30, 30, 200)
    base = (base + rng.integers(0, 20, base.shape)).astype(np.uint8)
    h = phash(base, hash_size)
    assert len(h) * 8 == hash_size**2
    assert h == phash(base[:, ::-1].copy(), hash_size)
    small = decode_rgb(encode_jpeg(np.asarray(Image.fromarray(base).resize((80, 60))), quality=60))
    assert _bits(h, phash(small, hash_size)) <= hash_size**2 // 16
    other = np.roll(base, 60, axis=0)
    assert _bits(h, phash(other, hash_size)) > hash_size**2 // 8


def _scene(star_colour):
    """A flat scene with one small star-sized patch: what pHash, being greyscale, barely tells apart."""
    scene = np.full((144, 256, 3), (235, 235, 230), np.uint8)
    scene[20:40, 200:220] = star_colour
    return scene


def test_colour_layout_keeps_copies_close_and_tells_recoloured_scenes_apart():
    blue, pink = _scene((40, 60, 220)), _scene((230, 120, 200))
    assert _bits(phash(blue), phash(pink)) <= 10  # pHash alone calls them copies
    layout = np.frombuffer(colour_layout(blue), np.uint8).astype(int)
    assert layout.shape == (8 * 8 * 3,)

    def gap(other: np.ndarray) -> int:
        return int(np.abs(layout - np.frombuffer(colour_layout(other), np.uint8)).max())

    assert gap(blue[:, ::-1].copy()) == 0  # mirror-averaged
    resized = decode_rgb(encode_jpeg(np.asarray(Image.fromarray(blue).resize((160, 90))), quality=25))
    assert gap(resized) <= 4
    assert gap(pink) >= 17  # the star's cell: a large change where a whole-image mean moves by ~1
    assert colour_layout(blue, flip_invariant=False) != colour_layout(blue[:, ::-1].copy(), flip_invariant=False)


def test_sscd_torchscript_descriptors(tmp_path):
    path = build_tiny_sscd(tmp_path / "tiny_sscd.torchscript.pt")
    model = SscdModel(str(path), "cpu", size=64)
    rng = np.random.default_rng(0)
    a = (rng.random((80, 100, 3)) * 255).astype(np.uint8)
    out = model.embed([a, a[:, ::-1].copy(), a])
    assert out.shape == (3, 64)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.allclose(out[0], out[1], atol=1e-5) and np.allclose(out[0], out[2], atol=1e-6)
