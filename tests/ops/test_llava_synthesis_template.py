"""llava_synthesis_mapper with the template backend, the export stage, and `dataengine export`."""

from __future__ import annotations

import json
import re
import shutil

import polars as pl
import pyarrow as pa
import pytest

from dataengine.core import columns as C
from dataengine.io.export import ExportOptions, export_run
from dataengine.llm.readiness import SHORT_ANSWER_PROMPT, readiness_problem, with_short_answer_prompt
from dataengine.ops import apply_stage
from dataengine.ops.llava_synthesis import LlavaSynthesisConfig, LlavaSynthesisMapper
from dataengine.testbed.synthweb.build import boxes_json
from tests.conftest import download_stage

OBJECTS = [
    {"kind": "circle", "colour": "red", "size": "large", "box": [0.05, 0.05, 0.3, 0.3]},
    {"kind": "star", "colour": "blue", "size": "small", "box": [0.7, 0.7, 0.9, 0.95]},
    {"kind": "star", "colour": "green", "size": "small", "box": [0.4, 0.4, 0.55, 0.55]},
]


def _turn_pairs(conversation: str) -> list[tuple[str, str]]:
    turns = json.loads(conversation)
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def test_template_answers_come_from_the_boxes_and_bad_rows_are_rejected():
    op = LlavaSynthesisMapper(LlavaSynthesisConfig(max_qa_turns=10, detailed_fraction=1.0))
    batch = pa.table({C.UID: ["a", "b", "c", "d"],
                      C.CAPTION: ["a red circle and two stars", None, None, "  "],
                      C.BOXES: [boxes_json(OBJECTS), "[{\"label\": \"x\"}]", "not json", None]})
    rows = apply_stage(op, batch, "synth", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in rows] == [None, "invalid_boxes", "invalid_boxes", "no_context"]
    first = rows[0]
    assert first[C.INSTRUCTION_TYPE] == "detailed" and first[C.UNGROUNDED_OBJECTS] == []
    pairs = _turn_pairs(first[C.CONVERSATIONS])
    assert pairs[0][0].startswith("<image>\n") and "large red circle at the top left" in pairs[0][1]
    answers = {q: a for q, a in pairs[1:]}
    # count circle, count star, colour and position of the circle (two stars: neither), one existence question
    assert len(answers) == 5
    for question, answer in answers.items():
        if re.search(r"is there|contain", question, re.I):
            assert answer == "Yes." and re.search(r"circle|star", question)
        elif "star" in question:
            assert answer == "2"
        elif re.search(r"how many|count", question, re.I):
            assert answer == "1"
        elif "colour" in question.lower():
            assert answer == "Red."
        else:
            assert answer == "At the top left."


def test_template_asks_about_absent_labels_and_can_lead_with_a_short_question():
    config = LlavaSynthesisConfig(max_qa_turns=10, detailed_fraction=0.0, short_first_fraction=1.0,
                                  absent_labels=["circle", "star", "hexagon"])
    batch = pa.table({C.UID: ["a"], C.CAPTION: ["a red circle and two stars"], C.BOXES: [boxes_json(OBJECTS)]})
    row = apply_stage(LlavaSynthesisMapper(config), batch, "synth", 0).to_pylist()[0]
    assert row[C.INSTRUCTION_TYPE] == "short"
    pairs = _turn_pairs(row[C.CONVERSATIONS])
    assert pairs[0][0].startswith("<image>\n") and len(pairs[0][1]) < 20  # a short answer, not a description
    existence = {q: a for q, a in pairs if re.search(r"is there|contain", q, re.I)}
    assert sorted(existence.values()) == ["No.", "Yes."]
    absent_question = next(q for q, a in existence.items() if a == "No.")
    assert "hexagon" in absent_question  # the only listed label that is not in the image


def test_template_is_deterministic_per_uid_and_brief_without_boxes():
    op = LlavaSynthesisMapper(LlavaSynthesisConfig(seed=3))
    batch = pa.table({C.UID: [f"u{i}" for i in range(20)], C.CAPTION: ["a cyan hexagon"] * 20})
    first, again = op.process(batch), op.process(batch)
    assert first.column(C.CONVERSATIONS).to_pylist() == again.column(C.CONVERSATIONS).to_pylist()
    assert set(first.column(C.INSTRUCTION_TYPE).to_pylist()) == {"brief"}
    questions = {json.loads(c)[0]["value"] for c in first.column(C.CONVERSATIONS).to_pylist()}
    assert len(questions) > 1  # wordings vary across rows
    assert all(json.loads(c)[1]["value"] == "A cyan hexagon" for c in first.column(C.CONVERSATIONS).to_pylist())


def test_short_answer_prompt_and_readiness_rules():
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A long answer with many words in it."},
             {"from": "human", "value": "How many stars?"}, {"from": "gpt", "value": "2"}]
    out = with_short_answer_prompt(turns)
    assert out[0]["value"] == turns[0]["value"] and out[2]["value"] == f"How many stars?\n{SHORT_ANSWER_PROMPT}"
    assert with_short_answer_prompt(out) == out  # never twice
    assert readiness_problem(out) is None
    assert readiness_problem(out[:3]) == "roles"
    assert readiness_problem([out[1], out[0]]) == "image_token_position"  # the image is in the second turn
    assert readiness_problem([{"from": "human", "value": "<image>\n<image>\nq"}, out[1]]) == "image_tokens"
    assert readiness_problem([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]) == "image_token_position"


@pytest.fixture(scope="module")
def synthesis_run(ray_local, synthweb_dir, tmp_path_factory):
    """download -> template synthesis (boxes from the input) -> export with a tokenizer length check."""
    from dataengine.engine.runner import run_pipeline
    from dataengine.engine.spec import parse_spec
    from dataengine.testbed.synthweb import SynthWebServer, write_url_list
    from dataengine.testbed.synthweb.tokenizer import build_caption_tokenizer

    out = tmp_path_factory.mktemp("synth")
    tokenizer_dir = out / "tokenizer"
    build_caption_tokenizer(["a red circle and two blue stars on a white background"] * 50, tokenizer_dir, vocab_size=300)
    urls = out / "urls.parquet"
    with SynthWebServer(synthweb_dir) as server:
        shutil.copyfile(write_url_list(synthweb_dir, server.base_url), urls)
        spec = parse_spec({
            "name": "synth", "input": {"path": str(urls), "id_col": "id", "boxes_col": "boxes", "shard_rows": 60},
            "output": str(out / "run"),
            "stages": [download_stage(), {"op": "llava_synthesis_mapper", "backend": "template", "max_qa_turns": 3},
                       {"op": "export", "tokenizer": str(tokenizer_dir), "max_length": 1000, "image_tokens": 576,
                        "short_answer_prompt": True}]})
        result = run_pipeline(spec)
    return result, pl.read_parquet(synthweb_dir / "truth.parquet")


def test_pipeline_counts_match_the_truth_and_long_samples_are_rejected(synthesis_run):
    result, truth = synthesis_run
    kept = pl.read_parquet(result.run_dir / "dataset").to_dicts()
    rejected = pl.read_parquet(result.run_dir / "rejected").to_dicts()
    assert kept, "some rows must survive"
    by_id = {t["id"]: t for t in truth.to_dicts()}
    checked = 0
    for row in kept:
        objects = by_id[row[C.SOURCE_ID]]["objects"]
        for question, answer in _turn_pairs(row[C.CONVERSATIONS])[1:]:
            match = re.search(r"(?:How many|Count the) (\w+?)s? (?:are|in|can)", question)
            if match:
                assert int(answer) == sum(o["kind"] == match.group(1) for o in objects), (question, objects)
                checked += 1
        assert 0 < row[C.CONVERSATION_TOKENS] <= 1000
    assert checked > 20
    too_long = [r for r in rejected if r[C.REJECT_STAGE] == "export"]
    assert too_long and {r[C.REJECT_REASON] for r in too_long} == {"not_trainable:too_long"}
    assert all(r[C.CONVERSATION_TOKENS] > 1000 for r in too_long)


def test_export_files_load_as_llava_json_and_with_datasets(synthesis_run):
    result, _ = synthesis_run
    export = result.run_dir / "export"
    samples = json.loads((export / "llava.json").read_text())
    kept = pl.read_parquet(result.run_dir / "dataset")
    assert len(samples) == kept.height
    assert {s["id"] for s in samples} == set(kept[C.UID].to_list())
    for sample in samples:
        assert set(sample) == {"id", "image", "conversations"}
        assert (export / "images" / sample["image"]).stat().st_size > 0
        assert sample["conversations"][0]["value"].startswith("<image>\n")
        assert [t["from"] for t in sample["conversations"]] == ["human", "gpt"] * (len(sample["conversations"]) // 2)
    assert any(SHORT_ANSWER_PROMPT in t["value"] for s in samples for t in s["conversations"])
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(export / "conversations.parquet"), split="train")
    assert loaded.num_rows == len(samples)
    assert loaded[0]["conversations"] == samples[0]["conversations"]
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["samples"] == len(samples) and manifest["skipped"] == {}


def test_cli_export_writes_stage1_caption_data(synthesis_run, tmp_path):
    from dataengine.cli import main

    result, _ = synthesis_run
    assert main(["export", str(result.run_dir), "--out", str(tmp_path / "stage1"), "--caption-data",
                 "--format", "llava_json"]) == 0
    samples = json.loads((tmp_path / "stage1" / "llava.json").read_text())
    kept = pl.read_parquet(result.run_dir / "dataset")
    captions = dict(zip(kept[C.UID].to_list(), kept[C.CAPTION].to_list()))
    assert len(samples) == kept.height
    assert all(len(s["conversations"]) == 2 and s["conversations"][1]["value"] == captions[s["id"]].strip() for s in samples)
    assert not (tmp_path / "stage1" / "conversations.parquet").exists()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_run(tmp_path, options=ExportOptions())
