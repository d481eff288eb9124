"""Pipeline (and training) jobs on a Ray cluster, through the Ray Jobs API.

`submit` validates the spec here, makes its input and output paths absolute (a job runs in a copy of
its working directory, where relative paths would point somewhere else) against this machine's cwd,
or against `cluster_dir` when the cluster's filesystem is not this one's (KubeRay: the image's
working directory, with the runs volume under it), and submits
`python -m dataengine.job_entry run spec.yaml` with a runtime env that carries the spec (working_dir)
and this checkout's `dataengine` package (py_modules), so the cluster runs the code you have. The run
directory must be on storage the cluster's nodes reach, as for `dataengine run --address`.

Heads started with `ray start --head` (Ray 2.60) authenticate clients with a token once one exists;
every request here carries it, found where Ray's own clients look (`auth_token`).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import shlex
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

import dataengine
from dataengine.core.raytools import QUIET_WORKERS
from dataengine.core.schemas import SCHEMA_DIR
from dataengine.engine.spec import load_spec
from dataengine.llm.prompts import default_prompts_dir

SPEC_NAME = "spec.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0


class JobError(RuntimeError):
    """The Jobs API refused or could not be reached; the message says which address and why."""


TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from), looked up as Ray's clients do: `RAY_AUTH_TOKEN`, the file that
    `RAY_AUTH_TOKEN_PATH` names, `~/.ray/auth_token`; (None, "") when there is none."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    for path, where in ((os.environ.get(TOKEN_PATH_ENV), f"${TOKEN_PATH_ENV}"), (str(default_token_path()), None)):
        if path and Path(path).expanduser().is_file():
            token = Path(path).expanduser().read_text().strip()
            if token:
                return token, f"{path} ({where})" if where else path
    return None, ""


def _auth_problem(address: str, error: Exception, where: str) -> str:
    if where and ("invalid" in str(error).lower() or "Forbidden" in str(error)):
        return (f"{address} refused the authentication token from {where}: it is not this head's token. On the head, "
                f"`ray get-auth-token` prints the right one; set {TOKEN_ENV} to it (or {TOKEN_PATH_ENV} to a file "
                "holding it)")
    return (f"{address} requires Ray's authentication token (the head runs with token authentication) and none is "
            f"set here: dataengine looks where Ray's clients do, {TOKEN_ENV}, the file {TOKEN_PATH_ENV} names, then "
            f"{default_token_path()}. On the head, `ray get-auth-token` prints the token: export {TOKEN_ENV}=<token>, "
            f"or copy the head's ~/.ray/auth_token to {default_token_path()}")


def client(address: str) -> Any:
    """A Jobs API client for `address` that sends the authentication token when one is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token, where = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise JobError(_auth_problem(address, e, where)) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobError(f"cannot reach the Ray Jobs API at {address} (the head's dashboard, port 8265): {e}") from e


def _absolute(path: str, base: str) -> str:
    return path if PurePosixPath(path).is_absolute() else posixpath.normpath(posixpath.join(base, path))


def job_spec(spec_path: str | Path, cluster_dir: str | None = None) -> dict[str, Any]:
    """The spec as submitted: validated, with input and output made absolute against `cluster_dir`
    (a path on the cluster's nodes) or, by default, the caller's cwd (a cluster sharing this filesystem)."""
    spec = load_spec(spec_path)
    if cluster_dir is not None and not PurePosixPath(cluster_dir).is_absolute():
        raise ValueError(f"--cluster-dir must be an absolute path on the cluster's nodes, got {cluster_dir!r}")
    base = cluster_dir or str(Path.cwd())
    data = spec.model_dump(mode="json", exclude_none=True)
    data["input"]["path"] = _absolute(spec.input.path, base)
    data["output"] = _absolute(spec.output, base)
    return data


def submit(spec_path: str | Path, address: str, job_id: str | None = None, cluster_dir: str | None = None,
           python: str = "python") -> str:
    """Submit a spec as a job; returns the job's submission id. `python` is the interpreter on the
    cluster that runs it (default: the `python` on the head's PATH)."""
    data = job_spec(spec_path, cluster_dir)
    staging = Path(tempfile.mkdtemp(prefix="dataengine-job-"))
    try:
        (staging / SPEC_NAME).write_text(yaml.safe_dump(data, sort_keys=False))
        # the data files the package reads beside itself in a checkout (found in the job's cwd there)
        shutil.copytree(SCHEMA_DIR, staging / "schemas")
        shutil.copytree(default_prompts_dir(), staging / "pipelines" / "prompts")
        package = str(Path(dataengine.__file__).resolve().parent)
        runtime_env = {"working_dir": str(staging), "py_modules": [package], **QUIET_WORKERS}
        jobs_api = client(address)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs_api.submit_job(
                    entrypoint=f"{shlex.quote(python)} -m dataengine.job_entry run {SPEC_NAME} --address auto",
                    runtime_env=runtime_env,
                    submission_id=job_id, metadata={"dataengine_spec": data["name"], "output": data["output"]})
            except RuntimeError as e:
                # a head that has just started answers 500 until its job agent is up
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise JobError(f"{address}: the job was refused: {e}") from e
                time.sleep(1.0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # uploaded by submit_job


def list_jobs(address: str) -> list[dict[str, Any]]:
    return [{"id": j.submission_id, "status": str(j.status.value if hasattr(j.status, "value") else j.status),
             "entrypoint": j.entrypoint, "start_time": j.start_time, "end_time": j.end_time,
             "metadata": j.metadata or {}} for j in client(address).list_jobs() if j.submission_id]


def status(address: str, job_id: str) -> str:
    value = client(address).get_job_status(job_id)
    return str(getattr(value, "value", value))


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def follow_logs(address: str, job_id: str, write: Any) -> None:
    """Stream a job's log lines to `write` until the job ends."""
    async def tail() -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def stop(address: str, job_id: str) -> bool:
    return bool(client(address).stop_job(job_id))


def failure_line(address: str, job_id: str) -> str | None:
    """The last `error:` line a failed job's log ends with (dataengine's own one-line diagnosis), if any."""
    lines = [line for line in logs(address, job_id).splitlines() if line.startswith("error: ")]
    return lines[-1] if lines else None


def wait(address: str, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> str:
    """Block until the job ends (or `timeout`); returns its last status."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(address, job_id)
        if current in TERMINAL or time.monotonic() > deadline:
            return current
        time.sleep(poll)
