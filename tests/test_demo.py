"""`dataengine demo` end to end in a subprocess: it runs, scores itself, and the scores are right."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs_end_to_end_and_scores_the_download_stage(tmp_path):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    proc = subprocess.run([sys.executable, "-m", "dataengine.cli", "demo", "--n", "150"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "download stage vs truth" in proc.stdout and "total" in proc.stdout
    scores = json.loads((tmp_path / "runs" / "demo" / "demo_scores.json").read_text())
    assert scores["rows"] == 150
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0 and scores["reason_agreement"] == 1.0
    manifest = json.loads((tmp_path / "runs" / "demo" / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"]["in"] == 150
