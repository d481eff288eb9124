"""`dataengine mix`: shares by weight or by the square root of size, per-source caps, repeats when a
source is sampled above its size, a content-addressed manifest that refuses changed sources, and the
trainer reading it (`train: data:`) with the mixture in every checkpoint's lineage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import yaml

from dataengine import cli
from dataengine.testbed.synthweb.train_rows import make_train_rows, write_train_run
from dataengine.train.data import Split, plan_splits, read_split
from dataengine.train.mixture import (
    MixtureError,
    MixtureSpec,
    allocate,
    build_mixture,
    load_mixture,
    mixture_data,
    shares,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix-runs")
    return {"big": write_train_run(root / "big", make_train_rows(40, seed=1)),
            "small": write_train_run(root / "small", make_train_rows(10, seed=2))}


def _spec(runs: dict[str, Path], **settings) -> MixtureSpec:
    sources = settings.pop("sources", [{"run": str(runs["big"])}, {"run": str(runs["small"])}])
    return MixtureSpec.model_validate({"name": "m", "sources": sources, **settings})


def _rows(out: Path) -> pl.DataFrame:
    manifest = yaml.safe_load((out / "mixture.yaml").read_text())
    return pl.read_parquet(out / manifest["rows_file"])


def test_shares_follow_the_weights_or_the_square_root_of_size():
    assert shares([40, 10], [3.0, 1.0], "weights") == [0.75, 0.25]
    assert shares([40, 10], [3.0, 1.0], "sqrt") == pytest.approx([2 / 3, 1 / 3])  # sqrt(40) = 2 sqrt(10)
    assert allocate(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3] and sum(allocate(7, [0.5, 0.25, 0.25])) == 7


def test_weights_cap_and_repeat_rows_deterministically(runs, tmp_path):
    manifest = build_mixture(_spec(runs, sources=[{"run": str(runs["big"]), "weight": 3},
                                                  {"run": str(runs["small"]), "weight": 1}], size=40), tmp_path / "a")
    assert [s["rows"] for s in manifest["sources"]] == [30, 10]
    rows = _rows(tmp_path / "a")
    assert rows.filter(pl.col("source") == 0).height == 30 and rows["repeats"].max() == 1
    again = build_mixture(_spec(runs, sources=[{"run": str(runs["big"]), "weight": 3},
                                               {"run": str(runs["small"]), "weight": 1}], size=40), tmp_path / "b")
    assert again["id"] == manifest["id"] and _rows(tmp_path / "b").equals(rows)
    # sqrt: 2:1 of 60 rows -> the small run's 10 rows twice each; a cap on the big run first
    sqrt = build_mixture(_spec(runs, sampling="sqrt", size=60), tmp_path / "sqrt")
    assert [s["rows"] for s in sqrt["sources"]] == [40, 20] and sqrt["id"] != manifest["id"]
    small = _rows(tmp_path / "sqrt").filter(pl.col("source") == 1)
    assert small.height == 10 and set(small["repeats"]) == {2}
    capped = build_mixture(_spec(runs, sources=[{"run": str(runs["big"]), "max_rows": 20},
                                                {"run": str(runs["small"])}], sampling="sqrt"), tmp_path / "cap")
    assert [s["available"] for s in capped["sources"]] == [20, 10] and capped["size"] == 30
    assert [s["rows"] for s in capped["sources"]] == allocate(30, shares([20, 10], [1, 1], "sqrt"))
    assert abs(capped["sources"][0]["share"] - math.sqrt(20) / (math.sqrt(20) + math.sqrt(10))) < 1e-6


def test_a_mixture_refuses_a_source_that_changed_and_names_it(runs, tmp_path):
    copy = write_train_run(tmp_path / "copy", make_train_rows(10, seed=2))
    build_mixture(_spec(runs, sources=[{"run": str(runs["big"])}, {"run": str(copy), "name": "copy"}]), tmp_path / "m")
    assert load_mixture(tmp_path / "m").id == load_mixture(tmp_path / "m" / "mixture.yaml").id
    write_train_run(copy, make_train_rows(12, seed=2))  # the run was redone: other rows
    with pytest.raises(MixtureError, match="source copy .* changed since the mixture was built"):
        load_mixture(tmp_path / "m")
    with pytest.raises(MixtureError, match="no mixture manifest"):
        load_mixture(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="names must differ"):
        _spec(runs, sources=[{"run": str(runs["big"])}, {"run": str(runs["big"])}])


def test_the_command_prints_the_shares_and_writes_the_manifest(runs, tmp_path, capsys):
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({"name": "demo-mix", "sampling": "sqrt", "size": 60,
                                    "sources": [{"run": str(runs["big"])}, {"run": str(runs["small"])}]}))
    assert cli.main(["mix", str(spec), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "demo-mix: 60 rows (sqrt)" in printed and "20 rows (33.3%) of 10 available, repeated" in printed
    assert (tmp_path / "out" / "mixture.yaml").is_file()
    spec.write_text(yaml.safe_dump({"sources": [{"run": str(tmp_path / "no-run")}]}))
    assert cli.main(["mix", str(spec), "--out", str(tmp_path / "bad")]) == cli.EXIT_BAD_INPUT
    assert "source no-run" in capsys.readouterr().err


def test_the_trainer_reads_the_mixtures_rows_with_their_repeats(ray_local, runs, tmp_path):
    build_mixture(_spec(runs, sampling="sqrt", size=60), tmp_path / "m")
    data = mixture_data(load_mixture(tmp_path / "m"))
    train, heldout, counts = plan_splits(data, 2, 0.0)
    assert counts["train"] == 60 and counts["heldout"] == 0
    rows = read_split(data, train).to_pandas()
    assert len(rows) == 60 and rows["uid"].nunique() == 50
    assert rows["uid"].str.startswith("small/").sum() == 20 and rows["uid"].str.startswith("big/").sum() == 40
    heldout_rows = read_split(data, Split("heldout", 1.0)).to_pandas()  # held out: each row once, never repeated
    assert len(heldout_rows) == 50


@pytest.mark.slow
def test_training_on_a_mixture_records_it_in_the_checkpoints_lineage(ray_local, runs, tiny_vlm_parts, tmp_path):
    from dataengine.core.layout import stage_dir
    from dataengine.train.config import TrainSpec
    from dataengine.train.trainer import TrainError, train_stage

    own = {"big": runs["big"], "small": write_train_run(tmp_path / "small", make_train_rows(10, seed=2))}
    manifest = build_mixture(_spec(own, sampling="sqrt", size=48), tmp_path / "m")
    spec = TrainSpec.model_validate({
        "model": {"vision": str(tiny_vlm_parts["vision"]), "lm": str(tiny_vlm_parts["lm"])}, "stages": [2],
        "data": str(tmp_path / "m" / "mixture.yaml"), "eval": {"heldout_fraction": 0.0}, "max_failures": 0,
        "stage2": {"lr": 1e-3, "global_batch": 16, "micro_batch": 8, "max_steps": 2, "max_length": 512}})
    run = write_train_run(tmp_path / "owner", make_train_rows(4, seed=9))  # where the outputs go
    result = train_stage(run, spec, 2)
    lineage = result["lineage"]
    assert lineage["samples"]["train"] == 48 and lineage["data_version"] == manifest["id"]
    assert lineage["mixture"]["id"] == manifest["id"]
    assert [s["data_version"] for s in lineage["mixture"]["sources"]] == [s["data_version"] for s in manifest["sources"]]
    saved = json.loads((stage_dir(run, 2) / "final" / "dataengine_lineage.json").read_text())
    assert saved["mixture"]["id"] == manifest["id"]
    write_train_run(own["small"], make_train_rows(10, seed=3))  # a source changes under the mixture
    with pytest.raises(TrainError, match="train: data: .*source small .*changed"):
        train_stage(write_train_run(tmp_path / "owner2", make_train_rows(4, seed=9)), spec, 2)
