"""`kill -9` a real run mid-flight, run the same command again: nothing lost, nothing twice, no redo."""

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from dataengine.engine.runner import run_pipeline
from dataengine.engine.spec import load_spec
from dataengine.testbed.synthweb import write_url_list
from tests.conftest import download_stage, write_spec


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
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        proc.wait()
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
