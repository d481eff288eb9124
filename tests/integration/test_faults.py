"""Faults on a cluster: a worker node removed mid-run, a model actor that dies on a batch. Every uid
must end in `dataset/` or `rejected/` exactly once, with the local run's outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import polars as pl
import pytest
from ray.cluster_utils import Cluster

from dataengine.engine.raydata import CRASH_ENV
from dataengine.testbed.synthweb import SynthWebServer, write_url_list
from dataengine.testbed.synthweb.models import build_random_open_clip
from tests.conftest import download_stage, run_outcome, synthweb_spec, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _run(spec_file, cwd, address=None, env=None, wait=True):
    cmd = [sys.executable, "-m", "dataengine.cli", "run", str(spec_file)] + (["--address", address] if address else [])
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


def test_worker_node_removed_mid_run_loses_nothing(synthweb_dir, synthweb_run, tmp_path):
    _, local, _ = synthweb_run
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    try:
        with SynthWebServer(synthweb_dir) as server:
            spec = synthweb_spec(tmp_path, synthweb_dir, server.base_url, [download_stage(batch_size=4, threads=2)],
                                 shard_rows=10)
            proc = _run(spec, tmp_path, cluster.address, wait=False)
            committed = tmp_path / "run" / "_state" / "committed"
            deadline = time.monotonic() + 120
            while not (committed.is_dir() and any(committed.iterdir())) and time.monotonic() < deadline \
                    and proc.poll() is None:
                time.sleep(0.2)
            cluster.remove_node(workers[0])  # mid-run: some shards committed, others in flight
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0:  # Ray could not retry everything: a rerun must resume
                code, out = _run(spec, tmp_path, cluster.address)
                assert code == 0, out[-3000:]
    finally:
        cluster.shutdown()
    assert run_outcome(tmp_path / "run") == run_outcome(local.run_dir)


def test_model_actor_crash_on_a_batch_loses_nothing(ray_local, synthweb_dir, synthweb_run, tmp_path):
    """The clip_score actor dies (os._exit) on its first batch; Ray Data restarts it and retries. The
    crashing run is a subprocess (its own Ray, whose workers inherit the fault switch); the calm one
    runs on the session's Ray."""
    from dataengine.engine.runner import run_pipeline
    from dataengine.engine.spec import load_spec

    _, local, _ = synthweb_run
    clip = build_random_open_clip(tmp_path / "clip", seed=0)
    marker = tmp_path / "crashed"
    with SynthWebServer(synthweb_dir) as server:
        urls = tmp_path / "urls.parquet"
        urls.write_bytes(write_url_list(synthweb_dir, server.base_url).read_bytes())
        stages = [download_stage(), {"op": "clip_score_filter", "model": str(clip), "pretrained": None,
                                     "min_score": -1.0, "batch_size": 16}]
        specs = {name: write_spec(tmp_path / f"{name}.yaml", {
            "name": name, "input": {"path": str(urls), "id_col": "id", "shard_rows": 40},
            "output": str(tmp_path / name), "stages": stages}) for name in ("crash", "calm")}
        code, out = _run(specs["crash"], tmp_path, env={CRASH_ENV: str(marker)})
        assert code == 0, out[-3000:]
        run_pipeline(load_spec(specs["calm"]))
    assert marker.exists(), "the fault was not injected"
    crash, calm = run_outcome(tmp_path / "crash"), run_outcome(tmp_path / "calm")
    assert crash == calm and crash[0] == run_outcome(local.run_dir)[0]
    scores = {name: pl.read_parquet(tmp_path / name / "dataset" / "*.parquet", columns=["uid", "clip_score"]).sort("uid")
              for name in ("crash", "calm")}
    assert scores["crash"].equals(scores["calm"])


def test_worker_node_dies_during_a_distributed_dedup_decision(synthweb_dir, tmp_path):
    """pHash dedup above `exact_max_rows` decides across tasks (placements, searches, grouping); a
    worker node is removed while they run. The run finishes (Ray retries the tasks) or a rerun does,
    and the outcome is a calm local run's."""
    stages = [download_stage(batch_size=8), {"op": "dedup", "descriptor": "phash", "exact_max_rows": 2}]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    try:
        with SynthWebServer(synthweb_dir) as server:
            (tmp_path / "calm").mkdir()
            calm = synthweb_spec(tmp_path / "calm", synthweb_dir, server.base_url, stages, shard_rows=10)
            code, out = _run(calm, tmp_path / "calm")
            assert code == 0, out[-3000:]
            spec = synthweb_spec(tmp_path, synthweb_dir, server.base_url, stages, shard_rows=10)
            proc = _run(spec, tmp_path, cluster.address, wait=False)
            work, decided = tmp_path / "run" / "_state" / "decision-1.work", tmp_path / "run" / "_state" / "decision-1.json"
            deadline = time.monotonic() + 180
            while not work.is_dir() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert work.is_dir() and not decided.exists(), "the decision was not caught running"
            cluster.remove_node(workers[0])
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0:
                code, out = _run(spec, tmp_path, cluster.address)
                assert code == 0, out[-3000:]
    finally:
        cluster.shutdown()
    decision = json.loads(decided.read_text())
    assert decision["method"] == "partitioned"
    outcome = run_outcome(tmp_path / "run")
    assert outcome == run_outcome(tmp_path / "calm" / "run")
    assert any(reason.startswith("duplicate_of:") for reason in outcome[1].values())
