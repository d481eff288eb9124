"""`dataengine run --address` joins an existing 3-node Ray cluster instead of starting its own."""

import json
import subprocess
import sys

import pytest
from ray.cluster_utils import Cluster

from dataengine.testbed.synthweb import SynthWebServer
from tests.conftest import download_stage, run_outcome, synthweb_spec


@pytest.mark.slow
def test_run_on_an_existing_cluster_matches_the_local_run(synthweb_dir, synthweb_run, tmp_path):
    local_spec, local_result, _ = synthweb_run
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # head + 2 workers: 3 nodes
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    try:
        with SynthWebServer(synthweb_dir) as server:
            spec_file = synthweb_spec(tmp_path, synthweb_dir, server.base_url, [download_stage()])
            proc = subprocess.run([sys.executable, "-m", "dataengine.cli", "run", str(spec_file),
                                   "--address", cluster.address], capture_output=True, text=True, timeout=300,
                                  cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        cluster.shutdown()
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["totals"] == local_result.manifest["totals"]
    assert run_outcome(tmp_path / "run") == run_outcome(local_result.run_dir)
