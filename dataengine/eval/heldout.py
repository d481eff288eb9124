"""Held-out loss and perplexity: the mean next-token loss on assistant tokens of rows never trained on."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from dataengine.train.batching import step_batches, token_loss_sum


def heldout_loss(model: Any, processor: Any, batches: Any, pixel_shape: tuple[int, ...], micro_batch: int = 16) -> dict[str, Any]:
    """Token-weighted loss over `batches` (numpy batches of encoded rows, see `train.data`)."""
    import torch

    device = next(model.parameters()).device
    total, tokens, samples = 0.0, 0, 0
    skips: Counter[str] = Counter()
    model.eval()
    with torch.no_grad():
        for batch in batches:
            for mb in step_batches(batch, micro_batch, True, processor.tokenizer.pad_token_id, pixel_shape, skips):
                logits = model(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device),
                               pixel_values=mb.pixel_values.to(device, dtype=model.dtype)).logits
                total += float(token_loss_sum(logits, mb.labels.to(device)))
                tokens += mb.tokens
                samples += int(mb.input_ids.shape[0])
    loss = total / tokens if tokens else float("nan")
    return {"samples": samples, "tokens": tokens, "loss": loss,
            "perplexity": math.exp(loss) if tokens else float("nan"), "skipped": dict(skips)}
