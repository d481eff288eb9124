"""polars over a run: SQL from the CLI, LazyFrames from Python; images only when asked for."""

import pytest

from dataengine.analysis.query import run_sql, scan
from dataengine.cli import main


def test_scan_gives_lazyframes_over_both_tables(synthweb_run):
    _, result, truth = synthweb_run
    frames = scan(result.run_dir)
    kept = frames["dataset"].select("uid", "width").collect()
    rejected = frames["rejected"].select("uid", "reject_reason").collect()
    assert kept.height + rejected.height == truth.height
    assert kept["width"].min() > 0


def test_sql_excludes_image_bytes_unless_selected(synthweb_run):
    _, result, _ = synthweb_run
    everything = run_sql(result.run_dir, "SELECT * FROM dataset")
    assert "image" not in everything.columns and "image_format" in everything.columns
    with_images = run_sql(result.run_dir, "SELECT uid, image FROM dataset LIMIT 2")
    assert with_images["image"][0][:2] == b"\xff\xd8"


def test_sql_group_by_reason_matches_the_manifest(synthweb_run):
    _, result, _ = synthweb_run
    frame = run_sql(result.run_dir, "SELECT reject_reason, COUNT(*) AS n FROM rejected GROUP BY reject_reason")
    assert dict(zip(frame["reject_reason"], frame["n"])) == result.stages[-1]["rejected_by_reason"]


def test_query_cli_prints_a_table(synthweb_run, capsys):
    _, result, _ = synthweb_run
    assert main(["query", str(result.run_dir), "SELECT COUNT(*) AS kept FROM dataset"]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and str(result.manifest["totals"]["kept"]) in out


def test_query_cli_bad_sql_and_missing_run(synthweb_run, tmp_path, capsys):
    _, result, _ = synthweb_run
    assert main(["query", str(result.run_dir), "SELECT nope FROM dataset"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["query", str(tmp_path / "none"), "SELECT 1"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_scan_of_an_empty_run_has_the_schema(tmp_path):
    (tmp_path / "dataset").mkdir()
    frames = scan(tmp_path)
    assert frames["rejected"].collect_schema().names()[-2:] == ["reject_stage", "reject_reason"]
    assert frames["dataset"].collect().height == 0
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "missing")
