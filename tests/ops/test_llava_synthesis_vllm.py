"""The vllm backend: config checks and our prepare/finish phases on CPU (the engine stands in);
the Ray Data LLM run itself needs a GPU and vLLM."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from dataengine.core import columns as C
from dataengine.engine.spec import SpecError, parse_spec
from dataengine.llm.backends.vllm_engine import REPLY_COLUMNS, REQUEST_COLUMN, VLLMBackendConfig
from dataengine.ops import apply_stage
from dataengine.ops.llava_synthesis import LlavaSynthesisConfig, LlavaSynthesisMapper
from dataengine.testbed.synthweb.llm_responder import SceneResponder, asked_question, fenced_context


def test_vllm_config_is_validated():
    base = {"name": "v", "input": {"path": "x.parquet"}, "output": "out"}
    with pytest.raises(SpecError, match="backend vllm needs a `vllm:` section"):
        parse_spec({**base, "stages": [{"op": "llava_synthesis_mapper", "backend": "vllm"}]})
    with pytest.raises(SpecError, match=r"vllm.tensor_parallel_size: must be > 0"):
        parse_spec({**base, "stages": [{"op": "llava_synthesis_mapper", "backend": "vllm",
                                        "vllm": {"model": "m", "tensor_parallel_size": 0}}]})
    spec = parse_spec({**base, "stages": [{"op": "llava_synthesis_mapper", "backend": "vllm", "num_gpus": 1,
                                           "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel_size": 2,
                                                    "max_model_len": 8192, "accelerator_type": "H100"}}]})
    kwargs = spec.stages[0].vllm.processor_kwargs()
    assert kwargs["model_source"] == "Qwen/Qwen2.5-7B-Instruct"
    assert kwargs["engine_kwargs"] == {"tensor_parallel_size": 2, "max_model_len": 8192}
    assert kwargs["accelerator_type"] == "H100"


def test_sending_images_asks_ray_data_llm_for_its_multimodal_stage():
    """Ray 2.60's processor config takes what we build: with images, the stage that turns image parts of
    OpenAI-format messages into model inputs is on; without, it is left at Ray's default."""
    from ray.data.llm import vLLMEngineProcessorConfig

    config = VLLMBackendConfig(model="Qwen/Qwen2.5-VL-3B-Instruct")
    with_images = vLLMEngineProcessorConfig(**config.processor_kwargs(images=True))
    assert with_images.model_source == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert with_images.prepare_multimodal_stage == {"enabled": True}
    assert "prepare_multimodal_stage" not in config.processor_kwargs(images=False)
    vLLMEngineProcessorConfig(**config.processor_kwargs(images=False))  # accepted as is


def test_a_vllm_spec_on_a_python_without_vllm_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Valid as a spec (it may be meant for a GPU cluster); `validate` and `run` name the missing package."""
    import importlib.util

    import yaml

    from dataengine import cli
    from dataengine.engine.runner import RunError, run_pipeline
    from dataengine.engine.spec import missing_requirements

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    data = {"name": "v", "input": {"path": str(tmp_path / "in.parquet")}, "output": str(tmp_path / "run"),
            "stages": [{"op": "download"}, {"op": "llava_synthesis_mapper", "backend": "vllm", "vllm": {"model": "m"}}]}
    spec = parse_spec(data)
    assert missing_requirements(spec) == ["stages[1] (llava_synthesis_mapper): needs the vllm package, not installed "
                                          "here: pip install 'dataengine[vllm]' (Ray Data LLM and vLLM, on GPU nodes)"]
    assert missing_requirements(parse_spec({**data, "stages": [{"op": "download"}]})) == []
    with pytest.raises(RunError, match="cannot run the spec:\n  stages\\[1\\].*needs the vllm package"):
        run_pipeline(spec)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert cli.main(["validate", str(tmp_path / "spec.yaml")]) == 2
    assert "valid, but this Python cannot run it" in capsys.readouterr().err


def test_prepare_engine_finish_phases_on_cpu():
    """Prepare writes chat messages; a stand-in engine answers through preprocess/postprocess; finish validates."""
    config = LlavaSynthesisConfig(backend="vllm", vllm=VLLMBackendConfig(model="m", max_tokens=400))
    stage = LlavaSynthesisMapper.ray_llm_stage(config)  # what the engine's Ray adapter builds the processor from
    assert stage is not None and stage.processor_kwargs["model_source"] == "m"
    assert LlavaSynthesisMapper.ray_llm_stage(LlavaSynthesisConfig(backend="template")) is None
    batch = pa.table({C.UID: ["a", "b", "c"], C.CAPTION: ["a red circle", None, "a blue star"]})
    prepared = apply_stage(LlavaSynthesisMapper(stage.prepare), batch, "synth", 0)
    requests = prepared.column(REQUEST_COLUMN).to_pylist()
    assert requests[1] is None and prepared.column(C.REJECT_REASON).to_pylist() == [None, "no_context", None]
    responder = SceneResponder()
    engine_rows = []
    for row in prepared.to_pylist():
        engine_in = stage.preprocess(row)
        assert engine_in["sampling_params"]["max_tokens"] == (400 if row[REQUEST_COLUMN] else 1)
        messages = engine_in["messages"]
        text = responder({"messages": messages}).content if row[REQUEST_COLUMN] else "."
        engine_rows.append(stage.postprocess({**engine_in, "generated_text": text, "num_input_tokens": 50,
                                              "num_generated_tokens": 400 if row[C.UID] == "c" else 30}))
    assert "messages" not in engine_rows[0] and set(REPLY_COLUMNS) <= set(engine_rows[0])
    assert engine_rows[1][REPLY_COLUMNS[0]] is None  # the placeholder's reply is dropped
    finished = apply_stage(LlavaSynthesisMapper(config), pa.Table.from_pylist(engine_rows), "synth", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in finished] == [None, "no_context", "llm_invalid:truncated"]
    turns = json.loads(finished[0][C.CONVERSATIONS])
    assert turns[0]["value"].startswith("<image>\n") and "a red circle" in turns[1]["value"]
    assert finished[0][C.LLM_PROMPT_TOKENS] == 50 and finished[0][C.LLM_COMPLETION_TOKENS] == 30


def test_responder_reads_the_fence_and_the_detail_question():
    from dataengine.llm.prompts import build_messages, default_prompts_dir, load_prompt_set

    prompts = load_prompt_set(default_prompts_dir(), "detail")
    messages = build_messages(prompts, {"captions": ["a red circle"]}, "Describe the image in detail.")
    assert fenced_context(messages) == {"captions": ["a red circle"]}
    assert asked_question(messages) == "Describe the image in detail."
    assert len(messages) == 2 + 2 * len(prompts.examples)


@pytest.mark.gpu
def test_vllm_backend_generates_on_gpu(ray_local, tmp_path):  # pragma: no cover - needs CUDA and vLLM
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    import polars as pl

    from dataengine.engine.runner import run_pipeline

    urls = tmp_path / "in.parquet"
    pl.DataFrame({"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["a red circle", "two blue stars"]}).write_parquet(urls)
    spec = parse_spec({"name": "vllm", "input": {"path": str(urls)}, "output": str(tmp_path / "run"),
                       "stages": [{"op": "llava_synthesis_mapper", "backend": "vllm", "num_gpus": 1,
                                   "vllm": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "max_model_len": 4096,
                                            "max_tokens": 512}}]})
    result = run_pipeline(spec)
    assert result.manifest["totals"]["in"] == 2
    rows = pl.concat([pl.read_parquet(result.run_dir / d) for d in ("dataset", "rejected")
                      if (result.run_dir / d).is_dir()], how="diagonal")
    assert rows.height == 2 and rows[C.LLM_MODEL].to_list() == ["Qwen/Qwen2.5-0.5B-Instruct"] * 2


def test_the_engine_decodes_to_the_turns_schema_unless_told_not_to():
    from dataengine.llm.prompts import TURNS_SCHEMA

    params = VLLMBackendConfig(model="m").sampling_params()
    assert json.loads(params["structured_outputs"]["json"]) == TURNS_SCHEMA  # vLLM's StructuredOutputsParams(json=)
    assert "structured_outputs" not in VLLMBackendConfig(model="m", structured="none").sampling_params()
