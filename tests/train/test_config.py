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
    workers4 = TrainSpec.model_validate({"model": {"vision": "x", "lm": "y"}, "workers": 4})
    assert spec.train_hash(1) == workers4.train_hash(1) and spec.train_hash(2) == workers4.train_hash(2)
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


def test_stage_one_hash_ignores_stage_two_and_which_stages_run():
    """Adding stage 2, or changing its settings, leaves stage 1's hash (a trained stage 1 resumes); stage 2's
    hash follows both stages' settings; a result recorded with the whole section's hash still matches."""
    import hashlib
    import json

    from dataengine.core.fields import decisive

    base = {"model": {"vision": "x", "lm": "y"}}
    only1 = TrainSpec.model_validate({**base, "stages": [1]})
    both = TrainSpec.model_validate({**base, "stages": [1, 2], "stage2": {"lr": 1e-4}, "stage2_init": "/m"})
    assert only1.train_hash(1) == both.train_hash(1)
    assert only1.train_hash(2) != both.train_hash(2)
    assert TrainSpec.model_validate({**base, "stage1": {"lr": 1e-2}}).train_hash(1) != only1.train_hash(1)
    assert TrainSpec.model_validate({**base, "seed": 3}).train_hash(1) != only1.train_hash(1)
    assert TrainSpec.model_validate({**base, "stage1": {"lr": 1e-2}}).train_hash(2) != only1.train_hash(2)
    whole = hashlib.sha256(json.dumps(decisive(only1), sort_keys=True).encode()).hexdigest()[:16]
    assert only1.matches_train_hash(whole, 1) and only1.matches_train_hash(only1.train_hash(1), 1)
    assert not both.matches_train_hash(whole, 1)  # another section's whole hash is not this one's
    assert not only1.matches_train_hash(both.train_hash(2), 2)
