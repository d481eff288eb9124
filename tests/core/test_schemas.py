"""The Arrow schemas users query against: every written table is conformed to them, and a column
outside them is an error that says where to add it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dataengine.core import columns as C
from dataengine.core.schemas import SchemaMismatch, conform, parse_type, rejected_schema, sample_schema


def test_conform_orders_casts_fills_and_drops_internal_columns():
    table = pa.table({C.CLIP_SCORE: pa.array([0.5, None], pa.float64()), C.UID: ["0-1", "0-2"],
                      C.SHARD: ["000000", "000000"]})
    out = conform(table, sample_schema())
    assert out.schema == sample_schema()
    assert out.column(C.UID).to_pylist() == ["0-1", "0-2"]
    assert out.column(C.CLIP_SCORE).type == pa.float32() and out.column(C.CLIP_SCORE).to_pylist() == [0.5, None]
    assert out.column(C.CAPTION).null_count == 2  # a stage that never ran: nulls, not a missing column
    assert C.SHARD not in out.column_names


def test_an_unknown_column_names_itself_and_the_schema_files():
    with pytest.raises(SchemaMismatch, match=r"columns \['my_score'\] are not in the sample schema; add them to schemas/"):
        conform(pa.table({C.UID: ["a"], "my_score": [1.0]}), sample_schema())


def test_nulls_in_a_required_column_and_uncastable_values_are_errors():
    with pytest.raises(SchemaMismatch, match="'uid' has 1 nulls but is not nullable"):
        conform(pa.table({C.UID: pa.array([None, "b"], pa.string())}), sample_schema())
    with pytest.raises(SchemaMismatch, match="required column 'uid' is missing"):
        conform(pa.table({C.CAPTION: ["x"]}), sample_schema())
    with pytest.raises(SchemaMismatch, match="column 'width': cannot cast"):
        conform(pa.table({C.UID: ["a"], "width": ["wide"]}), sample_schema())


def test_the_rejected_schema_is_the_sample_plus_the_reason():
    sample, rejected = sample_schema(), rejected_schema()
    assert rejected.names[:len(sample.names)] == sample.names
    assert {C.REJECT_STAGE, C.REJECT_REASON} <= set(rejected.names) - set(sample.names)


def test_the_type_language():
    assert parse_type("list<float32>") == pa.list_(pa.float32())
    assert parse_type(" string ") == pa.string()
    with pytest.raises(ValueError, match="unknown type 'float128'"):
        parse_type("float128")


def test_a_checkout_finds_its_schema_files_from_any_directory(tmp_path, monkeypatch):
    """The first place looked in is `schemas/` beside the package, wherever the process runs."""
    from dataengine.core import schemas

    monkeypatch.chdir(tmp_path)
    assert (schemas._CANDIDATE_DIRS[0] / "sample.schema.json").is_file()
