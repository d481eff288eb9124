"""The trainer on Ray Train: loss goes down; 2 workers = 1 worker even through a worker process
killed mid-training (restart from the last checkpoint); stage 2 under more seeds. (A spec's train: section
and the CLI's --resume: test_train_section.py, a file of its own so the two test workers share the load.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dataengine.core.layout import stage_dir
from dataengine.train.config import TrainSpec
from dataengine.train.trainer import TrainError, train_stage

pytestmark = pytest.mark.slow


def _spec(parts: dict[str, Path], **overrides) -> TrainSpec:
    """Stage 2 only; one optimizer step per epoch (the global batch is all 32 rows), 3 epochs."""
    data = {"model": {"vision": str(parts["vision"]), "lm": str(parts["lm"])}, "stages": [2],
            "stage2": {"lr": 3e-3, "global_batch": 32, "micro_batch": 8, "epochs": 3, "max_length": 512,
                       "checkpoint_every": overrides.pop("checkpoint_every", 1)},
            "eval": {"heldout_fraction": 0.0}, "max_failures": 0}
    data.update(overrides)
    return TrainSpec.model_validate(data)


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir(run, 2) / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(stage_dir(run, 2) / "final")).state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(ray_local, tiny_vlm_parts, tiny_train_run, tmp_path_factory):
    """One uninterrupted single-worker run that the other tests compare against."""
    run = _dataset_only(tiny_train_run, tmp_path_factory.mktemp("ref") / "run")
    result = train_stage(run, _spec(tiny_vlm_parts, checkpoint_every=100), 2)  # checkpoints do not change weights
    return run, result


def test_training_runs_and_loss_goes_down(reference, tiny_vlm_parts):
    run, result = reference
    steps = _steps(run)
    assert [s["step"] for s in steps] == [1, 2, 3]
    losses = [s["loss"] for s in steps]
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.1, losses
    assert result["steps"] == 3 and result["samples_trained"] == 3 * 32
    assert result["skipped"] == {"bad_image": 0, "no_sample": 0, "too_long": 0}
    lineage = result["lineage"]
    assert lineage["spec_hash"] == "feedc0de" and lineage["samples"]["train"] == 32 and lineage["stage"] == 2
    assert len(lineage["data_version"]) == 16
    assert lineage["train_hash"] == _spec(tiny_vlm_parts).train_hash(2)
    final = stage_dir(run, 2) / "final"
    assert json.loads((final / "dataengine_lineage.json").read_text())["step"] == 3


def _dataset_only(run: Path, dest: Path) -> Path:
    """A copy of a run without its training outputs."""
    dest.mkdir(parents=True)
    shutil.copytree(run / "dataset", dest / "dataset")
    shutil.copy(run / "run.json", dest / "run.json")
    return dest


def test_two_workers_with_a_failure_give_the_result_of_one(reference, tiny_vlm_parts, tmp_path):
    """2 DDP workers (gloo) reach the weights of 1 worker, even though rank 1's process is killed after
    step 2 (before that step's checkpoint) and Ray Train restarts the group from step 1's checkpoint.

    The kill comes a fraction of a second after step 1's checkpoint, before Ray's controller has
    registered it: the restart finds it on disk (`dataengine.train.checkpoints`)."""
    run_one, _ = reference
    run_two = _dataset_only(run_one, tmp_path / "two")
    result = train_stage(run_two, _spec(tiny_vlm_parts, workers=2, max_failures=1), 2, fail_at_step=2, fail_rank=1)
    killed_pid = int((stage_dir(run_two, 2) / "failed-at-2").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)  # the worker process really died
    assert [s["step"] for s in _steps(run_two)] == [1, 2, 2, 3]
    assert result["steps"] == 3 and result["samples_trained"] == 3 * 32
    assert _max_diff(_weights(run_one), _weights(run_two)) < 1e-4
    losses_one = [s["loss"] for s in _steps(run_one)]
    losses_two = [s["loss"] for s in _steps(run_two)]
    assert [losses_two[i] for i in (0, 2, 3)] == pytest.approx(losses_one, rel=1e-4)


def test_stage2_under_more_seeds_from_a_given_stage1_model(reference, tiny_vlm_parts, tmp_path, monkeypatch):
    """`stage2_seeds` trains stage 2 once more per seed (one Ray Train run, the seeds one after another),
    here beside another run's stage 2, from `stage2_init` (the reference's model: no stage 1 in these
    runs); rows come in another order per seed, so the runs differ, the same seed gives the same weights,
    and each lineage names its seed. Every seed's worker is killed once after step 2: the restarted
    worker skips the seed that finished and resumes the other from its own checkpoint. A stage2_init
    that is no model is refused by name."""
    from dataengine.eval.train_then_eval import stage2_runs, train_stage2_together
    from dataengine.train.trainer import FAIL_ENV

    ref_run, _ = reference
    run, other = _dataset_only(ref_run, tmp_path / "seeds"), _dataset_only(ref_run, tmp_path / "other")
    start = stage_dir(ref_run, 2) / "final"
    stage2 = {"lr": 3e-3, "global_batch": 8, "micro_batch": 8, "epochs": 1, "max_length": 512, "checkpoint_every": 1}
    spec = _spec(tiny_vlm_parts, stage2_init=str(start), stage2_seeds=[7], stage2=stage2, max_failures=2)
    monkeypatch.setenv(FAIL_ENV, "2")
    results, other_results = train_stage2_together([(run, spec), (other, _spec(tiny_vlm_parts, stage2_init=str(start),
                                                                                stage2=stage2, seed=7, max_failures=1))])
    assert list(results) == ["stage2", "stage2-seed7"] and len(stage2_runs(results)) == 2
    assert list(other_results) == ["stage2"] and other_results["stage2"]["lineage"]["seed"] == 7
    assert [r["lineage"]["seed"] for r in stage2_runs(results)] == [0, 7]
    assert [r["steps"] for r in stage2_runs(results)] == [4, 4]
    for seed in (None, 7):  # killed after step 2, resumed from step 1's checkpoint; seed 0 not trained again
        assert (stage_dir(run, 2, seed) / "failed-at-2").is_file()
        steps = [json.loads(line)["step"] for line in (stage_dir(run, 2, seed) / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 2, 3, 4]
        assert len(list((stage_dir(run, 2, seed) / "checkpoints").glob("**/checkpoint_*"))) == 2  # pruned to 2
    assert (stage_dir(run, 2, seed=7) / "final" / "config.json").is_file() and not (stage_dir(run, 1)).exists()
    losses = {seed: [json.loads(line)["loss"] for line in (stage_dir(run, 2, seed) / "metrics.jsonl").read_text().splitlines()]
              for seed in (None, 7)}
    assert losses[None] != losses[7]  # same rows, another order
    from transformers import LlavaForConditionalGeneration

    weights = [LlavaForConditionalGeneration.from_pretrained(str(stage_dir(run, 2, s) / "final")).state_dict() for s in (None, 7)]
    assert _max_diff(*weights) > 1e-6
    # the same seed on the same rows from the same start: the same order and weights, whichever run it is
    seven = LlavaForConditionalGeneration.from_pretrained(str(stage_dir(other, 2) / "final")).state_dict()
    assert _max_diff(weights[1], seven) < 1e-5
    bad = _spec(tiny_vlm_parts, stage2_init=str(tmp_path))
    with pytest.raises(TrainError, match="train.stage2_init: .* is not a saved model"):
        train_stage(_dataset_only(ref_run, tmp_path / "bad"), bad, 2)
