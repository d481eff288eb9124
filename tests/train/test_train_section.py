"""A spec's train: section runs after its data stages, and a stopped stage resumes at the right step with
the CLI (`dataengine train RUN --resume`); a trained stage refuses another train: section."""

from __future__ import annotations

import json
import shutil

import pytest

from dataengine.core.layout import stage_dir
from dataengine.train.trainer import TrainError, train_stage

pytestmark = pytest.mark.slow


def test_a_train_section_runs_after_the_data_stages_and_a_stopped_stage_resumes(ray_local, synthweb_dir, tiny_vlm_parts,
                                                                               tmp_path, monkeypatch):
    """download -> template synthesis -> train (stage 1) in one `run_pipeline`. Its training stops at
    step 2 (an injected failure, no retries); `dataengine train RUN --resume` (spec from run.json)
    continues from step 1's checkpoint and finishes (given the run as a relative path); the checkpoint's
    lineage names the run."""
    from dataengine import cli
    from dataengine.engine.runner import run_pipeline
    from dataengine.engine.spec import parse_spec
    from dataengine.testbed.synthweb import SynthWebServer, write_url_list
    from dataengine.train.trainer import FAIL_ENV
    from tests.conftest import download_stage

    urls, run = tmp_path / "urls.parquet", tmp_path / "run"
    with SynthWebServer(synthweb_dir) as server:
        shutil.copyfile(write_url_list(synthweb_dir, server.base_url), urls)
        spec = parse_spec({
            "name": "with-train", "input": {"path": str(urls), "boxes_col": "boxes"}, "output": str(run),
            "stages": [download_stage(image_size=64), {"op": "llava_synthesis_mapper", "backend": "template"}],
            "train": {"model": {"vision": str(tiny_vlm_parts["vision"]), "lm": str(tiny_vlm_parts["lm"])},
                      "stages": [1], "stage1": {"lr": 1e-3, "global_batch": 16, "micro_batch": 8, "max_steps": 3,
                                                "checkpoint_every": 1},
                      "eval": {"heldout_fraction": 0.1}, "max_failures": 0}})
        monkeypatch.setenv(FAIL_ENV, "2")
        with pytest.raises(TrainError, match="stage 1 failed"):
            run_pipeline(spec)
    monkeypatch.delenv(FAIL_ENV)
    steps = [json.loads(line)["step"] for line in (stage_dir(run, 1) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (stage_dir(run, 1) / "result.json").exists()

    monkeypatch.chdir(tmp_path)  # a relative run directory: the workers' working directory is not this one
    assert cli.main(["train", "run", "--stage", "1", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (stage_dir(run, 1) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3]  # resumed after step 1's checkpoint, not from the start
    trained = json.loads((stage_dir(run, 1) / "result.json").read_text())
    kept = json.loads((run / "run.json").read_text())["totals"]["kept"]
    assert trained["steps"] == 3 and trained["samples_trained"] == 3 * 16
    lineage = trained["lineage"]
    assert lineage["spec_hash"] == spec.spec_hash() and lineage["run_totals"]["kept"] == kept
    assert lineage["samples"]["train"] + lineage["samples"]["heldout"] == kept
    held = trained["eval"]["heldout"]
    assert held["samples"] == lineage["samples"]["heldout"] > 0 and held["perplexity"] > 1
    assert (stage_dir(run, 1) / "final" / "config.json").is_file()
    # a train: section does not change the data's hash, but a trained stage refuses another train: section
    edited = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 5})})
    assert edited.spec_hash() == spec.spec_hash()
    assert train_stage(run, spec.train, 1)["steps"] == 3  # done: returned as it is
    before = (stage_dir(run, 1) / "metrics.jsonl").read_text()
    assert train_stage(run, spec.train, 1, resume=True) == trained  # --resume on a finished stage: nothing to do
    assert (stage_dir(run, 1) / "metrics.jsonl").read_text() == before
    assert "<h3>stage1" in (run / "report.html").read_text()  # `dataengine train` rewrote the report with it
    with pytest.raises(TrainError, match="trained with another train: section"):
        train_stage(run, edited.train, 1)
    # stage 2's settings, and which stages run, decide nothing of stage 1: it is still done
    more = spec.train.model_copy(update={"stages": [1, 2], "stage2": spec.train.stage2.model_copy(update={"lr": 1e-3})})
    assert train_stage(run, more, 1) == trained
