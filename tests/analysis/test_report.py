"""The run report: the facts it shows, read from a run made row by row with known values, and the page
rendered in headless Chromium (no console errors, every image decodes, web text stays text)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.analysis.report import write_report
from dataengine.analysis.report.facts import KEPT, REJECTED_HERE, gather
from dataengine.core import columns as C
from dataengine.core.schemas import rejected_schema, sample_schema
from dataengine.engine.spec import parse_spec
from dataengine.testbed.synthweb.train_rows import make_train_rows
from tests.conftest import open_in_chromium

HOSTILE = "<script>alert('caption')</script><b>bold</b>"
CLIP_CUT = 0.31
SECTIONS = ["funnel", "scores", "samples", "dedup", "conversations", "llm", "training"]


def _made_run(root: Path) -> Path:
    """A finished run, written directly: 10 kept rows and 10 rejected ones over 5 stages, a quantile cut,
    LLM columns, and a stage-1 training that was restarted once (step 2 recorded twice)."""
    run = root / "run"
    images = make_train_rows(12)
    spec = parse_spec({"name": "made", "description": "hand-made run", "input": {"path": "urls.parquet"},
                       "output": str(run), "stages": [
                           {"op": "download"}, {"op": "perplexity_filter", "model": "lm", "max_ppl": 50},
                           {"op": "clip_score_filter", "model": "clip", "keep_top_fraction": 0.7},
                           {"op": "dedup", "descriptor": "phash"}, {"op": "llava_synthesis_mapper"}]})
    kept = []
    for i in range(10):
        kept.append({C.UID: f"0-{i}", C.URL: f"http://web/{i}.jpg", C.IMAGE: images[i]["image"],
                     C.CAPTION: HOSTILE if i == 3 else images[i]["caption"], C.CLIP_SCORE: 0.5 + 0.04 * i,
                     C.TEXT_PPL: 3.0 + i, C.INSTRUCTION_TYPE: ["conversation", "detail"][i % 2],
                     C.CONVERSATIONS: images[i]["conversations"], C.LLM_MODEL: "gpt-test",
                     C.LLM_PROMPT_TOKENS: 100, C.LLM_COMPLETION_TOKENS: 50, C.LLM_COST_USD: 0.001,
                     C.LLM_CACHED: i < 3})

    def rejected(uid: str, stage: str, reason: str, **values) -> dict:
        return {C.UID: uid, C.URL: f"http://web/{uid}.jpg", C.CAPTION: f"caption of {uid}",
                C.REJECT_STAGE: stage, C.REJECT_REASON: reason, **values}

    image = images[10]["image"]
    dropped = [rejected(f"0-{10 + i}", "download", "http_404") for i in range(3)]
    dropped += [rejected(f"0-{13 + i}", "perplexity_filter", "text_ppl>50", **{C.TEXT_PPL: ppl, C.IMAGE: image})
                for i, ppl in enumerate((80.0, 120.0))]
    dropped += [rejected(f"0-{15 + i}", "clip_score_filter", "clip_score_not_top_0.7",
                         **{C.TEXT_PPL: 4.0, C.CLIP_SCORE: 0.1 * i, C.IMAGE: image}) for i in range(3)]
    dropped += [rejected(f"0-{18 + i}", "dedup", f"duplicate_of:{original}",
                         **{C.TEXT_PPL: 4.0, C.CLIP_SCORE: 0.6, C.IMAGE: images[int(original[2:])]["image"]})
                for i, original in enumerate(("0-1", "0-1", "0-2"))]
    dropped.append(rejected("0-21", "dedup", "contaminates:bench/0042.png", **{C.CLIP_SCORE: 0.7, C.IMAGE: image}))
    for directory, rows, schema in (("dataset", kept, sample_schema()), ("rejected", dropped, rejected_schema())):
        (run / directory).mkdir(parents=True)
        half = len(rows) // 2  # two part files, and small row groups: images are read group by group
        for k, part in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.Table.from_pylist(part, schema=schema), run / directory / f"part-00000{k}.parquet",
                           row_group_size=2)
    (run / "_state").mkdir()
    (run / "_state" / "decision-2.json").write_text(json.dumps({"column": "clip_score", "score": CLIP_CUT}))

    def stage(name: str, n_in: int, reasons: dict[str, int]) -> dict:
        rejected_n = sum(reasons.values())
        return {"stage": name, "in": n_in, "kept": n_in - rejected_n, "rejected": rejected_n,
                "rejected_by_reason": reasons, "busy_seconds": 1.5}

    (run / "run.json").write_text(json.dumps({
        "name": "made", "status": "complete", "spec_hash": "abc123", "spec": spec.model_dump(mode="json"),
        "stage_names": ["input", *spec.stage_names()], "started_at": "2026-11-22T00:00:00+00:00",
        "ended_at": "2026-11-22T00:01:00+00:00", "attempts": [{"seconds": 60.0}], "versions": {"ray": "2.60.0"},
        "totals": {"in": 21, "kept": 10, "rejected": 11},
        "stages": [stage("input", 21, {}), stage("download", 21, {"http_404": 3}),
                   stage("perplexity_filter", 18, {"text_ppl>50": 2}),
                   stage("clip_score_filter", 16, {"clip_score_not_top_0.7": 3}),
                   stage("dedup", 13, {"duplicate_of:0-1": 2, "duplicate_of:0-2": 1, "contaminates:bench/0042.png": 1}),
                   stage("llava_synthesis_mapper", 10, {})],
        "llm_usage": {"requests": 12, "prompt_tokens": 1200, "completion_tokens": 600, "total_tokens": 1800,
                      "cost_usd": 0.012}}))
    train = run / "train" / "stage1"
    train.mkdir(parents=True)
    steps = [(1, 2.0), (2, 1.9), (2, 1.5), (3, 1.2)]  # a restart redid step 2
    train.joinpath("metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v, "lr": 1e-3}) + "\n"
                                                       for s, v in steps) + '{"step": 4, "lo')  # torn last line
    train.joinpath("result.json").write_text(json.dumps({
        "stage": 1, "steps": 3, "samples_trained": 30, "workers": 2, "seconds": 12.0, "skipped": {"too_long": 1},
        "eval": {"heldout": {"loss": 1.1, "perplexity": 3.0, "samples": 4},
                 "benchmark": {"exact_match": 0.25, "colour_accuracy": 0.5, "pope": {"f1": 0.4, "yes_ratio": 0.5},
                               "caption_perplexity": 4.5,
                               "examples": [{"question": "How many?", "answer": "2", "model": HOSTILE}]}}}))
    return run


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    return _made_run(tmp_path_factory.mktemp("report"))


def test_the_facts_are_the_runs_numbers(made_run):
    facts = gather(made_run)
    assert facts["run"]["totals"] == {"in": 21, "kept": 10, "rejected": 11} and facts["run"]["seconds"] == 60.0
    funnel = {s["stage"]: s for s in facts["funnel"]}
    assert list(funnel) == ["input", "download", "perplexity_filter", "clip_score_filter", "dedup", "llava_synthesis_mapper"]
    assert funnel["dedup"]["reasons"] == [("duplicate_of:*", 3), ("contaminates:*", 1)]

    plots = {p["stage"]: p for p in facts["scores"]}
    assert set(plots) == {"perplexity_filter", "clip_score_filter"}
    clip = plots["clip_score_filter"]
    assert clip["threshold"] == CLIP_CUT and "keep_top_fraction = 0.7" in clip["rule"]
    assert sum(clip["counts"][KEPT]) == 10 and sum(clip["counts"][REJECTED_HERE]) == 3
    assert sum(map(sum, clip["counts"].values())) == clip["rows"] == 10 + 3 + 3 + 1  # dedup rows were scored too
    assert clip["edges"][0] <= CLIP_CUT <= clip["edges"][-1] and len(clip["edges"]) == len(clip["counts"][KEPT]) + 1
    ppl = plots["perplexity_filter"]
    assert ppl["log_scale"] and ppl["threshold"] == pytest.approx(math.log10(50)) and ppl["rule"] == "max_ppl = 50"
    assert sum(ppl["counts"][REJECTED_HERE]) == 2 and ppl["rows"] == 10 + 2 + 3 + 3
    # the two rejected perplexities (80, 120) sit right of the cut, every kept one (3..12) left of it
    assert ppl["edges"].count(ppl["threshold"]) == 1
    right = [i for i, edge in enumerate(ppl["edges"][:-1]) if edge >= ppl["threshold"]]
    assert sum(ppl["counts"][REJECTED_HERE][i] for i in right) == 2 and sum(ppl["counts"][KEPT][i] for i in right) == 0

    samples = facts["samples"]
    assert [c["uid"] for c in samples["kept"]] == sorted(f"0-{i}" for i in range(10))
    assert all(c["image"] and c["image"].startswith("data:image/jpeg;base64,") for c in samples["kept"])
    by_reason: dict[str, list] = {}
    for c in samples["rejected"]:
        by_reason.setdefault(c["reason"].split(":")[0], []).append(c)
    assert {k: len(v) for k, v in by_reason.items()} == {"http_404": 3, "duplicate_of": 3, "clip_score_not_top_0.7": 3,
                                                        "text_ppl>50": 2, "contaminates": 1}
    assert all(c["image"] is None for c in by_reason["http_404"]) and all(c["image"] for c in by_reason["text_ppl>50"])

    dedup = facts["dedup"]
    assert dedup["duplicates"] == 3 and dedup["groups_total"] == 2 and dedup["contaminated_total"] == 1
    assert [(g["original"]["uid"], [c["uid"] for c in g["copies"]]) for g in dedup["groups"]] == \
        [("0-1", ["0-18", "0-19"]), ("0-2", ["0-20"])]
    assert all(g["original"]["image"] for g in dedup["groups"])

    conversations = facts["conversations"]
    assert [c["type"] for c in conversations] == ["conversation", "detail"]
    first = conversations[0]
    assert first["turns"][0]["role"] == "user" and "<image>" not in first["turns"][0]["text"]
    assert first["turns"][1]["role"] == "assistant" and len(first["turns"]) == len(json.loads(
        next(r for r in make_train_rows(12) if r["uid"] == "0-" + first["uid"][2:])["conversations"]))

    llm = facts["llm"]
    assert llm["paid"]["requests"] == 12 and llm["backends"] == ["template"]
    assert llm["by_model"] == [{"llm_model": "gpt-test", "rows": 10, "prompt_tokens": 1000, "completion_tokens": 500,
                                "cost_usd": pytest.approx(0.01), "cached": 3, "kept": 10}]

    (stage,) = facts["training"]
    assert [(s["step"], s["loss"]) for s in stage["curve"]] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert stage["restarts"] == 1 and stage["finished"]


def test_a_run_without_scores_llm_or_training_says_so(synthweb_run, tmp_path):
    _, result, _ = synthweb_run
    path = write_report(result.run_dir, tmp_path / "report.html")
    html = path.read_text()
    facts = gather(result.run_dir)
    assert facts["scores"] == [] and facts["training"] == [] and facts["conversations"] == []
    assert facts["dedup"]["groups"] == [] and facts["samples"]["rejected"]
    assert "No score filter in this run" in html and "This run did not train" in html and "No LLM stage" in html


@pytest.mark.slow
def test_the_page_renders_in_chromium_with_every_section(made_run, tmp_path):
    path = write_report(made_run)
    assert path == made_run / "report.html"
    html = path.read_text()
    assert HOSTILE not in html and "&lt;script&gt;" in html  # web text is escaped
    page = open_in_chromium(path, tmp_path / "report.png")
    assert page["errors"] == [], page["errors"]
    # self-contained: nothing but the file itself and inline images is loaded; no script of any kind
    assert [u for u in page["requests"] if not u.startswith(("file:", "data:"))] == []
    assert page["scripts"] == 0 and page["handlers"] == 0 and page["dialogs"] == []
    assert page["images"] >= 10 + 3 + 3 and page["broken_images"] == 0
    assert [s for s in SECTIONS if s not in page["sections"]] == []
    assert page["charts"] == 2 + 2  # two score histograms, the loss and the lr curves
    assert HOSTILE in page["text"]  # shown as text
    assert page["height"] > 2000 and (tmp_path / "report.png").stat().st_size > 50_000


def test_a_report_that_cannot_be_made_does_not_fail_the_run(tmp_path, caplog, capsys):
    """`dataengine run` writes the report at the end; if that fails, the finished run still succeeds."""
    from dataengine import cli

    cli._write_report_after_run(tmp_path / "not-a-run")
    assert "its report failed" in caplog.text and "dataengine report" in caplog.text
    assert "report:" not in capsys.readouterr().out


def _bare_run(root: Path, manifest: dict) -> Path:
    run = root / "bare"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(manifest))
    return run


def test_a_stopped_run_with_no_outputs_and_an_old_manifest_still_renders(tmp_path):
    """A run stopped before its first commit (no dataset/ or rejected/ files), with a run.json missing
    the optional keys (no attempts, versions, totals, llm_usage), renders with every section saying so."""
    spec = parse_spec({"name": "s", "input": {"path": "u.parquet"}, "output": "o",
                       "stages": [{"op": "download"}, {"op": "clip_score_filter", "model": "clip", "min_score": 0.2}]})
    run = _bare_run(tmp_path, {"name": "s", "status": "running", "spec": spec.model_dump(mode="json"),
                               "versions": None})
    facts = gather(run)
    assert facts["run"]["totals"] == {"in": 0, "kept": 0, "rejected": 0} and facts["funnel"] == []
    assert facts["scores"] == [] and facts["samples"] == {"kept": [], "rejected": []}
    html = write_report(run).read_text()
    assert "Nothing was rejected" in html and "This run did not train" in html


def test_two_filters_of_one_kind_each_plot_the_rows_that_reached_them(tmp_path):
    """clip_a (min 0.2) then clip_b (min 0.5): clip_a's rejections are not "rejected later" on clip_b's
    chart, and clip_a's chart says the rows that went on carry clip_b's score."""
    spec = parse_spec({"name": "two", "input": {"path": "u.parquet"}, "output": "o", "stages": [
        {"op": "clip_score_filter", "name": "clip_a", "model": "clip", "min_score": 0.2},
        {"op": "clip_score_filter", "name": "clip_b", "model": "clip", "min_score": 0.5}]})
    run = _bare_run(tmp_path, {"name": "two", "status": "complete", "spec": spec.model_dump(mode="json"),
                               "stage_names": ["input", "clip_a", "clip_b"]})
    (run / "dataset").mkdir()
    (run / "rejected").mkdir()
    pq.write_table(pa.Table.from_pylist([{C.UID: f"k{i}", C.CLIP_SCORE: 0.6 + i / 100} for i in range(4)],
                                        schema=sample_schema()), run / "dataset" / "part-000000.parquet")
    rejected = [{C.UID: "a", C.CLIP_SCORE: 0.1, C.REJECT_STAGE: "clip_a", C.REJECT_REASON: "clip_score<0.2"},
                {C.UID: "b", C.CLIP_SCORE: 0.3, C.REJECT_STAGE: "clip_b", C.REJECT_REASON: "clip_score<0.5"}]
    pq.write_table(pa.Table.from_pylist(rejected, schema=rejected_schema()), run / "rejected" / "part-000000.parquet")
    plots = {p["stage"]: p for p in gather(run)["scores"]}
    a, b = plots["clip_a"], plots["clip_b"]
    assert (sum(a["counts"][REJECTED_HERE]), sum(a["counts"]["rejected later"]), sum(a["counts"][KEPT])) == (1, 1, 4)
    assert (sum(b["counts"][REJECTED_HERE]), sum(b["counts"]["rejected later"]), sum(b["counts"][KEPT])) == (1, 0, 4)
    assert any("carry its clip_score" in note for note in a["notes"]) and b["notes"] == []


def test_the_cut_is_a_bin_edge_and_a_non_finite_cut_is_not_drawn():
    from dataengine.analysis.report.facts import bin_edges

    edges = bin_edges(-0.2, 0.9, 0.3)
    assert 0.3 in edges and edges[0] <= -0.2 and edges[-1] > 0.9
    assert all(b - a == pytest.approx(edges[1] - edges[0]) for a, b in zip(edges, edges[1:]))
    counts = np.histogram([0.29, 0.3, 0.301], bins=edges)[0]
    at = edges.index(0.3)
    assert counts[at - 1] == 1 and counts[at] == 2  # 0.29 left of the line; 0.3 and 0.301 right of it
    assert bin_edges(0.5, 0.5, None) == pytest.approx(np.linspace(0.0, 1.0, 31).tolist())
    assert bin_edges(0.1, 0.4, 0.4)[-1] > 0.4  # a cut at the maximum still has a bin right of it


def test_a_restart_discards_the_steps_the_failed_attempt_logged_after_its_checkpoint():
    from dataengine.analysis.report.facts import _curve

    lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 11)]  # attempt 1: steps 1-10
    lines += [json.dumps({"step": s, "loss": s + 0.5}) for s in (7, 8)]  # attempt 2 from the step-6 checkpoint
    curve, restarts = _curve(lines + ["{torn"])
    assert [(r["step"], r["loss"]) for r in curve] == [(s, float(s)) for s in range(1, 7)] + [(7, 7.5), (8, 8.5)]
    assert restarts == 1


def test_a_kept_score_on_the_cut_is_drawn_on_the_kept_side(tmp_path):
    """`max_ppl: 50` keeps 50 (rejects > 50); `min_score: 0.3` keeps 0.3 (rejects < 0.3): each lands in the bin
    on its kept side of the line."""
    import polars as pl

    from dataengine.analysis.report.facts import score_histogram

    rows = pl.DataFrame({C.UID: ["a", "b", "c"], C.TEXT_PPL: [50.0, 3.0, 80.0], C.CLIP_SCORE: [0.3, 0.9, 0.1],
                         C.REJECT_STAGE: [None, None, "x"]}, schema_overrides={C.REJECT_STAGE: pl.String})
    for stage, value in (({"op": "perplexity_filter", "max_ppl": 50}, 50.0), ({"op": "clip_score_filter", "min_score": 0.3}, 0.3)):
        plot = score_histogram(tmp_path, rows, 0, [("f", stage)])
        at = plot["edges"].index(plot["threshold"])
        kept_side = range(at) if stage["op"] == "perplexity_filter" else range(at, len(plot["counts"][KEPT]))
        assert sum(plot["counts"][KEPT][i] for i in kept_side) == 2, (stage, value)
