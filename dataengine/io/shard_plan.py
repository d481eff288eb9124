"""Cut the input into shards, the unit of commit and resume, reading it in tasks a piece at a time.

The plan is written once per run directory (`_shards/plan.json`, its commit point, plus one small
Parquet per shard holding uid, url, caption, source id) and reused on rerun, so a resumed run sees
exactly the rows and uids it saw the first time. Rows are never dropped here: a repeated `id_col`
value is marked rejected (`duplicate_id`, stage `input`) and travels with the rest.

Parquet input without `id_col` is not copied: a shard is a pointer (`<shard>.json`) to its rows in
the input files, cut from the files' footers, and the task that processes the shard reads them
(`read_shard`), each row given its uid there. Any other input (CSV, TSV, JSONL, or `id_col`, whose
repeats are found across the whole input) is copied into shards as Parquet, as follows.

How it scales: one task per piece (an input file, or a run of a Parquet file's row groups) reads it,
gives each row its uid (`<file>-<row in file>`, so uid order is input order) and writes it back as a
normalised piece, and, with `id_col`, writes (id, uid) into hash partitions; one task per partition
finds the repeated ids (the first occurrence, smallest uid, stays); one task per run of shards cuts
them from the pieces. The planner itself holds file names and row counts; a task holds one piece.
Inputs up to SMALL_INPUT_BYTES (~100k caption rows) are planned in the calling process: the same steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.atomic import write_parquet_atomic, write_text_atomic
from dataengine.io.inputs import (
    InputError,
    InputSpec,
    file_format,
    parquet_rows,
    read_input_file,
    read_parquet_rows,
    resolve_files,
)

log = logging.getLogger(__name__)

INPUT_STAGE = "input"
SHARD_DIR = "_shards"
FILE_DIGITS, ROW_DIGITS = 4, 10  # a uid: `<file>-<row in file>`, zero-padded so uid order is input order


def row_uid(file_index: int, row: int) -> str:
    """The uid of one input row (`_uids` writes the same for a run of rows, as an Arrow column)."""
    return f"{file_index:0{FILE_DIGITS}d}-{row:0{ROW_DIGITS}d}"


#: rows a piece task reads at once (a Parquet file's row groups are grouped up to this)
PIECE_ROWS = 1_000_000
#: (id, uid) rows per duplicate-id partition
ID_PARTITION_ROWS = 2_000_000
SHARDS_PER_TASK = 64
#: inputs up to this size are planned where `plan_shards` is called (tasks' start-up would be most of a
#: small run's fixed cost: ~3 s here for 5,000 rows). Measured: a 16 MB Parquet of 1M captions took the
#: driver from 282 to 675 MiB; 2 MB (~100k caption rows) costs it ~50 MB
SMALL_INPUT_BYTES = 2 << 20
#: a shard that points at its rows in Parquet input files, read by the task that processes it
POINTER_SUFFIX = ".json"
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    id: str
    rows: int
    path: Path


@dataclass(frozen=True)
class Piece:
    """Rows of one input file: all of it, or some of a Parquet file's row groups."""

    file_index: int
    path: Path
    first_row: int  # the piece's first row within its file
    row_groups: tuple[int, ...] | None  # None: the whole file

    @property
    def name(self) -> str:
        return row_uid(self.file_index, self.first_row)  # its first row's uid


def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / SHARD_DIR / "plan.json"


def plan_shards(spec: InputSpec, run_dir: Path, in_task: bool = False) -> list[Shard]:
    """The shard plan a previous attempt wrote, or a new one. With `in_task`, Ray tasks read an input
    over SMALL_INPUT_BYTES and write the shards (the caller, the driver, sees names and counts);
    otherwise the same steps run here one after another."""
    files = [f.resolve() for f in resolve_files(spec)]  # here: a task's working directory may differ
    each = _tasks if in_task and sum(f.stat().st_size for f in files) > SMALL_INPUT_BYTES else _loop
    fingerprint = each(_fingerprint, [(files, spec)])[0]
    shard_dir = Path(run_dir) / SHARD_DIR
    if plan_path(run_dir).exists():
        plan = json.loads(plan_path(run_dir).read_text())
        if plan["fingerprint"] != fingerprint:
            raise InputError(
                f"input.path: the input files or input settings changed since {run_dir} was started "
                f"(plan {plan['fingerprint']}, now {fingerprint}); use a new output directory"
            )
        suffix = plan.get("shard_suffix", ".parquet")
        shards = [Shard(s["id"], s["rows"], shard_dir / f"{s['id']}{suffix}") for s in plan["shards"]]
        if suffix == POINTER_SUFFIX and plan["files"] != [str(f) for f in files]:  # the same bytes, moved
            each(_repoint, [(run, files) for run in _runs([s.path for s in shards])])
            write_text_atomic(plan_path(run_dir), json.dumps({**plan, "files": [str(f) for f in files]}, indent=2))
        return shards
    if spec.id_col is None and all(file_format(f, spec) == "parquet" for f in files):
        pieces = [Piece(i, f, 0, None) for i, f in enumerate(files)]
        counts = each(parquet_rows, [(f, spec) for f in files])
        runs = _runs(_cut(pieces, counts, spec.shard_rows))
        shards = [s for run in each(_write_pointers, [(run, files, spec, shard_dir) for run in runs]) for s in run]
    else:
        pieces, counts, shards = _copy_into_shards(files, spec, shard_dir, each)
    for piece, rows in zip(pieces, counts):
        log.info("input %s (from row %d): %d rows", piece.path, piece.first_row, rows)
    total = sum(counts)
    plan = {"fingerprint": fingerprint, "files": [str(f) for f in files], "total_rows": total,
            "shard_rows": spec.shard_rows, "shard_suffix": shards[0].path.suffix if shards else ".parquet",
            "shards": [{"id": s.id, "rows": s.rows} for s in shards]}
    write_text_atomic(plan_path(run_dir), json.dumps(plan, indent=2))
    if not total:
        log.warning("input %s has no rows", spec.path)
    return shards


def _copy_into_shards(files: list[Path], spec: InputSpec, shard_dir: Path,
                      each: Callable[..., list]) -> tuple[list[Piece], list[int], list[Shard]]:
    """Read every piece (uids given, ids partitioned), find the repeated ids, write the shards."""
    work = shard_dir / "_pieces"
    shutil.rmtree(work, ignore_errors=True)
    pieces = [p for group in each(_pieces_of, [(i, f, spec) for i, f in enumerate(files)]) for p in group]
    partitions = 0
    if spec.id_col:  # sized from the files' bytes: a piece does not know the total rows when it writes
        partitions = max(1, sum(f.stat().st_size for f in files) // (ID_PARTITION_ROWS * 64))
    counts = each(_read_piece, [(p, spec, work, partitions) for p in pieces])
    each(_find_repeated_ids, [(work, k) for k in range(partitions)])
    runs = _runs(_cut(pieces, counts, spec.shard_rows))
    shards = [s for run in each(_write_shards, [(run, work, shard_dir, partitions > 0) for run in runs]) for s in run]
    shutil.rmtree(work, ignore_errors=True)
    return pieces, counts, shards


def _runs(cuts: list[T]) -> list[list[T]]:
    return [cuts[i:i + SHARDS_PER_TASK] for i in range(0, len(cuts), SHARDS_PER_TASK)]


def read_shard(path: str | Path) -> pa.Table:
    """A shard's rows as the pipeline's first segment reads them: uid, url, caption, source_id, boxes,
    reject_stage and reject_reason (set for repeated ids), shard."""
    path = Path(path)
    if path.suffix != POINTER_SUFFIX:
        return pq.read_table(path)
    pointer = json.loads(path.read_text())
    spec = InputSpec(**pointer["input"])
    tables = [_with_uids(read_parquet_rows(Path(r["path"]), spec, r["start"], r["rows"]), r["file_index"], r["start"])
              for r in pointer["ranges"]]
    return _as_shard(pa.concat_tables(tables), pointer["shard"], None)


def shard_uids(path: str | Path) -> pa.Array:
    """The uids of a shard's rows, without reading the rows where the shard points into the input."""
    path = Path(path)
    if path.suffix != POINTER_SUFFIX:
        return pq.read_table(path, columns=[C.UID]).column(C.UID).combine_chunks()
    ranges = json.loads(path.read_text())["ranges"]
    return pa.concat_arrays([_uids(r["file_index"], r["start"], r["rows"]) for r in ranges]) if ranges \
        else pa.array([], pa.string())


def _repoint(pointers: list[Path], files: list[Path]) -> None:
    """Point shards at where their input files are now (a rerun with the same files under another path)."""
    for path in pointers:
        pointer = json.loads(path.read_text())
        for entry in pointer["ranges"]:
            entry["path"] = str(files[entry["file_index"]])
        write_text_atomic(path, json.dumps(pointer))


def _write_pointers(run: list[tuple[str, list[tuple[str, int, int]]]], files: list[Path], spec: InputSpec,
                    shard_dir: Path) -> list[Shard]:
    """Write a run of consecutive shards as pointers to their rows in the input files."""
    shards = []
    for shard_id, ranges in run:
        entries = []
        for name, offset, rows in ranges:
            file_index = int(name.split("-")[0])  # a whole file is one piece: offset is the row in the file
            entries.append({"path": str(files[file_index]), "file_index": file_index, "start": offset,
                            "rows": rows})
        path = shard_dir / f"{shard_id}{POINTER_SUFFIX}"
        write_text_atomic(path, json.dumps({"shard": shard_id, "input": spec.model_dump(mode="json"),
                                            "ranges": entries}))
        shards.append(Shard(shard_id, sum(e["rows"] for e in entries), path))
    return shards


def _loop(fn: Callable[..., T], args: list[tuple]) -> list[T]:
    return [fn(*a) for a in args]


def _tasks(fn: Callable[..., T], args: list[tuple]) -> list[T]:
    from dataengine.core import raytools  # Ray is imported only where tasks run

    return raytools.get([raytools.submit(fn, *a) for a in args])


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


def _pieces_of(index: int, path: Path, spec: InputSpec) -> list[Piece]:
    """A Parquet file's row groups in runs of about PIECE_ROWS (from its footer); any other file whole."""
    if file_format(path, spec) != "parquet":
        return [Piece(index, path, 0, None)]
    try:
        meta = pq.read_metadata(path)
    except Exception as e:
        raise InputError(f"input.path: cannot read {path} as parquet: {type(e).__name__}: {e}") from None
    pieces, groups, first, rows = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows - first >= PIECE_ROWS:
            pieces.append(Piece(index, path, first, tuple(groups)))
            groups, first = [], rows
    if groups or not pieces:
        pieces.append(Piece(index, path, first, tuple(groups)))
    return pieces


def _read_piece(piece: Piece, spec: InputSpec, work: Path, partitions: int) -> int:
    """Read a piece, give its rows their uids, write it normalised, and its ids into their partitions."""
    table = _with_uids(read_input_file(piece.path, spec, piece.row_groups), piece.file_index, piece.first_row)
    write_parquet_atomic(table, work / f"{piece.name}.parquet")
    if partitions:
        ids = table.select([C.UID, C.SOURCE_ID]).filter(pc.is_valid(table.column(C.SOURCE_ID)))
        keys = np.array([zlib.crc32(v.encode()) % partitions for v in ids.column(C.SOURCE_ID).to_pylist()], np.int64)
        for k in np.unique(keys):
            write_parquet_atomic(ids.filter(pa.array(keys == k)), work / f"ids-{k}" / f"{piece.name}.parquet")
    return table.num_rows


def _uids(file_index: int, first_row: int, rows: int) -> pa.Array:
    """The uids of `rows` consecutive rows of one input file (`row_uid`'s, as an Arrow column)."""
    return pc.binary_join_element_wise(
        pa.array([f"{file_index:0{FILE_DIGITS}d}"] * rows, pa.string()),
        pc.utf8_lpad(pa.array(np.arange(first_row, first_row + rows)).cast(pa.string()), ROW_DIGITS, "0"), "-")


def _with_uids(table: pa.Table, file_index: int, first_row: int) -> pa.Table:
    return table.add_column(0, C.UID, _uids(file_index, first_row, table.num_rows))


def _find_repeated_ids(work: Path, partition: int) -> int:
    """The uids whose id appeared before (at a smaller uid), for one partition of ids."""
    files = sorted((work / f"ids-{partition}").glob("*.parquet"))
    ids = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    repeated = pa.array([], pa.string())
    if ids is not None and ids.num_rows:
        ids = ids.sort_by([(C.SOURCE_ID, "ascending"), (C.UID, "ascending")])
        values = ids.column(C.SOURCE_ID).combine_chunks()
        same_as_previous = np.r_[False, pc.equal(values[1:], values[:-1]).to_numpy(zero_copy_only=False)]
        repeated = ids.column(C.UID).filter(pa.array(same_as_previous))
    write_parquet_atomic(pa.table({C.UID: repeated}), work / f"repeated-{partition}.parquet")
    return len(repeated)


def _cut(pieces: list[Piece], counts: list[int], shard_rows: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Shards of `shard_rows` over the pieces in input order: (shard id, [(piece name, offset, rows)])."""
    shards: list[tuple[str, list[tuple[str, int, int]]]] = []
    current: list[tuple[str, int, int]] = []
    room = shard_rows
    for piece, n in zip(pieces, counts):
        offset = 0
        while offset < n:
            take = min(room, n - offset)
            current.append((piece.name, offset, take))
            offset, room = offset + take, room - take
            if room == 0:
                shards.append((f"{len(shards):06d}", current))
                current, room = [], shard_rows
    if current:
        shards.append((f"{len(shards):06d}", current))
    return shards


def _write_shards(run: list[tuple[str, list[tuple[str, int, int]]]], work: Path, shard_dir: Path,
                  with_ids: bool) -> list[Shard]:
    """Write a run of consecutive shards from the pieces, repeated ids marked rejected."""
    repeated = pa.array([], pa.string())
    if with_ids:  # the repeated uids within this run's uid range (uid order is input order)
        lo, hi = _uid_at(run[0][1][0], 0), _uid_at(run[-1][1][-1], run[-1][1][-1][2] - 1)
        found = [pq.read_table(f, filters=[(C.UID, ">=", lo), (C.UID, "<=", hi)]).column(C.UID)
                 for f in sorted(work.glob("repeated-*.parquet"))]
        repeated = pa.chunked_array(found, pa.string()).combine_chunks() if found else repeated
    loaded: dict[str, pa.Table] = {}
    shards = []
    for shard_id, ranges in run:
        parts = []
        for name, offset, rows in ranges:
            if name not in loaded:
                loaded.clear()  # pieces come in order: keep one
                loaded[name] = pq.read_table(work / f"{name}.parquet")
            parts.append(loaded[name].slice(offset, rows))
        table = pa.concat_tables(parts)
        table = _as_shard(table, shard_id, pc.is_in(table.column(C.UID), repeated) if len(repeated) else None)
        path = shard_dir / f"{shard_id}.parquet"
        write_parquet_atomic(table, path)
        shards.append(Shard(shard_id, table.num_rows, path))
    return shards


def _as_shard(table: pa.Table, shard_id: str, repeated: pa.Array | None) -> pa.Table:
    """A shard's columns: its rows, their repeated ids (`repeated`, a mask) marked rejected, its id."""
    marked = repeated if repeated is not None else pa.array(np.zeros(table.num_rows, dtype=bool))
    table = table.append_column(C.REJECT_STAGE, pc.if_else(marked, INPUT_STAGE, pa.scalar(None, pa.string())))
    table = table.append_column(C.REJECT_REASON, pc.if_else(marked, "duplicate_id", pa.scalar(None, pa.string())))
    return table.append_column(C.SHARD, pa.array([shard_id] * table.num_rows, pa.string()))


def _uid_at(piece_range: tuple[str, int, int], k: int) -> str:
    """The uid of row `k` of a (piece name, offset, rows) range."""
    name, offset, _ = piece_range
    file_index, first_row = name.split("-")
    return row_uid(int(file_index), int(first_row) + offset + k)
