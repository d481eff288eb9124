"""The Arrow schemas in `schemas/`: the contract users query against.

Every Parquet file a run writes is conformed to one of these schemas, so all shards of a run (and
all runs of one version) read as one table. A stage that adds a column adds it to
`schemas/sample.schema.json` too; a column that is in a table but not in the schema is an error,
not a silent extra.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import pyarrow as pa

from dataengine.core import columns as C

# In a checkout, `schemas/` beside the package; in a wheel install, `<prefix>/share/dataengine/schemas`
# (pyproject's data-files).
# (and in a Ray job's working directory, `dataengine submit` puts a copy in `./schemas`)
_CANDIDATE_DIRS = (Path(__file__).resolve().parents[2] / "schemas", Path(sys.prefix) / "share" / "dataengine" / "schemas",
                   Path.cwd() / "schemas")
SCHEMA_DIR = next((d for d in _CANDIDATE_DIRS if d.is_dir()), _CANDIDATE_DIRS[0])

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}


class SchemaMismatch(ValueError):
    """A table does not fit the schema it is written under."""


def parse_type(spec: str) -> pa.DataType:
    """Parse the small type language of the schema files: scalars and `list<scalar>`.

    Examples:
        >>> parse_type("list<float32>")
        ListType(list<item: float>)
    """
    spec = spec.strip()
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(parse_type(spec[5:-1]))
    if spec not in _SCALAR_TYPES:
        raise ValueError(f"unknown type {spec!r} in schema file (known: {sorted(_SCALAR_TYPES)}, list<...>)")
    return _SCALAR_TYPES[spec]


def _schema_dir() -> Path:
    if not SCHEMA_DIR.is_dir():
        raise FileNotFoundError(f"schema files not found; looked in {', '.join(map(str, _CANDIDATE_DIRS))}")
    return SCHEMA_DIR


def _load_fields(name: str) -> list[pa.Field]:
    doc = json.loads((_schema_dir() / name).read_text())
    fields = _load_fields(doc["extends"]) if "extends" in doc else []
    for f in doc["fields"]:
        fields.append(
            pa.field(f["name"], parse_type(f["type"]), nullable=f.get("nullable", True),
                     metadata={"doc": f.get("doc", "")})
        )
    return fields


@cache
def sample_schema() -> pa.Schema:
    """Schema of a kept row (`dataset/`)."""
    return pa.schema(_load_fields("sample.schema.json"))


@cache
def rejected_schema() -> pa.Schema:
    """Schema of a rejected row (`rejected/`): the sample plus `reject_stage`, `reject_reason`."""
    return pa.schema(_load_fields("rejected.schema.json"))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return `table` with exactly the schema's columns, order and types.

    Internal columns (leading underscore) are dropped; columns the stages never reached are filled
    with nulls; an unknown column or a null in a non-nullable column raises `SchemaMismatch`.
    """
    present = [n for n in table.column_names if not n.startswith(C.INTERNAL_PREFIX)]
    unknown = sorted(set(present) - set(schema.names))
    if unknown:
        raise SchemaMismatch(
            f"columns {unknown} are not in the {schema_name(schema)} schema; add them to schemas/ "
            f"(known: {schema.names})"
        )
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaMismatch(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {e}") from e
            if not field.nullable and col.null_count:
                raise SchemaMismatch(f"column {field.name!r} has {col.null_count} nulls but is not nullable")
            arrays.append(col)
        else:
            if not field.nullable and table.num_rows:
                raise SchemaMismatch(f"required column {field.name!r} is missing")
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def schema_name(schema: pa.Schema) -> str:
    return "rejected" if C.REJECT_REASON in schema.names else "sample"
