"""vlm_caption_mapper against the fake OpenAI-compatible server with an image-aware model: captions from
the image, not the web caption; a CapFilt candidate; the context of caption-then-QA synthesis."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from dataengine.core import columns as C
from dataengine.ops import apply_stage
from dataengine.ops.llava_synthesis import LlavaSynthesisConfig, LlavaSynthesisMapper
from dataengine.ops.vlm_caption import VlmCaptionConfig, VlmCaptionMapper
from dataengine.testbed.synthweb.llm_responder import SceneIndex, SceneResponder
from dataengine.testbed.synthweb.llm_server import FakeLLMServer, Reply
from tests.conftest import encode_jpeg

SECRET = "sk-test-vlm-never-log-me"


@pytest.fixture()
def rows(synthweb_dir, synthweb_run):
    """Downloaded rows whose web caption is about another image, with their true captions."""
    _, first, _ = synthweb_run
    kept = pl.read_parquet(first.run_dir / "dataset" / "*.parquet")
    truth = pl.read_parquet(synthweb_dir / "truth.parquet").select("id", "true_caption", "caption_noise")
    return kept.join(truth, left_on="source_id", right_on="id").filter(pl.col("caption_noise") == "mismatched").head(6)


def _config(server: FakeLLMServer, tmp_path, max_concurrency: int = 4, **fields) -> VlmCaptionConfig:
    openai = {"model": "fake-vlm", "base_url": server.base_url, "api_key_env": "TEST_VLM_KEY",
              "max_concurrency": max_concurrency, "timeout_s": 5, "max_retries": 1}
    return VlmCaptionMapper.bind_run(VlmCaptionConfig(openai=openai, image_max_side=128, **fields), tmp_path)


def _run(op, batch: pa.Table) -> list[dict]:
    try:
        return apply_stage(op, batch, "vlm", 0).to_pylist()
    finally:
        op.backend.close()


def test_captions_come_from_the_image_and_feed_capfilt_and_synthesis(rows, synthweb_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_VLM_KEY", SECRET)
    batch = pa.table({C.UID: rows["uid"].to_list(), C.IMAGE: rows["image"].to_list(),
                      C.CAPTION: rows["caption"].to_list(),
                      C.SYNTHETIC_CAPTIONS: pa.array([["a blip caption"]] + [None] * (rows.height - 1),
                                                     pa.list_(pa.string()))})
    with FakeLLMServer(SceneResponder(scenes=SceneIndex.from_synthweb(synthweb_dir))) as server:
        out = _run(VlmCaptionMapper(_config(server, tmp_path)), batch)
        for body in server.bodies:  # prose wanted: no response_format; the image in the user message
            assert "response_format" not in body
            assert body["messages"][-1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert server.responder.seen_images == rows.height
        # caption-then-QA: the synthesis context leads with the VLM caption (a text-only LLM here)
        captioned = pa.Table.from_pylist([{C.UID: r[C.UID], C.CAPTION: c, C.VLM_CAPTION: r[C.VLM_CAPTION]}
                                          for r, c in zip(out, rows["caption"])])
        synthesis = LlavaSynthesisMapper.bind_run(LlavaSynthesisConfig(
            backend="openai", mix={"conversation": 1.0}, openai={"model": "fake", "base_url": server.base_url,
                                                                  "api_key_env": "TEST_VLM_KEY"}), tmp_path)
        op = LlavaSynthesisMapper(synthesis)
        try:
            conversations = apply_stage(op, captioned, "synth", 1).to_pylist()
        finally:
            op.backend.close()
    for row, true_caption, web_caption in zip(out, rows["true_caption"], rows["caption"]):
        assert row[C.REJECT_REASON] is None and true_caption in row[C.VLM_CAPTION]
        assert web_caption not in row[C.VLM_CAPTION] and len(row[C.VLM_CAPTION].split()) >= 5
        assert row[C.SYNTHETIC_CAPTIONS][-1] == row[C.VLM_CAPTION]  # a CapFilt candidate
    assert out[0][C.SYNTHETIC_CAPTIONS] == ["a blip caption", out[0][C.VLM_CAPTION]]
    for row, true_caption in zip(conversations, rows["true_caption"]):
        assert row[C.REJECT_REASON] is None and true_caption in json.loads(row[C.CONVERSATIONS])[1]["value"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes()


def test_what_cannot_be_captioned_is_rejected_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_VLM_KEY", SECRET)
    replies = iter([Reply(content="A cat."), Reply(content="A long caption that was cut", finish_reason="length")])
    # two different images: two different requests (an identical one may be answered from the cache once
    # the first reply is in, which would give both rows the same reply)
    red, blue = (encode_jpeg(Image.new("RGB", (40, 30), colour)) for colour in ("red", "blue"))
    batch = pa.table({C.UID: ["a", "b", "c", "d"], C.IMAGE: [None, b"not an image", red, blue]})
    with FakeLLMServer(lambda body: next(replies)) as server:
        out = _run(VlmCaptionMapper(_config(server, tmp_path, max_concurrency=1)), batch)
    reasons = [r[C.REJECT_REASON] for r in out]
    assert reasons[:2] == ["no_image", "not_image"]
    assert sorted(reasons[2:]) == ["llm_invalid:truncated", "vlm_caption_too_short"]
    assert [r[C.VLM_CAPTION] for r in out] == [None] * 4


def test_a_vlm_backend_needs_its_section():
    with pytest.raises(ValueError, match="backend openai needs an `openai:` section"):
        VlmCaptionConfig(openai=None)
    assert VlmCaptionConfig().openai.model == "gpt-4o-mini"  # the default endpoint: OpenAI's
    config = VlmCaptionConfig(backend="vllm", vllm={"model": "Qwen/Qwen2.5-VL-7B-Instruct"})
    stage = VlmCaptionMapper.ray_llm_stage(config)
    assert stage.processor_kwargs["prepare_multimodal_stage"] == {"enabled": True}
    assert "structured_outputs" not in stage.preprocess({C.LLM_REQUEST: json.dumps([{"role": "user", "content": "x"}])})["sampling_params"]
