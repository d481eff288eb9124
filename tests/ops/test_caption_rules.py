"""caption_rules_filter: each rule fires on what it is for, and clean captions pass."""

import polars as pl
import pyarrow as pa
import pytest

from dataengine.core import columns as C
from dataengine.ops import apply_stage
from dataengine.ops.caption_rules import CaptionRulesConfig, CaptionRulesFilter

OP = CaptionRulesFilter(CaptionRulesConfig())


@pytest.mark.parametrize("caption,rule", [
    ("a red circle on a white background", None),
    ("Two dogs playing in the snow.", None),
    (None, "empty"), ("   ", "empty"),
    ("IMG_0231.JPG", "filename"), ("DSC01234.jpg", "filename"), ("holiday photo (2).png", "filename"),
    ("IMG_20190704 at the beach", "filename"),
    ("see https://example.com/cat for more", "url"), ("visit www.shop.example today", "url"),
    ("Stock photo of a red car", "boilerplate"), ("click here to download", "boilerplate"),
    ("Photo by user8748", "boilerplate"),
    ("cat", "min_words"), ("a cat", "min_words"), ("a b c", "min_chars"),
    ("word " * 201, "max_words"),
    ("the supercalifragilisticexpialidocious cat sat", "max_word_chars"),
    ("sooooooo cute little kitten", "char_run"),
    ("#$% 12 ab ?! 99 ~~", "alpha_ratio"),
    ("x7#k 2!q9 z$3", "alpha_ratio"),
])
def test_each_rule(caption, rule):
    assert OP.broken_rule(caption) == rule


def test_rules_can_be_switched_off():
    op = CaptionRulesFilter(CaptionRulesConfig(min_words=None, min_chars=None, boilerplate=[], reject_filenames=False))
    assert op.broken_rule("cat") is None and op.broken_rule("IMG_0231.JPG") != "filename"
    assert op.broken_rule("stock photo") is None


def test_reasons_name_the_rule_in_the_batch():
    batch = pa.table({C.UID: ["a", "b", "c"], C.CAPTION: ["a red circle", "IMG_0001.JPG", None]})
    out = apply_stage(OP, batch, "rules", 0)
    assert out.column(C.REJECT_REASON).to_pylist() == [None, "caption_rule:filename", "caption_rule:empty"]
    assert out.column(C.REJECT_STAGE).to_pylist() == [None, "rules", "rules"]


def test_on_the_synthetic_web_rules_catch_boilerplate_and_spare_true_captions(synthweb_dir):
    truth = pl.read_parquet(synthweb_dir / "truth.parquet")
    fired = truth.with_columns(rule=pl.col("caption").map_elements(OP.broken_rule, return_dtype=pl.String))
    clean = fired.filter(pl.col("caption_noise").is_in(["none", "mismatched"]))
    boilerplate = fired.filter(pl.col("caption_noise") == "boilerplate")
    assert clean["rule"].null_count() == clean.height  # no true caption is rejected
    assert boilerplate.height and boilerplate["rule"].null_count() == 0  # every boilerplate caption is
