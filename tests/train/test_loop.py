"""The training loop's checkpoints: LoRA adapters merged into a plain LLaVA."""

from __future__ import annotations

import json

import torch

from dataengine.train.batching import collate, token_loss_sum
from dataengine.train.data import encode_row
from dataengine.train.model import set_trainable
from tests.train.conftest import TURNS, random_jpeg


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
    row = {"uid": "0-0", "image": random_jpeg(), "conversations": json.dumps(TURNS)}
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
