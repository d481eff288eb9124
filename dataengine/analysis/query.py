"""Query a run's outputs with polars: SQL from the CLI, LazyFrames from Python.

The `image` column (encoded bytes, most of the data) is left out unless a query names it, so
`SELECT *` over a million rows stays cheap.

Examples:
    >>> frames = scan("runs/demo")  # doctest: +SKIP
    >>> frames["rejected"].group_by("reject_reason").len().collect()  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pyarrow as pa

from dataengine.core import columns as C
from dataengine.core.layout import DATASET_DIR, REJECTED_DIR
from dataengine.core.schemas import rejected_schema, sample_schema

TABLES = {"dataset": (DATASET_DIR, sample_schema), "rejected": (REJECTED_DIR, rejected_schema)}


def scan(run_dir: str | Path, *, include_images: bool = True) -> dict[str, pl.LazyFrame]:
    """LazyFrames `dataset` and `rejected` over a run directory (empty frames if nothing is there)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    frames = {}
    for table, (directory, schema_fn) in TABLES.items():
        files = sorted((run_dir / directory).glob("part-*.parquet"))
        schema: pa.Schema = schema_fn()
        frame = pl.scan_parquet(files) if files else pl.from_arrow(schema.empty_table()).lazy()
        if not include_images:
            frame = frame.drop(C.IMAGE)
        frames[table] = frame
    return frames


def run_sql(run_dir: str | Path, sql: str) -> pl.DataFrame:
    """Run polars SQL over tables `dataset` and `rejected`; `image` only if the query names it."""
    wants_images = re.search(rf"\b{C.IMAGE}\b", sql) is not None
    frames = scan(run_dir, include_images=wants_images)
    with pl.SQLContext(frames=frames, eager=False) as ctx:
        return ctx.execute(sql).collect()
