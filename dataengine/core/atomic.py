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


#: rows per Parquet row group. Rows carry image bytes (tens of kB each): small groups let a reader
#: fetch a few rows' images (the report, a sample in polars) without reading a whole file's images,
#: as Hugging Face datasets does for image data. Whole-column scans are not slowed measurably.
ROW_GROUP_ROWS = 256


def write_parquet_atomic(table: pa.Table, path: Path, **options: Any) -> None:
    """`options` go to `pq.write_table` (row groups of ROW_GROUP_ROWS unless given)."""
    options.setdefault("row_group_size", ROW_GROUP_ROWS)
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
