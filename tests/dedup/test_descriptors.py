"""Descriptors: pHash invariances and SSCD TorchScript embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataengine.dedup.descriptors import SscdModel, decode_rgb, hamming, phash
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


def test_sscd_torchscript_descriptors(tmp_path):
    path = build_tiny_sscd(tmp_path / "tiny_sscd.torchscript.pt")
    model = SscdModel(str(path), "cpu", size=64)
    rng = np.random.default_rng(0)
    a = (rng.random((80, 100, 3)) * 255).astype(np.uint8)
    out = model.embed([a, a[:, ::-1].copy(), a])
    assert out.shape == (3, 64)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.allclose(out[0], out[1], atol=1e-5) and np.allclose(out[0], out[2], atol=1e-6)
