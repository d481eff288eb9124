"""Read a URL list (Parquet, CSV, TSV, JSONL): the spec's `input:` and the reading of one file into
the engine's columns. `shard_plan.py` cuts the input into shards."""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from dataengine.core import columns as C

EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
InputFormat = Literal["parquet", "csv", "tsv", "jsonl"]


class InputSpec(BaseModel):
    """Where the URL list is and which columns hold what (img2dataset's column defaults): the spec's `input:`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="A file, a directory, or a glob (`data/*.parquet`).")
    format: InputFormat | None = Field(default=None, description="Default: from the file extension.")
    url_col: str = Field(default="url", min_length=1)
    caption_col: str | None = Field(default="caption", description="Null: the input has no captions.")
    id_col: str | None = Field(default=None, description="The input's own id, kept as `source_id`.")
    boxes_col: str | None = Field(
        default=None, description="Object boxes per image, kept as `boxes` (JSON): a list of "
        "{label, box: [x1, y1, x2, y2] normalised to [0, 1], attributes: {name: value}}.")
    shard_rows: int = Field(default=1000, gt=0, description="Rows per shard, the unit of commit and resume.")

class InputError(ValueError):
    """The input cannot be read as the spec describes; the message names the field and the file."""


def resolve_files(spec: InputSpec) -> list[Path]:
    """The input files, sorted: a file, every known-format file in a directory, or a glob's matches."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (spec.format or p.suffix.lower() in EXTENSIONS)
                       and not p.name.startswith((".", "_")))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise InputError(f"input.path: no input files match {spec.path!r}")
    return files


def file_format(path: Path, spec: InputSpec) -> str:
    if spec.format:
        return spec.format
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"input.format: cannot tell the format of {path} from its extension; set input.format to one of "
            f"parquet, csv, tsv, jsonl"
        )
    return fmt


def read_input_file(path: Path, spec: InputSpec, row_groups: tuple[int, ...] | None = None) -> pa.Table:
    """Read one file (or, for Parquet, some of its row groups) into columns url, caption, source_id,
    boxes (all strings, invalid UTF-8 replaced)."""
    fmt = file_format(path, spec)
    wanted = _wanted_columns(spec)
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
            _check_columns(path, names, spec)
            table = pq.ParquetFile(path).read_row_groups(row_groups, columns=wanted) if row_groups \
                else pq.read_table(path, columns=wanted)
            frame = pl.from_arrow(table)
        elif fmt in ("csv", "tsv"):
            frame = pl.read_csv(path, separator="\t" if fmt == "tsv" else ",", infer_schema=False,
                                encoding="utf8-lossy", quote_char=None if fmt == "tsv" else '"')
            _check_columns(path, frame.columns, spec)
        else:
            text = path.read_bytes().decode("utf-8", errors="replace")
            frame = pl.read_ndjson(io.BytesIO(text.encode()), infer_schema_length=None) if text.strip() else pl.DataFrame()
            if frame.height:
                _check_columns(path, frame.columns, spec)
    except InputError:
        raise
    except Exception as e:  # a library's parse error: say which file, keep its message
        raise InputError(f"input.path: cannot read {path} as {fmt}: {type(e).__name__}: {e}") from None
    assert isinstance(frame, pl.DataFrame)
    return _engine_columns(frame, spec)


def parquet_rows(path: Path, spec: InputSpec) -> int:
    """A Parquet input's row count, from its footer, after checking it has the spec's columns."""
    try:
        meta = pq.read_metadata(path)
        names = meta.schema.to_arrow_schema().names
    except Exception as e:
        raise InputError(f"input.path: cannot read {path} as parquet: {type(e).__name__}: {e}") from None
    _check_columns(path, names, spec)
    return meta.num_rows


#: a process keeps the last row group it decoded, up to this size in memory: shards cut from one large
#: row group (1M rows, a 50k-row shard) are read by the same few workers one after another, and each
#: would otherwise decode the group up to its rows again (~60 ms for 1M captions)
ROW_GROUP_CACHE_BYTES = 256 << 20
_last_group: dict[tuple, pa.Table] = {}


def read_parquet_rows(path: Path, spec: InputSpec, start: int, rows: int) -> pa.Table:
    """Rows [start, start + rows) of a Parquet file, as `read_input_file` gives them. Only the row
    groups that hold them are read (the last one decoded is kept for the next shard of this process)."""
    wanted = _wanted_columns(spec)
    try:
        parquet = pq.ParquetFile(path)
        _check_columns(path, parquet.schema_arrow.names, spec)
        stat = Path(path).stat()
        pieces, position = [], 0
        for g in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if position + n > start and position < start + rows:
                lo = max(start - position, 0)
                pieces.append(_row_group(parquet, g, wanted, (str(path), stat.st_size, stat.st_mtime_ns))
                              .slice(lo, min(n - lo, start + rows - position - lo)))
            position += n
        schema = parquet.schema_arrow.empty_table().select(wanted).schema
        table = pa.concat_tables(pieces) if pieces else schema.empty_table()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"input.path: cannot read {path} as parquet: {type(e).__name__}: {e}") from None
    if table.num_rows != rows:
        raise InputError(f"input.path: {path} has {start + table.num_rows} rows where the plan expects at least "
                         f"{start + rows}; was it rewritten? Use a new output directory")
    strings = (pa.string(), pa.large_string(), pa.null())
    if all(table.schema.field(c).type in strings for c in wanted):  # the usual URL list: no conversion to make
        return pa.table({name: table.column(col).cast(pa.string()) if col else pa.nulls(table.num_rows, pa.string())
                         for name, col in ((C.URL, spec.url_col), (C.CAPTION, spec.caption_col),
                                           (C.SOURCE_ID, spec.id_col), (C.BOXES, spec.boxes_col))})
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return _engine_columns(frame, spec)


def _row_group(parquet: pq.ParquetFile, g: int, columns: list[str], file_key: tuple) -> pa.Table:
    """Row group `g`, decoded in batches (a third of `read_row_group`'s time here), the last one kept.

    The kept group is keyed by the file's path, size and mtime and by the group's own footer entry (its
    columns' offsets, sizes and min/max statistics, ~70 us to read): a file rewritten within one mtime tick
    with the same size still differs there."""
    key = (*file_key, g, tuple(columns), repr(parquet.metadata.row_group(g).to_dict()))
    if key in _last_group:
        return _last_group[key]
    table = pa.Table.from_batches(list(parquet.iter_batches(batch_size=65_536, row_groups=[g], columns=columns)),
                                  parquet.schema_arrow.empty_table().select(columns).schema)
    _last_group.clear()
    if parquet.metadata.row_group(g).total_byte_size <= ROW_GROUP_CACHE_BYTES:
        _last_group[key] = table
    return table


def _engine_columns(frame: pl.DataFrame, spec: InputSpec) -> pa.Table:
    n = frame.height
    return pa.table({
        C.URL: _as_strings(frame, spec.url_col, n),
        C.CAPTION: _as_strings(frame, spec.caption_col, n),
        C.SOURCE_ID: _as_strings(frame, spec.id_col, n),
        C.BOXES: _as_json_strings(frame, spec.boxes_col, n),
    })


def _wanted_columns(spec: InputSpec) -> list[str]:
    """The input columns the spec names (url, caption, id, boxes), in that order."""
    return [c for c in (spec.url_col, spec.caption_col, spec.id_col, spec.boxes_col) if c]


def _check_columns(path: Path, names: list[str], spec: InputSpec) -> None:
    for field, col in (("url_col", spec.url_col), ("caption_col", spec.caption_col), ("id_col", spec.id_col),
                       ("boxes_col", spec.boxes_col)):
        if col and col not in names:
            hint = " (set input.caption_col: null if the input has no captions)" if field == "caption_col" else ""
            raise InputError(f"input.{field}: column {col!r} not found in {path} (columns: {names}){hint}")


def _as_strings(frame: pl.DataFrame, col: str | None, n: int) -> pa.Array:
    if not col or col not in frame.columns:
        return pa.nulls(n, pa.string())
    series = frame.get_column(col)
    if series.dtype == pl.Binary:
        values = [None if v is None else v.decode("utf-8", errors="replace") for v in series.to_list()]
        return pa.array(values, pa.string())
    if series.dtype != pl.String:
        series = series.cast(pl.String, strict=False)
    return series.to_arrow().cast(pa.string())


def _as_json_strings(frame: pl.DataFrame, col: str | None, n: int) -> pa.Array:
    """Nested values (a list of box structs) as JSON text; strings are taken as JSON already."""
    if not col or col not in frame.columns:
        return pa.nulls(n, pa.string())
    series = frame.get_column(col)
    if series.dtype in (pl.String, pl.Binary):
        return _as_strings(frame, col, n)
    return pa.array([None if v is None else json.dumps(v) for v in series.to_list()], pa.string())
