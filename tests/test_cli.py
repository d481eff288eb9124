"""CLI commands not covered elsewhere: synthweb, schema."""

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
