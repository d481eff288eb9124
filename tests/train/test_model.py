"""LLaVA assembly from a vision tower and an LM, freezing, saving and loading in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from dataengine.train.batching import collate, token_loss_sum
from dataengine.train.config import ModelSpec
from dataengine.train.data import encode_row, to_messages
from dataengine.train.model import build_llava, load_llava, set_trainable
from tests.train.conftest import TURNS, random_image, random_jpeg


def test_saved_model_loads_in_plain_transformers_with_chat_template(llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    plain = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    plain_processor = AutoProcessor.from_pretrained(str(tmp_path))
    messages = to_messages(TURNS[:1], random_image())
    text = plain_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nHow many circles are there in the image? ASSISTANT:"
    inputs = plain_processor(images=random_image(), text=text, return_tensors="pt")
    with torch.no_grad():
        ours = model.eval()(**inputs).logits
        theirs = plain(**inputs).logits
    assert torch.equal(ours, theirs)
    generated = plain.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_linear_projector_is_one_linear_map(tiny_vlm_parts):
    model, _ = build_llava(ModelSpec(vision=str(tiny_vlm_parts["vision"]), lm=str(tiny_vlm_parts["lm"]), projector="linear"))
    projector = model.model.multi_modal_projector
    x = torch.randn(4, projector.linear_1.in_features)
    with torch.no_grad():
        assert torch.allclose(projector(x), projector.linear_1(x), atol=1e-6)
    trainable = set_trainable(model, 1)
    assert trainable == ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias"]


def test_gpt2_style_lm_is_untied_but_equal(tmp_path):
    from dataengine.testbed.synthweb.models import build_random_causal_lm, build_random_open_clip

    lm = build_random_causal_lm(tmp_path / "gpt2", ["a red circle", "two blue squares"])
    vision = build_random_open_clip(tmp_path / "clip", image_size=32)
    model, processor = build_llava(ModelSpec(vision=str(vision), lm=str(lm)))
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is not emb
    assert torch.equal(model.lm_head.weight[: emb.shape[0] - 1], emb[:-1])  # all but the new <image> row


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_parameters_stay_frozen_after_a_step(llava, stage):
    import copy

    model, processor = copy.deepcopy(llava[0]), llava[1]
    trainable = set(set_trainable(model, stage))
    for name in trainable:
        assert name.startswith("model.multi_modal_projector.") or (stage == 2 and name.startswith(("model.language_model.", "lm_head.")))
    assert any(n.startswith("model.multi_modal_projector.") for n in trainable)
    assert (stage == 2) == any(n.startswith("model.language_model.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    row = {"uid": "0-0", "image": random_jpeg(), "conversations": json.dumps(TURNS), "caption": "a red star"}
    enc = encode_row(row, processor, stage=stage, max_length=512)
    batch = {k: [v] for k, v in enc.items()}
    mb = collate(batch, [0], processor.tokenizer.pad_token_id, (3, 64, 64))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
    token_loss_sum(logits, mb.labels).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), name
        assert (param.grad is not None) == (name in trainable), name


def test_missing_models_are_clear_errors(tmp_path):
    from dataengine.models.sources import ModelNotFound

    with pytest.raises(ModelNotFound, match="vision tower"):
        build_llava(ModelSpec(vision=str(tmp_path / "none"), lm=str(tmp_path / "none")))


def test_load_llava_round_trip(llava, tmp_path):
    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_processor = load_llava(str(tmp_path))
    assert again.config.image_token_id == model.config.image_token_id
    assert again_processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_init_from_an_existing_llava_checkpoint(llava, tmp_path):
    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, _ = build_llava(ModelSpec(init_from=str(tmp_path)))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_siglip_tower_uses_every_patch(tiny_vlm_parts, tmp_path):
    """SigLIP has no CLS token: all patches are image tokens (`full`), none dropped."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    model, processor = build_llava(ModelSpec(vision=str(tmp_path / "siglip"), lm=str(tiny_vlm_parts["lm"])))
    assert model.config.vision_feature_select_strategy == "full" and model.config.image_seq_length == 16
    row = {"uid": "0-0", "image": random_jpeg(), "conversations": json.dumps(TURNS)}
    enc = encode_row(row, processor, stage=2, max_length=512)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 16
    mb = collate({k: [v] for k, v in enc.items()}, [0], processor.tokenizer.pad_token_id, (3, 32, 32))
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
    assert logits.shape[:2] == mb.input_ids.shape
