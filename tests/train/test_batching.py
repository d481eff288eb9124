"""Batching: token-normalised loss independent of the split, and the global batch reached."""

from __future__ import annotations

import pytest
import torch

from dataengine.train.batching import token_loss_sum
from dataengine.train.config import TrainSpec
from dataengine.train.data import IGNORE_INDEX


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


def test_batching_reaches_the_global_batch():
    from dataengine.train.trainer import TrainError, batching

    spec = TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}})
    plan = batching(spec.stage1, workers=8, train_rows=558_000)
    assert (plan.micro_batch, plan.accumulation) == (16, 2) and plan.steps_per_epoch == 2180
    with pytest.raises(TrainError, match="not divisible by workers=3"):
        batching(spec.stage1, workers=3, train_rows=1000)
