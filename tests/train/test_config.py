"""The train: section's errors name the field."""

from __future__ import annotations

import pytest

from dataengine.train.config import TrainSpec


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


def test_stage2_seeds_must_be_distinct_and_differ_from_seed():
    from dataengine.train.config import TrainSpec

    model = {"vision": "v", "lm": "l"}
    assert TrainSpec.model_validate({"model": model, "stage2_seeds": [1, 2]}).stage2_seeds == [1, 2]
    for seeds in ([0, 1], [3, 3]):
        with pytest.raises(ValueError, match="stage2_seeds"):
            TrainSpec.model_validate({"model": model, "stage2_seeds": seeds})
