"""LLaVA assembly, chat template, label masking, freezing and checkpoints (no Ray: in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataengine.train.batching import collate, token_loss_sum
from dataengine.train.config import ModelSpec, TrainSpec
from dataengine.train.data import IGNORE_INDEX, encode_row, to_messages
from dataengine.train.model import build_llava, load_llava, set_trainable


@pytest.fixture(scope="module")
def llava(tiny_vlm_parts):
    return build_llava(ModelSpec(vision=str(tiny_vlm_parts["vision"]), lm=str(tiny_vlm_parts["lm"])))


def _image(seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 80, 3), dtype=np.uint8))


TURNS = [{"from": "human", "value": "<image>\nHow many circles are there in the image?"}, {"from": "gpt", "value": "2"},
         {"from": "human", "value": "What colour is the star?"}, {"from": "gpt", "value": "Red."}]


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


def test_image_token_expands_to_patch_count_and_labels_cover_replies_only(llava):
    model, processor = llava
    row = {"uid": "0-0", "image": _jpeg(), "conversations": json.dumps(TURNS), "caption": "x"}
    encoded = encode_row(row, processor, stage=2, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    image_id = model.config.image_token_id
    assert int((ids == image_id).sum()) == (64 // 8) ** 2 == model.config.image_seq_length
    trained = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    eos = processor.tokenizer.eos_token
    assert trained == f" 2{eos} Red.{eos}"
    assert np.all(labels[ids == image_id] == IGNORE_INDEX)
    # labels equal the input ids wherever they are set (the shift happens in the loss)
    assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # stage 1 trains on the caption only
    stage1 = encode_row(row, processor, stage=1, max_length=512)
    assert processor.tokenizer.decode(stage1["input_ids"][stage1["labels"] != IGNORE_INDEX]) == f" x{eos}"


def test_too_long_sample_is_a_skip_not_a_truncation(llava):
    _, processor = llava
    row = {"uid": "0-0", "image": _jpeg(), "conversations": json.dumps(TURNS)}
    full = encode_row(row, processor, stage=2, max_length=512)
    skipped = encode_row(row, processor, stage=2, max_length=len(full["input_ids"]) - 1)
    assert skipped["skip"] == "too_long" and "input_ids" not in skipped
    assert encode_row({**row, "image": b"not an image"}, processor, 2, 512)["skip"] == "bad_image"


def _jpeg(seed: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    _image(seed).save(buf, format="JPEG")
    return buf.getvalue()


def test_saved_model_loads_in_plain_transformers_with_chat_template(llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    plain = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    plain_processor = AutoProcessor.from_pretrained(str(tmp_path))
    messages = to_messages(TURNS[:1], _image())
    text = plain_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nHow many circles are there in the image? ASSISTANT:"
    inputs = plain_processor(images=_image(), text=text, return_tensors="pt")
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
    row = {"uid": "0-0", "image": _jpeg(), "conversations": json.dumps(TURNS), "caption": "a red star"}
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


def test_token_normalised_loss_does_not_depend_on_the_split():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11)
    labels = torch.randint(0, 11, (4, 7))
    labels[0, :5] = IGNORE_INDEX  # rows with very different numbers of labelled tokens
    labels[2, 1:] = IGNORE_INDEX
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    whole = token_loss_sum(logits, labels) / tokens
    halves = (token_loss_sum(logits[:2], labels[:2]) + token_loss_sum(logits[2:], labels[2:])) / tokens
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.allclose(whole, halves) and torch.allclose(whole, reference)


def test_spec_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="vision and lm are both required"):
        TrainSpec.model_validate({"model": {"vision": "x"}})
    with pytest.raises(ValidationError, match="fsdp needs use_gpu"):
        TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}, "strategy": "fsdp"})
    spec = TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}})
    assert (spec.stage1.lr, spec.stage1.global_batch, spec.stage2.lr, spec.stage2.global_batch) == (1e-3, 256, 2e-5, 128)
    assert (spec.stage1.warmup_ratio, spec.stage1.weight_decay, spec.stage1.schedule) == (0.03, 0.0, "cosine")
    # workers and GPUs do not change what is trained: same hash
    assert spec.train_hash() == TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}, "workers": 4}).train_hash()
    # a stage given in part keeps that stage's defaults for what it leaves out
    partial = TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}, "stage1": {"max_steps": 3},
                                        "stage2": {"epochs": 2}})
    assert (partial.stage1.lr, partial.stage1.global_batch, partial.stage1.max_steps) == (1e-3, 256, 3)
    assert (partial.stage2.lr, partial.stage2.global_batch, partial.stage2.epochs) == (2e-5, 128, 2)
    with pytest.raises(ValidationError, match="stage2.lr"):
        TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}, "stage2": {"lr": -1}})


def test_batching_reaches_the_global_batch():
    from dataengine.train.trainer import TrainError, batching

    spec = TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}})
    plan = batching(spec.stage1, workers=8, train_rows=558_000)
    assert (plan.micro_batch, plan.accumulation) == (16, 2) and plan.steps_per_epoch == 2180
    with pytest.raises(TrainError, match="not divisible by workers=3"):
        batching(spec.stage1, workers=3, train_rows=1000)


def test_missing_models_are_clear_errors(tmp_path):
    from dataengine.models import ModelNotFound

    with pytest.raises(ModelNotFound, match="vision tower"):
        build_llava(ModelSpec(vision=str(tmp_path / "none"), lm=str(tmp_path / "none")))


def test_load_llava_round_trip(llava, tmp_path):
    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_processor = load_llava(str(tmp_path))
    assert again.config.image_token_id == model.config.image_token_id
    assert again_processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_lora_checkpoint_is_a_plain_llava_with_the_adapters_merged(llava, tmp_path):
    """Stage 2 with LoRA: only adapters and the projector train; the checkpoint is a stock LLaVA whose
    logits equal the adapted model's."""
    import copy

    from transformers import LlavaForConditionalGeneration

    from dataengine.train.loop import _save_checkpoint, _state_dict_for_save, apply_lora

    base, processor = copy.deepcopy(llava[0]), llava[1]
    set_trainable(base, 2)
    model = apply_lora(base, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    row = {"uid": "0-0", "image": _jpeg(), "conversations": json.dumps(TURNS)}
    enc = encode_row(row, processor, stage=2, max_length=512)
    mb = collate({k: [v] for k, v in enc.items()}, [0], processor.tokenizer.pad_token_id, (3, 64, 64))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(2):  # two steps: the LoRA B matrices start at zero, so one step leaves the LM unchanged
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
        token_loss_sum(logits, mb.labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
    weights = _state_dict_for_save(model, "ddp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    _save_checkpoint(tmp_path, model, processor, optimizer, scheduler, {"step": 2}, {"stage": 2}, weights)
    plain = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        saved = plain(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
        original = llava[0].eval()(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
    assert torch.allclose(saved, adapted, atol=1e-4), (saved - adapted).abs().max()
    assert not torch.allclose(saved, original, atol=1e-3)


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
    row = {"uid": "0-0", "image": _jpeg(), "conversations": json.dumps(TURNS)}
    enc = encode_row(row, processor, stage=2, max_length=512)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 16
    mb = collate({k: [v] for k, v in enc.items()}, [0], processor.tokenizer.pad_token_id, (3, 32, 32))
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values).logits
    assert logits.shape[:2] == mb.input_ids.shape


def _fake_checkpoint(storage: Path, attempt: str, step: int) -> Path:
    """A checkpoint directory as `_save_checkpoint` leaves it: weights, state, and the file list last."""
    from dataengine.train.checkpoints import STATE_FILE, write_file_list

    ckpt = storage / attempt / f"checkpoint_{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"x" * 100)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
    write_file_list(ckpt)
    return ckpt


def test_a_checkpoint_copy_cut_off_is_not_resumed_from(tmp_path):
    """A restart takes the newest *complete* checkpoint: one whose copy was cut off (a file short or
    missing) is passed over for the older complete one."""
    from dataengine.train.checkpoints import is_complete, latest_checkpoint

    storage = tmp_path / "checkpoints"
    oldest, newest = (_fake_checkpoint(storage, "stage2-1", step) for step in (1, 2))
    assert is_complete(newest) and latest_checkpoint(storage) == newest
    (newest / "model.safetensors").write_bytes(b"x" * 40)  # the copy was cut off
    assert not is_complete(newest) and latest_checkpoint(storage) == storage / "stage2-1" / "checkpoint_1"
    (oldest / "model.safetensors").unlink()
    assert latest_checkpoint(storage) is None


def test_a_finished_stage_keeps_only_its_newest_complete_checkpoints(tmp_path):
    from dataengine.train.checkpoints import prune_checkpoints

    storage = tmp_path / "checkpoints"
    for attempt, steps in (("stage1-1", (1, 2, 3)), ("stage1-2", (4, 5))):  # a second attempt after --resume
        for step in steps:
            _fake_checkpoint(storage, attempt, step)
    (storage / "stage1-2" / "checkpoint_5" / "model.safetensors").write_bytes(b"x")  # cut off: not kept
    (storage / "stage1-2" / "checkpoint_6").mkdir()  # an empty copy from a kill
    deleted = prune_checkpoints(storage, keep=2)
    left = sorted(p.name for p in storage.glob("*/checkpoint_*"))
    assert left == ["checkpoint_3", "checkpoint_4"] and len(deleted) == 4
