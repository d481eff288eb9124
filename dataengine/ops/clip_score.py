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
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.models.loaders import load_open_clip
from dataengine.ops.base import ModelOp, ModelOpConfig, Score, register_op
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
        model, self.preprocess, self.tokenizer = load_open_clip(config.model, config.pretrained, config.device, config.dtype)
        return model

    def process(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        config = self.config
        n = batch.num_rows
        images = batch.column(C.IMAGE).to_pylist() if C.IMAGE in batch.column_names else [None] * n
        captions = batch.column(C.CAPTION).to_pylist() if C.CAPTION in batch.column_names else [None] * n
        if config.text == "caption_best" and C.CAPTION_BEST in batch.column_names:
            captions = [best or web for best, web in zip(batch.column(C.CAPTION_BEST).to_pylist(), captions)]
        reasons: list[str | None] = [None] * n
        scores: list[float | None] = [None] * n
        embeddings: list[list[float] | None] = [None] * n
        pixels, texts, rows = [], [], []
        for i, (image, caption) in enumerate(zip(images, captions)):
            if image is None:
                reasons[i] = "no_image"
            elif not caption or not caption.strip():
                reasons[i] = "no_caption"
            else:
                try:
                    pixels.append(self.preprocess(Image.open(io.BytesIO(image)).convert("RGB")))
                except (OSError, ValueError):
                    reasons[i] = "decode_error"
                    continue
                texts.append(caption)
                rows.append(i)
        if rows:
            image_emb, text_emb = self._embed(pixels, texts)
            similarity = (image_emb * text_emb).sum(axis=1)
            for j, i in enumerate(rows):
                scores[i] = float(similarity[j])
                if config.write_embedding:
                    embeddings[i] = image_emb[j].tolist()
                if config.min_score is not None and similarity[j] < config.min_score:
                    reasons[i] = f"clip_score<{config.min_score:g}"
        columns: dict[str, Any] = {C.CLIP_SCORE: pa.array(scores, pa.float32()), C.REJECT_REASON: pa.array(reasons, pa.string())}
        if config.write_embedding:
            columns[C.CLIP_IMAGE_EMBEDDING] = pa.array(embeddings, pa.list_(pa.float32()))
        return pa.table(columns)

    def _embed(self, pixels: list[Any], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            images = torch.stack(pixels).to(self.device, self.dtype)
            tokens = self.tokenizer(texts).to(self.device)
            image_emb = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
            text_emb = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return image_emb.cpu().numpy(), text_emb.cpu().numpy()
