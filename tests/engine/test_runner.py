"""End-to-end runs on the synthetic web: accounting, outputs, schemas, rerun, recovery."""

import hashlib
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.core import columns as C
from dataengine.core.schemas import rejected_schema, sample_schema
from dataengine.engine.parts import shed_rejected
from dataengine.engine.runner import AccountingError, RunError, run_pipeline
from dataengine.engine.spec import parse_spec
from dataengine.io.shard_plan import plan_shards, read_shard
from tests.conftest import download_stage


def _outputs(run_dir):
    kept = pl.read_parquet(run_dir / "dataset" / "*.parquet")
    rejected = pl.read_parquet(run_dir / "rejected" / "*.parquet")
    return kept, rejected


def test_every_row_accounted_once(synthweb_run):
    spec, result, truth = synthweb_run
    kept, rejected = _outputs(result.run_dir)
    assert kept.height + rejected.height == truth.height == result.manifest["totals"]["in"]
    uids = kept["uid"].to_list() + rejected["uid"].to_list()
    assert len(set(uids)) == len(uids) == truth.height
    for stage in result.stages:
        assert stage["in"] == stage["kept"] + stage["rejected"]
    download = result.stages[-1]
    assert download["stage"] == "download" and download["kept"] == kept.height
    assert sum(download["rejected_by_reason"].values()) == rejected.height


def test_rejections_match_the_truth(synthweb_run):
    _, result, truth = synthweb_run
    kept, rejected = _outputs(result.run_dir)
    got = pl.concat([kept.select("source_id").with_columns(reason=pl.lit(None, pl.String)),
                     rejected.select("source_id", reason="reject_reason")])
    joined = truth.join(got, left_on="id", right_on="source_id")
    assert joined.height == truth.height
    broken = joined.filter(pl.col("broken"))
    assert broken.height > 0 and joined.filter(~pl.col("broken")).height > 0
    mismatched = broken.filter(pl.col("reason") != pl.col("expected_reason"))
    assert mismatched.height == 0, mismatched.select("id", "url_kind", "reason", "expected_reason").to_dicts()
    assert joined.filter(~pl.col("broken"))["reason"].null_count() == joined.filter(~pl.col("broken")).height


def test_kept_rows_carry_image_facts(synthweb_run, synthweb_dir):
    _, result, truth = synthweb_run
    kept, _ = _outputs(result.run_dir)
    rows = kept.join(truth, left_on="source_id", right_on="id")
    for row in rows.head(10).iter_rows(named=True):
        assert min(row["width"], row["height"]) == 256  # keep_ratio: smaller side becomes image_size
        assert (row["original_width"], row["original_height"]) == (row["width_right"], row["height_right"])
        served = (synthweb_dir / "files" / "img" / row["path"].rsplit("/", 1)[1]).read_bytes()
        assert row["sha256"] == hashlib.sha256(served).hexdigest() and row["original_bytes"] == len(served)
        assert row["image"][:2] == b"\xff\xd8" and row["image_format"] == "jpeg"
    flaky = rows.filter(pl.col("url_kind") == "flaky")
    assert flaky.height and (flaky["download_attempts"] == 2).all()
    redirected = rows.filter(pl.col("url_kind") == "redirect")
    assert redirected.height and redirected["final_url"].str.contains("/img/").all()


def test_written_parquet_matches_the_schema_files(synthweb_run):
    _, result, _ = synthweb_run
    for directory, schema in (("dataset", sample_schema()), ("rejected", rejected_schema())):
        files = sorted((result.run_dir / directory).glob("part-*.parquet"))
        assert files
        for f in files:
            assert pq.read_schema(f).remove_metadata().equals(schema.remove_metadata(), check_metadata=False), f


def test_manifest_records_spec_versions_and_counts(synthweb_run):
    spec, result, _ = synthweb_run
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["spec_hash"] == spec.spec_hash()
    assert manifest["spec"]["stages"][0]["op"] == "download"
    assert manifest["versions"]["ray"] and manifest["versions"]["pyarrow"]
    assert manifest["started_at"] <= manifest["ended_at"]
    assert [s["stage"] for s in manifest["stages"]] == ["input", "download"]
    assert manifest["stages"][1]["busy_seconds"] > 0
    assert manifest["attempts"][0]["shards_processed"] == manifest["input"]["shards"] == 3


def test_rerun_skips_committed_shards(synthweb_run):
    spec, result, _ = synthweb_run
    before = {p: p.stat().st_mtime_ns for p in (result.run_dir / "dataset").glob("*.parquet")}
    again = run_pipeline(spec)
    assert again.manifest["attempts"][-1]["shards_processed"] == 0
    assert again.manifest["totals"] == result.manifest["totals"]
    assert {p: p.stat().st_mtime_ns for p in (result.run_dir / "dataset").glob("*.parquet")} == before


def test_another_spec_in_the_same_output_is_refused(synthweb_run):
    spec, result, _ = synthweb_run
    changed = spec.model_copy(update={"stages": [spec.stages[0].model_copy(update={"image_size": 128})]})
    with pytest.raises(RunError, match="holds a run of another spec"):
        run_pipeline(changed)


def _offline_spec(tmp_path, n=30, shard_rows=10):
    """A spec whose URLs all fail validation, so rows flow without any network."""
    pq.write_table(pa.table({"url": [None, "ftp://x/y", "gopher://h/", "example.com/a.jpg", "file:///etc/passwd"] * (n // 5),
                             "caption": ["c"] * n}), tmp_path / "in.parquet")
    return parse_spec({"name": "offline", "input": {"path": str(tmp_path / "in.parquet"), "shard_rows": shard_rows},
                       "output": str(tmp_path / "run"), "stages": [download_stage()]})


def _process_offline(spec, shard):
    from dataengine.ops import apply_stage, get_op

    op = get_op("download")(spec.stages[0])
    return apply_stage(op, read_shard(shard.path), "download", 0)


def test_recovery_commits_finished_parts_and_redoes_half_done_shards(ray_local, tmp_path):
    spec = _offline_spec(tmp_path)
    run_dir = tmp_path / "run"
    shards = plan_shards(spec.input, run_dir)
    # a killed attempt left shard 0 fully written but uncommitted, and shard 1 half written
    parts = str(run_dir / "_parts" / "segment-0")
    shed_rejected(_process_offline(spec, shards[0]), parts)
    shed_rejected(_process_offline(spec, shards[1]).slice(0, 4), parts)
    result = run_pipeline(spec)
    attempt = result.manifest["attempts"][-1]
    assert attempt["shards_recovered"] == 1 and attempt["shards_processed"] == 2
    assert result.manifest["totals"] == {"in": 30, "kept": 0, "rejected": 30}
    assert result.stages[-1]["rejected_by_reason"] == {"bad_url": 30}
    assert not (run_dir / "_parts").exists() or not any((run_dir / "_parts").iterdir())


def test_odd_captions_and_urls_reach_the_outputs_intact(ray_local, tmp_path):
    huge = "long " * 200_000  # a 1 MB caption
    csv = b"url,caption\n,\nftp://x/y.jpg,caf\xe9\n" + b"file:///etc/passwd," + huge.strip().encode() + b"\n"
    (tmp_path / "in.csv").write_bytes(csv)
    spec = parse_spec({"name": "odd", "input": {"path": str(tmp_path / "in.csv")}, "output": str(tmp_path / "run"),
                       "stages": [download_stage()]})
    result = run_pipeline(spec)
    rejected = pl.read_parquet(tmp_path / "run" / "rejected" / "*.parquet").sort("uid")
    assert rejected["reject_reason"].to_list() == ["bad_url"] * 3
    assert rejected["caption"].to_list()[1:] == ["caf\ufffd", huge.strip()]
    assert result.manifest["totals"] == {"in": 3, "kept": 0, "rejected": 3}


def test_accounting_catches_rows_lost_after_commit(ray_local, tmp_path):
    from dataengine.engine.accounting import check_accounting, final_markers
    from dataengine.engine.segments import Segment

    spec = _offline_spec(tmp_path)
    result = run_pipeline(spec)
    shards = plan_shards(spec.input, result.run_dir)
    markers = final_markers(result.run_dir, Segment(0, (0,), None, final=True), shards)
    counts = {k: result.manifest["totals"][k] for k in ("in", "kept", "rejected")} | {"stages": result.stages}
    check_accounting(result.run_dir, shards, markers, counts)  # the books balance
    next((result.run_dir / "rejected").glob("part-*.parquet")).unlink()
    with pytest.raises(AccountingError, match="rejected/ holds 20 rows, the commit markers say 30"):
        check_accounting(result.run_dir, shards, markers, counts)
    (result.run_dir / "dataset").mkdir(exist_ok=True)
    pq.write_table(pa.table({C.UID: ["x"]}), result.run_dir / "dataset" / "part-999999-stray.parquet")
    with pytest.raises(AccountingError, match="dataset/ holds 1 files no commit lists"):
        check_accounting(result.run_dir, shards, markers, counts)


def test_a_failing_run_is_recorded_as_failed_and_resumes(ray_local, tmp_path, monkeypatch):
    """The driver fails (a full disk, say) once the first shard's summary is back: the run is recorded as
    failed, the shards committed so far (in their read tasks) stay committed, the rerun does the rest."""
    import dataengine.engine.runner as runner

    spec = _offline_spec(tmp_path)
    real_add = runner.SegmentProgress.add

    def fail_on_first_summary(self, rows, rejected):
        raise OSError("disk full")

    monkeypatch.setattr(runner.SegmentProgress, "add", fail_on_first_summary)
    with pytest.raises(OSError, match="disk full"):
        run_pipeline(spec)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "failed" and "disk full" in manifest["attempts"][-1]["error"]
    committed = len(list((tmp_path / "run" / "_state" / "committed").glob("*.json")))
    assert committed >= 1  # the read task committed its shard before the driver saw its summary
    monkeypatch.setattr(runner.SegmentProgress, "add", real_add)
    result = run_pipeline(spec)
    assert result.manifest["status"] == "complete" and result.manifest["totals"]["in"] == 30
    last = result.manifest["attempts"][-1]
    shards = result.manifest["input"]["shards"]
    assert shards == 3 and committed + last["shards_processed"] + last["shards_recovered"] == shards  # each once


def test_empty_input_completes_with_zero_rows(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    spec = parse_spec({"name": "empty", "input": {"path": str(tmp_path / "in.jsonl")}, "output": str(tmp_path / "run"),
                       "stages": [download_stage()]})
    result = run_pipeline(spec)
    assert result.manifest["totals"] == {"in": 0, "kept": 0, "rejected": 0}
    assert result.manifest["status"] == "complete"


def test_barrier_decision_reads_what_the_previous_segment_kept(ray_local, tmp_path):
    """Shard a lost every row before the barrier (its marker lists no parts); shard b kept four."""
    from dataengine.engine.runner import _barrier_decision
    from dataengine.engine.segments import plan_segments
    from dataengine.io.shard_plan import Shard

    spec = parse_spec({"name": "b", "input": {"path": "x"}, "output": str(tmp_path),
                       "stages": [download_stage(), {"op": "clip_score_filter", "keep_top_fraction": 0.5}]})
    segments = plan_segments(list(spec.stages))
    state = tmp_path / "_state" / "segment-0"
    state.mkdir(parents=True)
    pq.write_table(pa.table({C.UID: ["b1", "b2", "b3", "b4"], C.CLIP_SCORE: pa.array([0.1, 0.9, 0.5, 0.7], pa.float32())}),
                   tmp_path / "b-rows.parquet")
    (state / "a.json").write_text(json.dumps({"next": []}))
    (state / "b.json").write_text(json.dumps({"next": ["b-rows.parquet"]}))
    shards = [Shard("a", 2, tmp_path / "a.parquet"), Shard("b", 4, tmp_path / "b.parquet")]
    decision = _barrier_decision(tmp_path, segments[1], segments, spec.stages[1], shards)
    assert decision["rows"] == 4 and decision["keep"] == 2 and decision["uid"] == "b4"
    assert json.loads((tmp_path / "_state" / "decision-1.json").read_text()) == decision


def test_resume_after_a_failure_past_a_barrier_keeps_segment_work_and_the_decision(ray_local, tmp_path, monkeypatch):
    """Captions only (no network): caption rules, then a perplexity quantile (a barrier), then the rules
    again in the last segment, where the driver fails the first time (its read tasks commit their shards)."""
    import dataengine.engine.runner as runner
    from dataengine.testbed.synthweb.models import build_random_causal_lm

    captions = [f"a red circle and {k} blue squares" for k in range(24)] + ["x", "img_001.jpg"] * 3
    lm = build_random_causal_lm(tmp_path / "lm", captions * 5)
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(30)], "caption": captions}), tmp_path / "in.parquet")
    spec = parse_spec({"name": "barrier", "input": {"path": str(tmp_path / "in.parquet"), "shard_rows": 10},
                       "output": str(tmp_path / "run"), "stages": [
                           {"op": "caption_rules_filter"},
                           {"op": "perplexity_filter", "model": str(lm), "keep_lowest_fraction": 0.5},
                           {"op": "caption_rules_filter", "name": "rules_again"}]})
    real_add = runner.SegmentProgress.add

    def fail_in_the_last_segment(self, rows, rejected):
        if self.key.endswith("segment-1"):
            raise OSError("disk full")
        return real_add(self, rows, rejected)

    monkeypatch.setattr(runner.SegmentProgress, "add", fail_in_the_last_segment)
    with pytest.raises(OSError, match="disk full"):
        run_pipeline(spec)
    state = tmp_path / "run" / "_state"
    segment0 = {p.name: p.stat().st_mtime_ns for p in (state / "segment-0").glob("*.json")}
    decision = (state / "decision-1.json").stat().st_mtime_ns
    assert len(segment0) == 3
    committed = len(list((state / "committed").glob("*.json")))  # by read tasks before the driver failed
    assert committed >= 1
    monkeypatch.setattr(runner.SegmentProgress, "add", real_add)
    result = run_pipeline(spec)
    attempt = result.manifest["attempts"][-1]
    # the last segment only: each of its shards committed once, before the failure or now
    assert committed + attempt["shards_processed"] + attempt["shards_recovered"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (state / "segment-0").glob("*.json")} == segment0
    assert (state / "decision-1.json").stat().st_mtime_ns == decision
    by_stage = {s["stage"]: s for s in result.stages}
    assert result.manifest["totals"]["in"] == 30 and by_stage["caption_rules_filter"]["rejected"] == 6
    assert by_stage["perplexity_filter"]["kept"] == 12 and result.manifest["totals"]["kept"] == 12
    kept = pl.read_parquet(tmp_path / "run" / "dataset" / "*.parquet")
    assert kept.height == 12 and kept["uid"].n_unique() == 12 and kept["text_ppl"].null_count() == 0
    assert not (tmp_path / "run" / "_parts").exists()
