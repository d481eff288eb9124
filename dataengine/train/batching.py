"""From encoded rows to padded tensors: length grouping, padding, and the loss normaliser.

One optimizer step reads `micro_batch x accumulation` rows per worker. Within that window rows are
sorted by length before being cut into micro-batches (LLaVA-1.5 groups by modality length the same
way, inside "megabatches"), so little compute goes to padding. The loss is the sum of token losses
over the whole global step divided by its number of assistant tokens, counted across all workers:
the same value whatever the split over workers and micro-batches (a mean per micro-batch would weigh
a token in a short batch more than one in a long batch).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.train.data import IGNORE_INDEX, INPUT_IDS, LABELS, LENGTH, PIXELS, SKIP


@dataclass
class MicroBatch:
    input_ids: Any
    attention_mask: Any
    labels: Any
    pixel_values: Any
    tokens: int  # assistant tokens that carry loss (after the shift)


def valid_rows(batch: dict[str, Any], skips: Counter[str]) -> list[int]:
    """Indices of rows that train; the others are counted in `skips` by reason."""
    keep = []
    for i, reason in enumerate(batch[SKIP]):
        if reason is None or (isinstance(reason, float) and np.isnan(reason)):
            keep.append(i)
        else:
            skips[str(reason)] += 1
    return keep


def micro_batches(rows: list[int], lengths: Any, micro: int, group_by_length: bool) -> list[list[int]]:
    order = sorted(rows, key=lambda i: -int(lengths[i])) if group_by_length else list(rows)
    return [order[i:i + micro] for i in range(0, len(order), micro)]


def collate(batch: dict[str, Any], rows: list[int], pad_id: int, pixel_shape: tuple[int, ...]) -> MicroBatch:
    """Right-padded tensors for `rows` of a numpy batch."""
    import torch

    width = max(len(batch[INPUT_IDS][i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        n = len(batch[INPUT_IDS][i])
        ids[j, :n] = torch.as_tensor(np.asarray(batch[INPUT_IDS][i], dtype=np.int64))
        labels[j, :n] = torch.as_tensor(np.asarray(batch[LABELS][i], dtype=np.int64))
        mask[j, :n] = 1
    pixels = torch.stack([torch.tensor(np.asarray(batch[PIXELS][i], dtype=np.float32)).view(*pixel_shape) for i in rows])
    return MicroBatch(ids, mask, labels, pixels, int((labels[:, 1:] != IGNORE_INDEX).sum()))


def step_batches(batch: dict[str, Any], micro: int, group_by_length: bool, pad_id: int,
                 pixel_shape: tuple[int, ...], skips: Counter[str]) -> list[MicroBatch]:
    """One optimizer step's rows on this worker as padded micro-batches (maybe none: all skipped)."""
    rows = valid_rows(batch, skips)
    return [collate(batch, chunk, pad_id, pixel_shape) for chunk in micro_batches(rows, batch[LENGTH], micro, group_by_length)]


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum of next-token cross-entropy over labelled positions (divide by the global token count)."""
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
