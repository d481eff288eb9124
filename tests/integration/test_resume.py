"""`kill -9` a real run mid-flight, run the same command again: nothing lost, nothing twice, no redo."""

import json
import subprocess
import sys
import time

import polars as pl
import pytest

from dataengine.engine.runner import run_pipeline
from dataengine.engine.spec import load_spec
from dataengine.testbed.synthweb import write_url_list
from tests.conftest import download_stage, kill_session, write_spec


@pytest.mark.slow
def test_kill_minus_nine_then_rerun_resumes_exactly_once(ray_local, synthweb_dir, synthweb_server, tmp_path):
    urls = write_url_list(synthweb_dir, synthweb_server.base_url)
    run_dir = tmp_path / "run"
    # one CPU and one thread per task: slow enough to kill between shard commits
    spec_file = write_spec(tmp_path / "spec.yaml", {
        "name": "killed", "input": {"path": str(urls), "id_col": "id", "shard_rows": 10},
        "output": str(run_dir), "resources": {"num_cpus": 1},
        "stages": [download_stage(threads=1, batch_size=5, timeout=0.5, deadline=1.0)],
    })
    proc = subprocess.Popen([sys.executable, "-m", "dataengine.cli", "run", str(spec_file)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    committed = run_dir / "_state" / "committed"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if committed.is_dir() and len(list(committed.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    finally:
        kill_session(proc)  # the driver and the embedded Ray it started
    shards_total = 12
    before = {p.name: p.stat().st_mtime_ns for p in committed.glob("*.json")}
    assert 2 <= len(before) < shards_total
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    result = run_pipeline(load_spec(spec_file))

    attempt = result.manifest["attempts"][-1]
    assert len(result.manifest["attempts"]) == 2
    assert attempt["shards_processed"] + attempt["shards_recovered"] == shards_total - len(before)
    assert {p.name: p.stat().st_mtime_ns for p in committed.glob("*.json") if p.name in before} == before
    kept = pl.read_parquet(run_dir / "dataset" / "*.parquet")
    rejected = pl.read_parquet(run_dir / "rejected" / "*.parquet")
    uids = kept["uid"].to_list() + rejected["uid"].to_list()
    truth = pl.read_parquet(synthweb_dir / "truth.parquet")
    assert len(uids) == len(set(uids)) == truth.height
    assert sorted(kept["source_id"].to_list() + rejected["source_id"].to_list()) == sorted(truth["id"].to_list())


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["during the barrier decision", "after the barrier decision",
                                    "during the last segment's commits"])
def test_kill_past_a_barrier_then_rerun_accounts_every_row_once(ray_local, synthweb_dir, synthweb_server, tmp_path,
                                                                 moment):
    """download -> dedup (pHash, a barrier) -> caption rules, killed once the decision is saved (between the
    segments) or once the last segment has committed some shards; the rerun finishes with every row once."""
    urls = write_url_list(synthweb_dir, synthweb_server.base_url)
    run_dir = tmp_path / "run"
    spec_file = write_spec(tmp_path / "spec.yaml", {
        "name": "killed-past-barrier", "input": {"path": str(urls), "id_col": "id", "shard_rows": 10},
        "output": str(run_dir), "resources": {"num_cpus": 1},
        "stages": [download_stage(threads=1, batch_size=5, timeout=0.5, deadline=1.0),
                   # above exact_max_rows the decision runs across tasks (placements under decision-1.work/)
                   {"op": "dedup", "descriptor": "phash", "exact_max_rows": 2},
                   {"op": "caption_rules_filter", "batch_size": 5}],
    })
    proc = subprocess.Popen([sys.executable, "-m", "dataengine.cli", "run", str(spec_file)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    decision, committed = run_dir / "_state" / "decision-1.json", run_dir / "_state" / "committed"

    work = run_dir / "_state" / "decision-1.work"

    def reached() -> bool:
        if moment == "during the barrier decision":
            return work.is_dir()
        if moment == "after the barrier decision":
            return decision.exists()
        return committed.is_dir() and len(list(committed.glob("*.json"))) >= 2

    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None and not reached():
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    finally:
        kill_session(proc)
    assert decision.exists() == (moment != "during the barrier decision")
    saved = decision.read_text() if decision.exists() else None

    result = run_pipeline(load_spec(spec_file))

    assert result.manifest["status"] == "complete" and len(result.manifest["attempts"]) == 2
    assert json.loads(decision.read_text())["method"] == "partitioned" and not work.exists()
    if saved is not None:
        assert decision.read_text() == saved  # the rerun applied the decision the killed attempt made
    kept = pl.read_parquet(run_dir / "dataset" / "*.parquet")
    rejected = pl.read_parquet(run_dir / "rejected" / "*.parquet")
    uids = kept["uid"].to_list() + rejected["uid"].to_list()
    truth = pl.read_parquet(synthweb_dir / "truth.parquet")
    assert len(uids) == len(set(uids)) == truth.height == result.manifest["totals"]["in"]
    assert (rejected["reject_stage"] == "dedup").sum() == result.stages[2]["rejected"] > 0
