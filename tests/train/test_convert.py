"""An open_clip vision tower converted to a transformers CLIP tower gives the same features."""

from __future__ import annotations

import torch


def test_open_clip_tower_converts_exactly(tiny_vlm_parts, tmp_path):
    import open_clip
    from transformers import CLIPVisionModel

    from dataengine.train.convert import convert_open_clip_vision

    out = convert_open_clip_vision(tiny_vlm_parts["vision"], tmp_path / "hf")
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_vlm_parts['vision']}")
    tower = CLIPVisionModel.from_pretrained(str(out)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = clip.eval().encode_image(pixels)
        got = tower(pixel_values=pixels).pooler_output @ clip.visual.proj
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
