"""pipelines/web.yaml (web pairs without boxes -> caption rules -> a zero-shot detector -> a VLM that sees
the image writes conversations -> export) validates as shipped, and runs end to end on the synthetic web
with a tiny OWLv2 and the fake OpenAI-compatible VLM standing in for the hub model and the endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import yaml

from dataengine.engine.runner import run_pipeline
from dataengine.engine.spec import parse_spec
from dataengine.testbed.synthweb import write_url_list
from dataengine.testbed.synthweb.detector_models import build_random_owlv2
from dataengine.testbed.synthweb.llm_responder import SceneIndex, SceneResponder
from dataengine.testbed.synthweb.llm_server import FakeLLMServer
from tests.conftest import download_stage

WEB_SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "web.yaml"
KEY = "sk-web-pipeline-test-key"


def test_the_web_pipeline_validates_as_shipped():
    spec = parse_spec(yaml.safe_load(WEB_SPEC.read_text()))
    assert [s.op for s in spec.stages] == ["download", "caption_rules_filter", "object_detector_mapper",
                                           "llava_synthesis_mapper", "export"]
    synthesis = spec.stages[3]
    assert synthesis.send_image and synthesis.openai.structured == "auto"
    assert spec.input.boxes_col is None  # web data: the detector writes the boxes


def test_the_web_pipeline_runs_on_the_synthetic_web(ray_local, synthweb_dir, synthweb_server, tmp_path, monkeypatch):
    monkeypatch.setenv("WEB_TEST_KEY", KEY)
    data = yaml.safe_load(WEB_SPEC.read_text())
    data["input"]["path"] = str(write_url_list(synthweb_dir, synthweb_server.base_url))
    data["input"]["shard_rows"] = 60
    data["output"] = str(tmp_path / "run")
    download, rules, detector, synthesis, export = data["stages"]
    download.update(download_stage(image_size=256))
    detector.update(model=str(build_random_owlv2(tmp_path / "owlv2")), labels=["circle", "square", "star"],
                    threshold=0.0, max_objects=2, num_gpus=0, batch_size=16)
    responder = SceneResponder(scenes=SceneIndex.from_synthweb(synthweb_dir), style="llava",
                               structured_outputs=False)
    with FakeLLMServer(responder) as server:
        synthesis["openai"].update(base_url=server.base_url, api_key_env="WEB_TEST_KEY", max_concurrency=8,
                                   timeout_s=5, max_retries=1, max_cost_usd=None)
        synthesis["image_max_side"] = 128
        synthesis["reject_ungrounded"] = False  # a random detector's labels are not the scene's
        result = run_pipeline(parse_spec(data))
        assert responder.seen_images > 0
    stages = {s["stage"]: s for s in result.stages}
    assert stages["object_detector_mapper"]["in"] > 0 and stages["llava_synthesis_mapper"]["kept"] > 0
    assert result.manifest["totals"]["in"] == result.manifest["totals"]["kept"] + result.manifest["totals"]["rejected"]
    kept = pl.read_parquet(result.run_dir / "dataset" / "*.parquet")
    for row in kept.head(5).iter_rows(named=True):
        boxes = json.loads(row["boxes"])
        assert 1 <= len(boxes) <= 2 and all(b["label"] in ("circle", "square", "star") for b in boxes)
        assert json.loads(row["conversations"])[0]["value"].startswith("<image>")
    assert (result.run_dir / "export" / "llava.json").exists()
    for path in result.run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".parquet", ".log", ".yaml"):
            assert KEY.encode() not in path.read_bytes(), path
