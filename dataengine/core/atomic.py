"""Atomic file writes: write to a temporary name in the same directory, then rename.

A reader (or a resumed run) sees a whole file or no file, never half of one, even after `kill -9`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


#: bytes per Parquet row group (in memory, before encoding). Rows that carry image bytes (tens of kB
#: each) get small groups, so a reader fetches a few rows' images (the report, a sample in polars)
#: without reading a whole file's images, as Hugging Face datasets does for image data; caption-only
#: rows get large ones, since every group costs its own column chunks: a 40k-row, 40-column caption
#: part in 256-row groups took 0.15 s to write and 0.15 s to read, in 40k-row groups 0.034 s and 0.014 s.
ROW_GROUP_BYTES = 8 << 20
#: the bounds on rows per group: a row of images alone never gets a group of its own, and no group is
#: larger than a shard of captions
ROW_GROUP_ROWS, ROW_GROUP_MAX_ROWS = 256, 1 << 17


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group for `table`: about ROW_GROUP_BYTES each, within the bounds above."""
    per_row = table.nbytes / max(table.num_rows, 1)
    return int(min(max(ROW_GROUP_BYTES // max(per_row, 1), ROW_GROUP_ROWS), ROW_GROUP_MAX_ROWS))


def write_parquet_atomic(table: pa.Table, path: Path, **options: Any) -> None:
    """`options` go to `pq.write_table` (row groups of about ROW_GROUP_BYTES unless given)."""
    options.setdefault("row_group_size", row_group_rows(table))
    _write_then_rename(path, lambda tmp: pq.write_table(table, tmp, **options))


def write_text_atomic(path: Path, text: str) -> None:
    _write_then_rename(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_then_rename(path: Path, write: Callable[[Path], object]) -> None:
    """A write that fails (a bad table, a full disk) leaves the old file and no temporary behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temporaries a killed writer left behind; return how many."""
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
