"""The demo's unfiltered baseline: the same input through the downloader and the instruction writer only."""

from pathlib import Path

import polars as pl

from dataengine.core.layout import FINAL_DIR, stage_dir
from dataengine.engine.spec import load_spec
from dataengine.testbed.data_comparison import UNFILTERED_INPUT, UNFILTERED_STAGES, downloadable_input, unfiltered_spec
from tests.conftest import REPO


def test_the_baseline_keeps_only_the_unfiltered_stages_and_trains_stage_2_on_as_many_rows(tmp_path):
    spec = load_spec(REPO / "pipelines" / "demo.yaml")
    run_dir = tmp_path / "runs" / "demo"
    baseline = unfiltered_spec(spec, run_dir, 627)
    assert [s.op for s in baseline.stages] == [s.op for s in spec.stages if s.op in UNFILTERED_STAGES]
    assert [s.op for s in baseline.stages] == ["download", "llava_synthesis_mapper"]
    assert Path(baseline.output) == tmp_path / "runs" / "demo-unfiltered"
    assert baseline.train.max_samples == 627 and baseline.train.stages == [2]
    assert baseline.train.stage2_init == str(stage_dir(run_dir, 1) / FINAL_DIR)
    assert baseline.train.stage2 == spec.train.stage2 and baseline.train.stage2_seeds == spec.train.stage2_seeds


def test_the_baselines_data_part_is_the_run_its_trained_spec_finds(tmp_path):
    """The demo makes the baseline's data without a `train:` section, then trains its stage 2 in the same
    directory: the data part must be the very run the trained spec later finds there."""
    spec = load_spec(REPO / "pipelines" / "demo.yaml")
    run_dir = tmp_path / "runs" / "demo"
    trained = unfiltered_spec(spec, run_dir, 627)
    data_only = trained.model_copy(update={"train": None})  # what the demo runs first
    assert data_only.train is None and trained.train is not None
    assert data_only.spec_hash() == trained.spec_hash()


def test_the_baseline_reads_only_the_urls_the_curated_run_downloaded(tmp_path):
    """A URL the curated run's download stage rejected gives the baseline no row either: its input leaves
    those out (rows rejected later, by a filter, stay: the baseline has no filters)."""
    spec = load_spec(REPO / "pipelines" / "demo.yaml")
    urls = tmp_path / "urls.parquet"
    pl.DataFrame({"url": [f"http://web/{i}" for i in range(5)], "caption": list("abcde"), "id": list(range(5))}) \
        .write_parquet(urls)
    spec = spec.model_copy(update={"input": spec.input.model_copy(update={"path": str(urls)})})
    run_dir = tmp_path / "runs" / "demo"
    (run_dir / "rejected").mkdir(parents=True)
    pl.DataFrame({"url": ["http://web/1", "http://web/3", "http://web/4"],
                  "reject_stage": ["download", "clip_score_filter", "download"]}) \
        .write_parquet(run_dir / "rejected" / "part-000000-s0.parquet")  # a run's file name: `analysis.query.scan` reads those
    path = downloadable_input(spec, run_dir)
    assert path == run_dir / UNFILTERED_INPUT
    assert pl.read_parquet(path).to_dict(as_series=False) == {"url": ["http://web/0", "http://web/2", "http://web/3"],
                                                              "caption": ["a", "c", "d"], "id": [0, 2, 3]}
    baseline = unfiltered_spec(spec, run_dir, 2, path)
    assert baseline.input.path == str(path) and baseline.input.url_col == spec.input.url_col
    assert unfiltered_spec(spec, run_dir, 2).input == spec.input
    csv = spec.model_copy(update={"input": spec.input.model_copy(update={"path": str(tmp_path / "urls.csv")})})
    assert downloadable_input(csv, run_dir) is None  # not one Parquet file: the whole input, as before
