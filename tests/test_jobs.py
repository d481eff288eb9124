"""`dataengine submit/jobs/status/logs/stop` against a real Ray head with its Jobs API (not a mock)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from dataengine import cli, jobs
from dataengine.synthweb import SynthWebServer, write_url_list
from tests.conftest import download_stage, run_outcome, write_spec

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with its dashboard (the Jobs API), as `ray start --head` starts one."""
    port = _free_port()
    # job entrypoints run `python` from the head's PATH: this venv's, as a cluster image's would be
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        # the session's own Ray already holds the default agent port (52365)
        "dashboard_agent_listen_port": _free_port()})
    os.environ["PATH"] = path
    yield f"http://127.0.0.1:{port}"
    cluster.shutdown()


def test_submitted_spec_gives_the_local_runs_outputs(head, synthweb_dir, synthweb_run, tiny_vlm_parts, tmp_path,
                                                    monkeypatch, capsys):
    """The job's data outputs equal the local run's, and its train: section trains on the cluster (one step)."""
    _, local_result, _ = synthweb_run
    monkeypatch.chdir(tmp_path)  # relative input/output paths are resolved here, before submitting
    train = {"model": {"vision": str(tiny_vlm_parts["vision"]), "lm": str(tiny_vlm_parts["lm"])}, "stages": [1],
             "stage1": {"global_batch": 8, "micro_batch": 8, "max_steps": 1, "max_length": 512},
             "eval": {"heldout_fraction": 0.0}}
    with SynthWebServer(synthweb_dir) as server:
        (tmp_path / "urls.parquet").write_bytes(write_url_list(synthweb_dir, server.base_url).read_bytes())
        spec = write_spec(tmp_path / "spec.yaml", {
            "name": "t", "input": {"path": "urls.parquet", "id_col": "id", "shard_rows": 40},
            "output": "run", "stages": [download_stage()], "train": train})
        assert cli.main(["submit", str(spec), "--address", head, "--job-id", "dataengine-test-1", "--wait",
                         "--timeout", "300"]) == 0, jobs.logs(head, "dataengine-test-1")[-3000:]
    assert jobs.status(head, "dataengine-test-1") == "SUCCEEDED"
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["totals"] == local_result.manifest["totals"]
    assert run_outcome(tmp_path / "run") == run_outcome(local_result.run_dir)
    trained = json.loads((tmp_path / "run" / "train" / "stage1" / "result.json").read_text())
    assert trained["steps"] == 1 and trained["lineage"]["run_totals"] == manifest["totals"]
    assert (tmp_path / "run" / "train" / "stage1" / "final" / "config.json").is_file()
    report = (tmp_path / "run" / "report.html").read_text()  # the job wrote the run's report beside it
    assert f"<b>{manifest['totals']['kept']:,}</b>kept" in report and "<h3>stage1" in report
    capsys.readouterr()
    assert cli.main(["jobs", "--address", head]) == 0
    listed = capsys.readouterr().out
    assert "dataengine-test-1" in listed and "SUCCEEDED" in listed
    assert cli.main(["logs", "dataengine-test-1", "--address", head]) == 0
    assert "committed shard" in capsys.readouterr().out


def test_stop_a_running_job_and_errors_name_the_address(head, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    client = jobs.client(head)
    job = client.submit_job(entrypoint="python -c 'import time; time.sleep(120)'", submission_id="dataengine-sleeper")
    deadline = time.monotonic() + 30
    while jobs.status(head, job) != "RUNNING" and time.monotonic() < deadline:  # stop it while it runs
        time.sleep(0.2)
    assert jobs.status(head, job) == "RUNNING"
    assert cli.main(["stop", job, "--address", head]) == 0
    assert jobs.wait(head, job, timeout=60) == "STOPPED"
    assert cli.main(["status", job, "--address", head]) == 0 and "STOPPED" in capsys.readouterr().out
    bad = f"http://127.0.0.1:{_free_port()}"
    assert cli.main(["jobs", "--address", bad]) == cli.EXIT_FAILED
    assert bad in capsys.readouterr().err
