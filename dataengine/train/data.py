"""Training samples from a run's kept rows: Ray Data in, tokenized and label-masked rows out.

Stage 1 turns each kept row into one caption sample (a brief-description request answered by the
best caption); stage 2 trains on the row's synthesized conversation. Rows are split into train and
held-out by a hash of their uid, so the split is the same on every rerun and every machine.
Tokenization runs in Ray Data tasks through the model's own processor and chat template: the image
token is expanded to the tower's patch count and labels are -100 everywhere except the assistant's
replies. A sample longer than `max_length` is never truncated: it is passed on marked `too_long` and
the training loop counts and skips it.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.core.layout import DATASET_DIR
from dataengine.io.export import ExportOptions, sample_turns
from dataengine.llm.validate import GPT, HUMAN, IMAGE_TOKEN

IGNORE_INDEX = -100
SOURCE_COLUMNS = (C.UID, C.IMAGE, C.CONVERSATIONS, C.CAPTION_BEST, C.CAPTION)
INPUT_IDS, LABELS, PIXELS, LENGTH, SKIP = C.INPUT_IDS, C.LABELS, C.PIXEL_VALUES, C.SAMPLE_LENGTH, C.SKIP


def heldout_key(uid: str) -> float:
    """A uid's place in [0, 1): rows below the held-out fraction are never trained on."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class Split:
    """The rows of a split, by uid hash: held out below `heldout_fraction`, train from there up to
    `train_until` (below 1.0 when the spec caps the training rows)."""

    name: str  # "train" | "heldout"
    heldout_fraction: float
    train_until: float = 1.0

    def contains(self, uid: str) -> bool:
        key = heldout_key(uid)
        if self.name == "heldout":
            return key < self.heldout_fraction
        return self.heldout_fraction <= key < self.train_until


def kept_files(run_dir: str | Path) -> list[str]:
    files = sorted(str(p) for p in (Path(run_dir) / DATASET_DIR).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no dataset/part-*.parquet (run the pipeline first)")
    return files


def data_version(run_dir: str | Path) -> str:
    """A digest of the kept Parquet files (names, sizes, row counts): changes whenever the data does."""
    parts = [f"{Path(f).name}:{Path(f).stat().st_size}:{pq.ParquetFile(f).metadata.num_rows}" for f in kept_files(run_dir)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Source:
    """Kept files of one run; in a mixture, only the rows its rows file chose (each `repeats` times in
    training), their uids prefixed with the source's name (uids are unique within a run only)."""

    files: tuple[str, ...]
    prefix: str = ""
    rows_path: str | None = None
    index: int = 0

    def chosen(self) -> dict[str, int] | None:
        """uid -> repeats, or None: every row once."""
        return None if self.rows_path is None else _selection(self.rows_path, self.index)


@functools.lru_cache(maxsize=16)
def _selection(rows_path: str, index: int) -> dict[str, int]:
    """uid -> repeats of one source's chosen rows (read once per worker process)."""
    table = pq.read_table(rows_path, filters=[(C.MIXTURE_SOURCE, "=", index)], columns=[C.UID, C.MIXTURE_REPEATS])
    return dict(zip(table.column(C.UID).to_pylist(), table.column(C.MIXTURE_REPEATS).to_pylist()))


@dataclass(frozen=True)
class TrainingData:
    """What a training stage reads: one run's kept rows, or a mixture's (`dataengine mix`)."""

    sources: tuple[Source, ...]
    version: str
    mixture: dict[str, Any] | None = None  # the mixture's lineage (id, sources and their data versions)


def run_data(run_dir: str | Path) -> TrainingData:
    return TrainingData((Source(tuple(kept_files(run_dir))),), data_version(run_dir))


def as_training_data(data: TrainingData | str | Path) -> TrainingData:
    return data if isinstance(data, TrainingData) else run_data(data)


def _rows(source: Source, table: pa.Table) -> tuple[list[str], list[int]]:
    """The table's rows that the source takes: their training uids, and how many times each (0: not taken)."""
    uids = table.column(C.UID).to_pylist()
    chosen = source.chosen()
    repeats = [1] * len(uids) if chosen is None else [chosen.get(u, 0) for u in uids]
    return [source.prefix + u for u in uids], repeats


def plan_splits(data: TrainingData | str | Path, stage: int, heldout_fraction: float,
                max_samples: int | None = None) -> tuple[Split, Split, dict[str, int]]:
    """(train, held-out) splits of the rows that have something to train on in `stage`, and their
    sizes (a mixture's repeated rows count once per repeat in training, once held out). Cheap: reads no
    images."""
    heldout, train_keys, empty = 0, [], 0
    for source in as_training_data(data).sources:
        for path in source.files:
            parquet = pq.ParquetFile(path)
            names = [c for c in (C.UID, C.CONVERSATIONS, C.CAPTION_BEST, C.CAPTION) if c in parquet.schema_arrow.names]
            table = parquet.read(columns=names)
            uids, repeats = _rows(source, table)
            for row, uid, times in zip(table.to_pylist(), uids, repeats):
                if not times:
                    continue
                key = heldout_key(uid)
                if turns_for(row, stage) is None:
                    empty += 1
                elif key < heldout_fraction:
                    heldout += 1
                else:
                    train_keys.extend([key] * times)
    train_keys.sort()
    until = train_keys[max_samples] if max_samples is not None and max_samples < len(train_keys) else 1.0
    n_train = sum(k < until for k in train_keys)
    counts = {"train": n_train, "heldout": heldout, "no_sample": empty, "available_train": len(train_keys)}
    return Split("train", heldout_fraction, until), Split("heldout", heldout_fraction), counts


def turns_for(row: dict[str, Any], stage: int) -> list[dict[str, str]] | None:
    """The LLaVA turns a row trains on in `stage` (None: nothing to train on)."""
    return sample_turns(row, ExportOptions(caption_data=stage == 1))


def to_messages(turns: list[dict[str, str]], image: Any) -> list[dict[str, Any]]:
    """LLaVA turns (`from` human/gpt, `<image>` in the first human turn) as chat-template messages."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        role = {HUMAN: "user", GPT: "assistant"}.get(turn["from"])
        if role is None:
            raise ValueError(f"turn from {turn['from']!r}: expected {HUMAN!r} or {GPT!r}")
        text = turn["value"]
        if IMAGE_TOKEN in text:
            rest = text.replace(IMAGE_TOKEN, "", 1).strip()
            messages.append({"role": role, "content": [{"type": "image", "image": image}, {"type": "text", "text": rest}]})
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    return messages


def read_split(data: TrainingData | str | Path, split: Split) -> Any:
    """The rows of one split as a Ray dataset, image bytes included, one task per part file; a mixture's
    rows repeated as it says (training split), their uids prefixed with their source."""
    from dataengine.core.raytools import read_files

    data = as_training_data(data)
    sources = data.sources

    def read(item: str) -> pa.Table:
        index, path = item.split("\t", 1)
        source = sources[int(index)]
        parquet = pq.ParquetFile(path)
        table = parquet.read(columns=[c for c in SOURCE_COLUMNS if c in parquet.schema_arrow.names])
        uids, repeats = _rows(source, table)
        take = [i for i, (uid, times) in enumerate(zip(uids, repeats)) if times and split.contains(uid)
                for _ in range(times if split.name == "train" else 1)]
        if source.prefix:
            table = table.set_column(table.schema.get_field_index(C.UID), C.UID, pa.array(uids, pa.string()))
        return table.take(pa.array(take, pa.int64()))

    return read_files([f"{k}\t{path}" for k, source in enumerate(sources) for path in source.files], read)


@functools.lru_cache(maxsize=4)
def _processor(processor_dir: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor_dir)


def encode_row(row: dict[str, Any], processor: Any, stage: int, max_length: int) -> dict[str, Any]:
    """One kept row as a training sample, or a skip reason (`no_sample`, `bad_image`, `too_long`)."""
    from PIL import Image

    turns = turns_for(row, stage)
    if turns is None:
        return {SKIP: "no_sample"}
    try:
        image = Image.open(io.BytesIO(row[C.IMAGE])).convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable image is a counted skip, not a crash
        return {SKIP: "bad_image"}
    out = processor.apply_chat_template(
        to_messages(turns, image), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"][0], dtype=np.int32)
    if len(ids) > max_length:
        return {SKIP: "too_long", LENGTH: len(ids)}
    mask = np.asarray(out["assistant_masks"][0], dtype=bool)
    labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    pixels = np.asarray(out["pixel_values"][0], dtype=np.float32)
    return {INPUT_IDS: ids, LABELS: labels, PIXELS: pixels.reshape(-1), LENGTH: len(ids), SKIP: None}


def encode_batch(batch: pa.Table, processor_dir: str, stage: int, max_length: int) -> pa.Table:
    """Ray Data map: rows -> uid, input_ids, labels, pixel_values (flat float32), length, skip reason."""
    processor = _processor(processor_dir)
    encoded = [encode_row(row, processor, stage, max_length) for row in batch.to_pylist()]
    return pa.table({
        C.UID: batch.column(C.UID),
        INPUT_IDS: pa.array([e.get(INPUT_IDS) for e in encoded], pa.list_(pa.int32())),
        LABELS: pa.array([e.get(LABELS) for e in encoded], pa.list_(pa.int32())),
        PIXELS: pa.array([e.get(PIXELS) for e in encoded], pa.list_(pa.float32())),
        LENGTH: pa.array([e.get(LENGTH) for e in encoded], pa.int32()),
        SKIP: pa.array([e.get(SKIP) for e in encoded], pa.string()),
    })


def encoded_split(data: TrainingData | str | Path, split: Split, stage: int, processor_dir: str, max_length: int,
                  num_cpus: float = 1.0) -> Any:
    """`read_split` tokenized by `encode_batch` in Ray Data tasks (streaming: nothing is materialised)."""
    from dataengine.core.raytools import map_tables

    return map_tables(read_split(data, split), encode_batch,
                      {"processor_dir": processor_dir, "stage": stage, "max_length": max_length}, 64, num_cpus)
