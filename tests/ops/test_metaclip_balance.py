"""metaclip_balance: entries matched on word boundaries, head entries sampled down to about t, tail
entries kept whole, the same rows on every run, every row accounted for in a real run."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.core import columns as C
from dataengine.engine.runner import run_pipeline
from dataengine.engine.spec import SpecError, parse_spec
from dataengine.ops.metaclip_balance import EntryMatcher, MetaclipBalance, MetaclipBalanceConfig, draw

ENTRIES = ["cat", "dog", "okapi", "red panda", "new york"]


def _captions() -> list[str]:
    return (["a photo of a cat"] * 400 + ["a dog on the grass"] * 100 + ["a rare okapi"] * 10
            + ["a cat and a dog"] * 50 + ["a red panda in new york"] * 5 + ["nothing to see here"] * 20
            + ["concatenate the pandas"] * 15)


def test_entries_match_whole_words_in_order_each_once():
    match = EntryMatcher(ENTRIES)
    assert match("A Red Panda, in New-York; with a CAT and another cat") == ["red panda", "new york", "cat"]
    assert match("concatenate the pandas") == []  # substrings inside words and partial phrases do not match
    assert match("panda red") == [] and match(None) == [] and match("") == []


def test_head_entries_keep_about_t_rows_tail_entries_keep_all_and_the_draw_is_fixed():
    config = MetaclipBalanceConfig(entries=ENTRIES, t=50, seed=3)
    captions = _captions()
    uids = [f"u{i}" for i in range(len(captions))]
    op = MetaclipBalance(config)
    scored = op.process(pa.table({C.UID: uids, C.CAPTION: captions}))
    reasons = scored.column(C.REJECT_REASON).to_pylist()
    assert reasons.count("metaclip:no_entry") == 35  # "nothing to see here" and "concatenate the pandas"
    alive = pa.table({C.UID: uids, C.METACLIP_ENTRIES: scored.column(C.METACLIP_ENTRIES)}).filter(
        pa.array([r is None for r in reasons]))
    decision = MetaclipBalance.decide(config, alive)
    assert decision == MetaclipBalance.decide(config, alive)  # a hash per (seed, uid, entry): no state
    assert decision["head_entries"] == 2 and decision["largest"]["cat"] == 450 and decision["largest"]["dog"] == 150
    rejected = decision["rejected"]
    kept = [c for u, c, r in zip(uids, captions, reasons) if r is None and u not in rejected]
    assert kept.count("a rare okapi") == 10 and kept.count("a red panda in new york") == 5  # tail: all
    # "a photo of a cat": kept with p = 50/450 each (binomial 400 x 0.111: mean 44, sd 6.3)
    assert 25 <= kept.count("a photo of a cat") <= 65
    # "a cat and a dog": either entry keeps it: p = 1 - (1 - 50/450)(1 - 50/150) = 0.41 (mean 20.4, sd 3.5)
    assert 9 <= kept.count("a cat and a dog") <= 32
    assert all(r in ("metaclip:over_cap:cat", "metaclip:over_cap:dog") for r in rejected.values())
    only_dog = [u for u, c in zip(uids, captions) if c == "a dog on the grass" and u in rejected]
    assert all(rejected[u] == "metaclip:over_cap:dog" for u in only_dog)
    expected_cat = sum(draw(3, u, "cat") < 50 / 450 for u, c in zip(uids, captions) if c == "a photo of a cat")
    assert kept.count("a photo of a cat") == expected_cat
    other_seed = MetaclipBalance.decide(config.model_copy(update={"seed": 4}), alive)["rejected"]
    assert set(other_seed) != set(rejected)


def test_a_run_balances_over_every_shard_and_accounts_for_every_row(ray_local, tmp_path):
    captions = _captions()
    (tmp_path / "entries.json").write_text(json.dumps(ENTRIES))
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(len(captions))], "caption": captions}),
                   tmp_path / "in.parquet")
    spec = {"name": "balance", "input": {"path": str(tmp_path / "in.parquet"), "shard_rows": 100},
            "output": str(tmp_path / "run"), "stages": [
                {"op": "caption_rules_filter"},
                {"op": "metaclip_balance", "entries_file": str(tmp_path / "entries.json"), "t": 50}]}
    result = run_pipeline(parse_spec(spec))
    kept = pl.read_parquet(tmp_path / "run" / "dataset" / "*.parquet")
    rejected = pl.read_parquet(tmp_path / "run" / "rejected" / "*.parquet")
    assert kept.height + rejected.height == len(captions) and kept["uid"].n_unique() == kept.height
    assert set(kept["caption"]) >= {"a rare okapi", "a red panda in new york"}
    assert kept.filter(pl.col("caption") == "a rare okapi").height == 10
    reasons = rejected["reject_reason"].value_counts().to_dicts()
    assert {r["reject_reason"] for r in reasons} <= {"metaclip:no_entry", "metaclip:over_cap:cat",
                                                     "metaclip:over_cap:dog", "caption_rule:min_words"}
    assert kept.filter(pl.col("caption") == "a photo of a cat")["metaclip_entries"].to_list()[0] == ["cat"]
    # the decision is the one the op makes over all rows at once: the same rows, however the run was sharded
    config = MetaclipBalanceConfig(entries=ENTRIES, t=50)
    scored = MetaclipBalance(config).process(pa.table({C.UID: kept["uid"].to_list() + rejected["uid"].to_list(),
                                                       C.CAPTION: kept["caption"].to_list() + rejected["caption"].to_list()}))
    matched = pa.table({C.UID: kept["uid"].to_list() + rejected["uid"].to_list(),
                        C.METACLIP_ENTRIES: scored.column(C.METACLIP_ENTRIES)})
    alive = matched.filter(pa.array([bool(m) for m in scored.column(C.METACLIP_ENTRIES).to_pylist()]))
    assert set(MetaclipBalance.decide(config, alive)["rejected"]) == \
        set(rejected.filter(pl.col("reject_reason").str.starts_with("metaclip:over_cap"))["uid"])
    assert result.manifest["totals"]["kept"] == kept.height


def test_without_an_entry_list_every_caption_word_is_an_entry():
    """Llama 3-style n-gram balancing: a row of only frequent words is sampled down; a rare word keeps it."""
    config = MetaclipBalanceConfig(t=5)
    captions = ["a red circle"] * 40 + ["a red okapi"] * 3
    uids = [f"u{i}" for i in range(len(captions))]
    scored = MetaclipBalance(config).process(pa.table({C.UID: uids, C.CAPTION: captions}))
    assert scored.column(C.METACLIP_ENTRIES).to_pylist()[0] == ["a", "red", "circle"]
    rejected = MetaclipBalance.decide(config, pa.table({C.UID: uids, C.METACLIP_ENTRIES: scored.column(C.METACLIP_ENTRIES)}))
    assert not any(uids[i] in rejected["rejected"] for i in range(40, 43))  # "okapi": 3 <= t
    assert 20 <= sum(u in rejected["rejected"] for u in uids[:40]) <= 40


def test_entry_list_errors_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="entries \\(inline\\) or entries_file, not both"):
        parse_spec({"name": "b", "input": {"path": "x.parquet"}, "output": "o",
                    "stages": [{"op": "metaclip_balance", "entries": ["cat"], "entries_file": "e.txt"}]})
    (tmp_path / "bad.json").write_text('{"cat": 1}')
    with pytest.raises(ValueError, match="must hold a JSON list of strings"):
        MetaclipBalance(MetaclipBalanceConfig(entries_file=str(tmp_path / "bad.json")))
    with pytest.raises(FileNotFoundError, match="entries_file .*missing.txt does not exist"):
        MetaclipBalance(MetaclipBalanceConfig(entries_file=str(tmp_path / "missing.txt")))
    (tmp_path / "entries.txt").write_text("cat\n\n  dog  \n")
    assert MetaclipBalance(MetaclipBalanceConfig(entries_file=str(tmp_path / "entries.txt"))).match("dog and cat") == \
        ["dog", "cat"]
    with pytest.raises(ValueError, match="text_column 'caption_best' is not a column"):
        MetaclipBalance(MetaclipBalanceConfig(entries=["cat"], text_column="caption_best")).process(
            pa.table({C.UID: ["a"], C.CAPTION: ["cat"]}))
