"""Read a URL list (Parquet, CSV, TSV, JSONL) and cut it into shards, the unit of commit and resume.

The plan is written once per run directory (`_shards/plan.json` plus one small Parquet per shard
holding uid, url, caption, source id) and reused on rerun, so a resumed run sees exactly the rows and
uids it saw the first time. Rows are never dropped here: a repeated `id_col` value is marked
rejected (`duplicate_id`, stage `input`) and travels with the rest.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from dataengine.core import columns as C
from dataengine.core.atomic import write_parquet_atomic, write_text_atomic

log = logging.getLogger(__name__)

INPUT_STAGE = "input"
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SHARD_DIR = "_shards"
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


@dataclass(frozen=True)
class Shard:
    id: str
    rows: int
    path: Path


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


def read_input_file(path: Path, spec: InputSpec) -> pa.Table:
    """Read one file into columns url, caption, source_id (all strings, invalid UTF-8 replaced)."""
    fmt = file_format(path, spec)
    wanted = [c for c in (spec.url_col, spec.caption_col, spec.id_col, spec.boxes_col) if c]
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
            _check_columns(path, names, spec)
            frame = pl.from_arrow(pq.read_table(path, columns=wanted))
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
    n = frame.height
    return pa.table({
        C.URL: _as_strings(frame, spec.url_col, n),
        C.CAPTION: _as_strings(frame, spec.caption_col, n),
        C.SOURCE_ID: _as_strings(frame, spec.id_col, n),
        C.BOXES: _as_json_strings(frame, spec.boxes_col, n),
    })


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


def _fingerprint(files: list[Path], spec: InputSpec) -> str:
    """Hash of the input settings and the input files' bytes (not their mtimes: a rewrite of the same
    list, as the demo does on every start, is the same input)."""
    h = hashlib.sha256(json.dumps(spec.model_dump(mode="json", exclude={"path"}), sort_keys=True).encode())
    for f in files:
        h.update(f"{f.name}|{f.stat().st_size}\n".encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / SHARD_DIR / "plan.json"


def plan_shards(spec: InputSpec, run_dir: Path, in_task: bool = False) -> list[Shard]:
    """Read the input once and write the shard plan, or reuse the plan a previous attempt wrote. With
    `in_task`, a Ray task reads the input and writes the shards: the caller (the driver) gets the plan."""
    files = resolve_files(spec)
    fingerprint = _fingerprint(files, spec)
    shard_dir = run_dir / SHARD_DIR
    if plan_path(run_dir).exists():
        plan = json.loads(plan_path(run_dir).read_text())
        if plan["fingerprint"] != fingerprint:
            raise InputError(
                f"input.path: the input files or input settings changed since {run_dir} was started "
                f"(plan {plan['fingerprint']}, now {fingerprint}); use a new output directory"
            )
        return [Shard(s["id"], s["rows"], shard_dir / f"{s['id']}.parquet") for s in plan["shards"]]
    if in_task:
        from dataengine.core import raytools

        return raytools.get(raytools.submit(write_plan, spec, run_dir, files, fingerprint))
    return write_plan(spec, run_dir, files, fingerprint)


def write_plan(spec: InputSpec, run_dir: Path, files: list[Path], fingerprint: str) -> list[Shard]:
    """Read every input file, give each row its uid, mark repeated ids, write the shards and the plan."""
    shard_dir = run_dir / SHARD_DIR
    tables = []
    for index, path in enumerate(files):
        table = read_input_file(path, spec)
        uids = [f"{index:04d}-{row:010d}" for row in range(table.num_rows)]
        tables.append(table.add_column(0, C.UID, pa.array(uids, pa.string())))
        log.info("input %s: %d rows", path, table.num_rows)
    rows = pa.concat_tables(tables) if tables else pa.table({})
    rows = _mark_duplicate_ids(rows)
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, rows.num_rows, spec.shard_rows):
        shard_id = f"{start // spec.shard_rows:06d}"
        part = rows.slice(start, spec.shard_rows)
        part = part.append_column(C.SHARD, pa.array([shard_id] * part.num_rows, pa.string()))
        path = shard_dir / f"{shard_id}.parquet"
        write_parquet_atomic(part, path)
        shards.append(Shard(shard_id, part.num_rows, path))
    plan = {
        "fingerprint": fingerprint, "files": [str(f) for f in files], "total_rows": rows.num_rows,
        "shard_rows": spec.shard_rows, "shards": [{"id": s.id, "rows": s.rows} for s in shards],
    }
    write_text_atomic(plan_path(run_dir), json.dumps(plan, indent=2))
    if not rows.num_rows:
        log.warning("input %s has no rows", spec.path)
    return shards


def _mark_duplicate_ids(rows: pa.Table) -> pa.Table:
    """Reject every repeat of an `id_col` value after its first occurrence, as stage `input`."""
    seen: set[str] = set()
    reasons: list[str | None] = []
    for value in rows.column(C.SOURCE_ID).to_pylist():
        repeated = value is not None and value in seen
        reasons.append("duplicate_id" if repeated else None)
        if value is not None:
            seen.add(value)
    stages = [INPUT_STAGE if r else None for r in reasons]
    return rows.append_column(C.REJECT_STAGE, pa.array(stages, pa.string())).append_column(
        C.REJECT_REASON, pa.array(reasons, pa.string()))
