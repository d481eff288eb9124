"""`clip_score_filter`: CLIP image-text cosine similarity, kept by an absolute or a quantile threshold.

The score is always written (`clip_score`), so thresholds can be tuned later without recomputing.
`min_score` decides in the stream (LAION-400M used 0.28 with ViT-B/32); `keep_top_fraction` needs
every score first (DataComp keeps the top 30% by ViT-L/14), so the op is then a barrier and the
runner decides after all rows are scored. With `write_embedding` the L2-normalised image embedding
is kept for dedup at no extra cost.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.models.loaders import load_open_clip, open_clip_image_prep, open_clip_name
from dataengine.models.pixels import (
    host_tensor,
    pixels_array,
    pixels_column,
    to_model_input,
    tokens_array,
    tokens_column,
    vectors_column,
)
from dataengine.ops.base import ModelOp, ModelOpConfig, Score, prepare_then_infer, register_op
from dataengine.ops.thresholds import KeepFractionBarrier, at_most_one


class ClipScoreConfig(ModelOpConfig):
    """CLIP score filter settings."""

    op: Literal["clip_score_filter"] = "clip_score_filter"
    model: str = Field(default="ViT-B-32", description="open_clip architecture, hf-hub:org/repo, or a local directory.")
    pretrained: str | None = Field(default="laion2b_s34b_b79k", description="open_clip tag or checkpoint file.")
    min_score: float | None = Field(default=None, ge=-1, le=1, description="Keep rows scoring at least this.")
    keep_top_fraction: float | None = Field(default=None, gt=0, le=1, description="Keep this fraction, best first.")
    write_embedding: bool = Field(default=False, description="Also write clip_image_embedding (L2-normalised).")
    text: Literal["caption", "caption_best"] = Field(
        default="caption", description="Which caption to score: the web caption, or CapFilt's best (the web one "
                                       "where CapFilt did not run).")

    @model_validator(mode="after")
    def _one_threshold(self) -> "ClipScoreConfig":
        at_most_one(self, "min_score", "keep_top_fraction")
        return self


@register_op
class ClipScoreFilter(KeepFractionBarrier, ModelOp[ClipScoreConfig]):
    """Score image-caption agreement with an open_clip model; reject below the threshold."""

    Config = ClipScoreConfig
    score = Score(C.CLIP_SCORE, "CLIP image-text cosine similarity", "min_score", "keep_top_fraction",
                  higher_is_better=True)
    not_kept_reason = "clip_score_not_top_{:g}"

    def load_model(self, config: ClipScoreConfig) -> Any:
        model, _, _ = load_open_clip(config.model, config.pretrained, config.device, config.dtype)
        self.prepare = self.preparer(config)
        return model

    @classmethod
    def splits(cls, config: ClipScoreConfig) -> bool:
        return True

    @classmethod
    def preparer(cls, config: ClipScoreConfig) -> ClipPreparer:
        return ClipPreparer(config)

    def process(self, batch: pa.Table) -> pa.Table:
        return prepare_then_infer(self, self.prepare, batch)

    def infer(self, prepared: pa.Table) -> pa.Table:
        """Scores (and embeddings) of prepared rows: pixels and token ids to the device, the model, the
        results back as Arrow arrays built from the output buffers."""
        config, torch, prep = self.config, self.torch, self.prepare
        pixels = pixels_array(prepared.column(PIXELS), *prep.size)
        tokens = tokens_array(prepared.column(TOKENS))
        with torch.inference_mode():
            images = to_model_input(pixels, self.device, self.dtype, prep.mean, prep.std)
            text = host_tensor(tokens).to(self.device).long()
            image_emb = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
            text_emb = torch.nn.functional.normalize(self.model.encode_text(text).float(), dim=-1)
            similarity = (image_emb * text_emb).sum(dim=1).cpu().numpy()
        scores = pa.array(similarity.astype(np.float32))
        columns: dict[str, Any] = {C.CLIP_SCORE: scores}
        if config.min_score is not None:
            low = pc.less(scores, pa.scalar(config.min_score, pa.float32()))
            columns[C.REJECT_REASON] = pc.if_else(low, f"clip_score<{config.min_score:g}", pa.scalar(None, pa.string()))
        if config.write_embedding:
            columns[C.CLIP_IMAGE_EMBEDDING] = vectors_column(image_emb.cpu().numpy())
        return pa.table(columns)


PIXELS, TOKENS = f"{C.PREPARED_PREFIX}clip_pixels", f"{C.PREPARED_PREFIX}clip_tokens"


class ClipPreparer:
    """The CPU half of `clip_score_filter`: decode and resize each image (open_clip's own resize and
    crop, without the model), tokenise each caption; rows without an image or caption, or with a broken
    image, are rejected here."""

    def __init__(self, config: ClipScoreConfig) -> None:
        from open_clip import get_tokenizer

        self.config = config
        self.resize, self.size, self.mean, self.std = open_clip_image_prep(config.model, config.pretrained)
        self.tokenizer = get_tokenizer(open_clip_name(config.model, config.pretrained)[0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        n = batch.num_rows
        images = batch.column(C.IMAGE).to_pylist() if C.IMAGE in batch.column_names else [None] * n
        captions = batch.column(C.CAPTION).to_pylist() if C.CAPTION in batch.column_names else [None] * n
        if self.config.text == "caption_best" and C.CAPTION_BEST in batch.column_names:
            captions = [best or web for best, web in zip(batch.column(C.CAPTION_BEST).to_pylist(), captions)]
        reasons: list[str | None] = [None] * n
        pixels: list[np.ndarray | None] = [None] * n
        for i, (image, caption) in enumerate(zip(images, captions)):
            if image is None:
                reasons[i] = "no_image"
            elif not caption or not caption.strip():
                reasons[i] = "no_caption"
            else:
                try:
                    pixels[i] = np.asarray(self.resize(Image.open(io.BytesIO(image)).convert("RGB")))
                except (OSError, ValueError):
                    reasons[i] = "decode_error"
        valid = np.array([r is None for r in reasons], dtype=bool)
        texts = [c if ok else "" for c, ok in zip(captions, valid)]
        tokens = self.tokenizer(texts).numpy() if n else np.zeros((0, 1), dtype=np.int64)
        return pa.table({PIXELS: pixels_column(pixels, *self.size), TOKENS: tokens_column(tokens, valid),
                         C.REJECT_REASON: pa.array(reasons, pa.string())})
