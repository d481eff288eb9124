"""`dataengine submit/jobs/status/logs/stop` against a real Ray head with its Jobs API (not a mock)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dataengine import cli
from dataengine.engine import jobs
from dataengine.testbed.synthweb import SynthWebServer, write_url_list
from tests.conftest import REPO, download_stage, run_outcome, write_spec

# Lines the test session's own Ray forwards to this process's stderr (a raylet's disk warning, a worker's log):
# "(raylet) ...", "(pid=123) ...", possibly coloured. They are not the CLI's output.
RAY_FORWARDED_LOG = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|([\w.]+ )?pid=\d+)[^)]*\)")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports, and its dashboard address once its Jobs API answers; a
    head that exits (another process took a port between our check and Ray's bind) is retried on new
    ports, twice."""
    for _ in range(3):
        ports = {flag: _free_port() for flag in ("--port", "--dashboard-port", "--dashboard-agent-listen-port",
                                                 "--dashboard-agent-grpc-port", "--metrics-export-port",
                                                 "--runtime-env-agent-port", "--node-manager-port",
                                                 "--object-manager-port", "--ray-client-server-port")}
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                   "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", str(root),
                   "--disable-usage-stats", *(str(x) for item in ports.items() for x in item)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            try:
                jobs.client(address)
                return process, address
            except jobs.JobError:
                time.sleep(0.5)
        _stop_head(process)
    raise AssertionError("ray start --head did not come up in three attempts")


def _stop_head(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # the head and every process it started share its group
    try:
        process.wait(timeout=3)  # on SIGTERM a head drains for up to 30 s before it stops: not worth waiting
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started the way Ray's docs say, `ray start --head`, as a process of its own: its own ports
    and temp dir, token authentication on (its token in a file named by RAY_AUTH_TOKEN_PATH), this venv
    first on its PATH (a job's `python` is the head's). Stopped, with everything it started, at the end."""
    root = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", jobs.TOKEN_PATH_ENV: str(token_file),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop(jobs.TOKEN_ENV, None)
    os.environ[jobs.TOKEN_PATH_ENV] = str(token_file)  # this process: a client finds the token as Ray's do
    process = None
    try:
        process, address = _start_head(root, env)
        yield {"address": address, "token_file": token_file}
    finally:
        os.environ.pop(jobs.TOKEN_PATH_ENV, None)
        if process is not None:
            _stop_head(process)
        shutil.rmtree(root, ignore_errors=True)


def test_submitted_spec_gives_the_local_runs_outputs(head, synthweb_dir, synthweb_run, tiny_vlm_parts, tmp_path,
                                                    monkeypatch, capsys):
    """The job's data outputs equal the local run's, and its train: section trains on the cluster (one step)."""
    _, local_result, _ = synthweb_run
    head = head["address"]
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
    log = capsys.readouterr().out  # the job's console: our stage lines, none of Ray's operator reports
    assert f"download: {manifest['stages'][1]['in']} in" in log and "logging_progress" not in log
    assert "committed shard" in (tmp_path / "run" / "dataengine.log").read_text()  # the rest: the run's log


def test_stop_a_running_job_and_errors_name_the_address(head, tmp_path, monkeypatch, capsys):
    head = head["address"]
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


def test_without_the_token_a_client_says_where_ray_looks_and_a_wrong_one_is_named(head, tmp_path):
    """In a fresh shell (subprocesses: this test process's own Ray has token state of its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}

    def jobs_command(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dataengine.cli", "jobs", "--address", head["address"]],
                              env=env | extra, capture_output=True, text=True, timeout=120)

    missing = jobs_command()  # no RAY_AUTH_TOKEN, no RAY_AUTH_TOKEN_PATH, no ~/.ray/auth_token
    assert missing.returncode == cli.EXIT_FAILED
    assert missing.stderr.startswith(f"error: {head['address']} requires Ray's authentication token"), missing.stderr
    assert all(where in missing.stderr for where in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ray get-auth-token",
                                                     str(tmp_path / ".ray" / "auth_token")))
    assert "Traceback" not in missing.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(head["token_file"].read_text())  # where Ray's clients look
    assert jobs_command().returncode == 0
    wrong = jobs_command(RAY_AUTH_TOKEN="not-the-token")  # the variable comes first, and is named when refused
    assert wrong.returncode == cli.EXIT_FAILED and "refused the authentication token from $RAY_AUTH_TOKEN" in wrong.stderr


def test_a_cluster_python_without_our_dependencies_ends_the_job_with_one_line(head, tmp_path, monkeypatch, capsys):
    """The job's interpreter lacks pyarrow and the rest (here: the base Python with no site-packages,
    as a head started outside the project's environment has): one line names what and how to fix it."""
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys._base_executable} -S \"$@\"\n")
    bare.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", {"name": "bare", "input": {"path": "urls.parquet"}, "output": "run",
                                               "stages": [download_stage()]})
    assert cli.main(["submit", str(spec), "--address", head["address"], "--python", str(bare), "--wait",
                     "--timeout", "120"]) == cli.EXIT_FAILED
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not RAY_FORWARDED_LOG.match(line)]
    assert len(err) == 1 and err[0].startswith("error: the cluster's Python"), err
    assert "lacks dataengine's dependencies (ray, pyarrow" in err[0] and "--python" in err[0]
    job = [j for j in jobs.list_jobs(head["address"]) if j["metadata"].get("dataengine_spec") == "bare"][0]
    assert "Traceback" not in jobs.logs(head["address"], job["id"])


def test_the_job_entry_checks_every_runtime_dependency_of_the_package():
    """job_entry.REQUIRED_MODULES is pyproject's dependency list, as import names."""
    import re
    from importlib.metadata import packages_distributions

    import tomllib

    from dataengine.job_entry import REQUIRED_MODULES

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    provided = {dist.lower().replace("_", "-") for name in REQUIRED_MODULES for dist in packages_distributions()[name]}
    assert wanted <= provided, wanted - provided
