"""Export a run's kept rows as training data: LLaVA JSON + image files, and a Parquet conversations table.

LLaVA's trainers read a JSON list of `{"id", "image": <path relative to the image folder>,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`;
the Parquet table has the same fields (conversations as a list of structs) and loads with
`datasets.load_dataset("parquet", data_files=...)`. Rows without a conversation become stage-1 caption
samples (a brief-description request answered by the best caption) when `caption_data` is set.

Rows are streamed one Parquet row group at a time, so a run with millions of images exports in
bounded memory. Files are written to temporary names and renamed, so an interrupted export leaves the
previous one intact.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.atomic import write_text_atomic
from dataengine.core.layout import DATASET_DIR, EXPORT_DIR, MANIFEST
from dataengine.llm.readiness import caption_sample, readiness_problem, with_short_answer_prompt

log = logging.getLogger(__name__)

FORMATS = ("llava_json", "parquet")
LLAVA_JSON, PARQUET_FILE, IMAGES_DIR, EXPORT_MANIFEST = "llava.json", "conversations.parquet", "images", "export.json"
CAPTION_QUESTION = "Describe the image briefly."
TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])
PARQUET_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", pa.list_(TURN_TYPE))])


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = FORMATS
    caption_data: bool = False
    short_answer_prompt: bool = False
    write_images: bool = True


@dataclass
class ExportResult:
    out_dir: Path
    samples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)


_ROW_COLUMNS = (C.UID, C.IMAGE, C.IMAGE_FORMAT, C.CONVERSATIONS, C.CAPTION_BEST, C.CAPTION)


def sample_turns(row: dict[str, Any], options: ExportOptions) -> list[dict[str, str]] | None:
    """The LLaVA turns of a kept row under `options` (None when the row has nothing to train on)."""
    if options.caption_data:
        caption = row.get(C.CAPTION_BEST) or row.get(C.CAPTION)
        turns = caption_sample(caption, CAPTION_QUESTION) if caption and caption.strip() else None
    elif row.get(C.CONVERSATIONS):
        turns = json.loads(row[C.CONVERSATIONS])
    else:
        return None
    return with_short_answer_prompt(turns) if turns and options.short_answer_prompt else turns


def _kept_rows(run_dir: Path) -> Iterator[dict[str, Any]]:
    for path in sorted((run_dir / DATASET_DIR).glob("part-*.parquet")):
        parquet = pq.ParquetFile(path)
        names = [c for c in _ROW_COLUMNS if c in parquet.schema_arrow.names]
        for group in range(parquet.num_row_groups):
            yield from parquet.read_row_group(group, columns=names).to_pylist()


def image_name(uid: str, image_format: str | None) -> str:
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(image_format or "", "jpg")
    return f"{uid}.{ext}"


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, options: ExportOptions | None = None) -> ExportResult:
    """Write the chosen formats for `run_dir`'s kept rows into `out_dir` (default `<run>/export`)."""
    options = options or ExportOptions()
    run = Path(run_dir)
    if not (run / MANIFEST).is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no run.json)")
    bad = sorted(set(options.formats) - set(FORMATS))
    if bad:
        raise ValueError(f"unknown export format(s) {bad} (known: {', '.join(FORMATS)})")
    out = Path(out_dir) if out_dir else run / EXPORT_DIR
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES_DIR).mkdir(parents=True)
    result = ExportResult(out)
    json_file = open(tmp / LLAVA_JSON, "w") if "llava_json" in options.formats else None
    writer = pq.ParquetWriter(tmp / PARQUET_FILE, PARQUET_SCHEMA) if "parquet" in options.formats else None
    pending: list[dict[str, Any]] = []
    try:
        if json_file:
            json_file.write("[")
        for row in _kept_rows(run):
            turns = sample_turns(row, options)
            problem = "no_conversation" if turns is None else readiness_problem(turns)
            if problem is None and row.get(C.IMAGE) is None:
                problem = "no_image"
            if problem:
                result.skipped[problem] += 1
                continue
            name = image_name(row[C.UID], row.get(C.IMAGE_FORMAT))
            if options.write_images:
                (tmp / IMAGES_DIR / name).write_bytes(row[C.IMAGE])
            sample = {"id": row[C.UID], "image": name, "conversations": turns}
            if json_file:
                json_file.write(("\n" if result.samples == 0 else ",\n") + json.dumps(sample, ensure_ascii=False))
            pending.append(sample)
            if writer and len(pending) >= 4096:
                writer.write_table(pa.Table.from_pylist(pending, PARQUET_SCHEMA))
                pending.clear()
            result.samples += 1
        if json_file:
            json_file.write("\n]\n")
        if writer and pending:
            writer.write_table(pa.Table.from_pylist(pending, PARQUET_SCHEMA))
    finally:
        if json_file:
            json_file.close()
        if writer:
            writer.close()
    manifest = json.loads((run / MANIFEST).read_text())
    summary = {"run": str(run), "spec_hash": manifest.get("spec_hash"), "samples": result.samples,
               "skipped": dict(result.skipped), "formats": list(options.formats),
               "caption_data": options.caption_data, "short_answer_prompt": options.short_answer_prompt,
               "image_folder": IMAGES_DIR}
    write_text_atomic(tmp / EXPORT_MANIFEST, json.dumps(summary, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    result.files = sorted(p.name for p in out.iterdir())
    log.info("exported %d samples to %s (skipped: %s)", result.samples, out, dict(result.skipped) or "none")
    return result
