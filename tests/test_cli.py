"""CLI commands not covered elsewhere: synthweb, schema, train's input errors."""

import json

import polars as pl

from dataengine.cli import main


def test_synthweb_command_builds_the_truth(tmp_path, capsys):
    assert main(["synthweb", "--n", "12", "--seed", "3", "--out", str(tmp_path / "web")]) == 0
    truth = pl.read_parquet(tmp_path / "web" / "truth.parquet")
    assert truth.height == 12 and truth["id"].n_unique() == 12
    assert "built 12 items" in capsys.readouterr().out


def test_schema_check_passes_on_a_clean_checkout(capsys):
    assert main(["schema", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_train_names_a_missing_run_or_train_section_without_a_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere")]) == 2
    assert "no run.json (not a run directory?)" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    spec = {"name": "t", "input": {"path": "urls.parquet"}, "stages": [{"op": "caption_rules_filter"}], "output": str(run)}
    (run / "run.json").write_text(json.dumps({"spec": spec}))
    assert main(["train", str(run)]) == 2
    err = capsys.readouterr().err
    assert "run.json: invalid pipeline spec" in err and "the spec has no train: section" in err
