"""`capfilt_filter`: a BLIP image-text matching (ITM) model keeps the captions that match the image.

CapFilt's second step. The filter is a *separate* ITM model: BLIP found that a filter sharing the
captioner's weights passes the captioner's own mistakes (confirmation bias: 8% vs 25% of noise
caught), so the spec names its own checkpoint (e.g. Salesforce/blip-itm-large-coco). The web
caption and every synthetic caption are scored (ITM match probability, all stored); those at or above
`threshold` are kept (`captions_kept`, as BLIP keeps every caption that passes), `caption_best` first.
`caption_best` is, by default the web caption when it passes, since a matching human caption is
worth more than a generated one, else the best synthetic one (`prefer: score`: always the highest). A
row whose captions all fall below is rejected as `capfilt_no_match`.

The image is encoded once per row and each caption is matched against it through the ITM head, so
K captions cost K text passes, not K image passes.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from dataengine.core import columns as C
from dataengine.models.loaders import load_blip
from dataengine.ops.base import ModelOp, ModelOpConfig, Score, register_op


class CapfiltConfig(ModelOpConfig):
    """ITM filter settings."""

    op: Literal["capfilt_filter"] = "capfilt_filter"
    model: str = Field(default="Salesforce/blip-itm-large-coco", description="BLIP ITM model: hub id or local dir.")
    threshold: float = Field(default=0.5, ge=0, le=1, description="Keep captions whose match probability is at least this.")
    keep_web_caption: bool = Field(default=True, description="Score the web caption too (false: synthetic captions only).")
    prefer: Literal["web", "score"] = Field(
        default="web", description="caption_best: web = the web caption whenever it passes, a synthetic one only "
                                   "when it does not (a human caption that matches beats a generated one); "
                                   "score = the highest match probability.")
    max_text_tokens: int = Field(default=35, gt=0, description="Captions are cut to this many tokens (BLIP: 35).")
    batch_size: int = Field(default=16, gt=0, description="Images per batch.")


@register_op
class CapfiltFilter(ModelOp[CapfiltConfig]):
    """Score web + synthetic captions with BLIP ITM; keep the matching ones; reject rows with none."""

    Config = CapfiltConfig
    score = Score(C.WEB_CAPTION_ITM, "ITM match probability of the web caption", "threshold", None,
                  higher_is_better=True, note="a row left of the line stays when a synthetic caption passes")

    def load_model(self, config: CapfiltConfig) -> Any:
        model, self.processor = load_blip(config.model, "itm", config.device, config.dtype)
        return model

    def process(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        config = self.config
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        for row in rows:
            result: dict[str, Any] = dict.fromkeys(_COLUMNS)
            out.append(result)
            web = (row.get(C.CAPTION) or "").strip() if config.keep_web_caption else ""
            synthetic = [c for c in row.get(C.SYNTHETIC_CAPTIONS) or [] if c and c.strip()]
            if row.get(C.IMAGE) is None:
                result[C.REJECT_REASON] = "no_image"
                continue
            if not web and not synthetic:
                result[C.REJECT_REASON] = "no_caption"
                continue
            try:
                image = Image.open(io.BytesIO(row[C.IMAGE])).convert("RGB")
            except (OSError, ValueError):
                result[C.REJECT_REASON] = "decode_error"
                continue
            texts = ([web] if web else []) + synthetic
            scores = self.match_probabilities(image, texts)
            web_score = float(scores[0]) if web else None
            synthetic_scores = [float(s) for s in scores[1 if web else 0:]]
            sources = (["web"] if web else []) + ["synthetic"] * len(synthetic)
            ranked = sorted(zip(scores.tolist(), texts, sources), key=lambda t: -t[0])
            kept = [(s, t, src) for s, t, src in ranked if s >= config.threshold]
            if kept and config.prefer == "web":  # a passing web caption leads, the rest by score
                kept.sort(key=lambda k: k[2] != "web")
            result.update({C.WEB_CAPTION_ITM: web_score, C.SYNTHETIC_CAPTION_ITM: synthetic_scores,
                           C.CAPTIONS_KEPT: _unique([t for _, t, _ in kept])})
            if kept:
                result[C.CAPTION_BEST], result[C.CAPTION_BEST_SOURCE] = kept[0][1], kept[0][2]
            else:
                result[C.REJECT_REASON] = "capfilt_no_match"
        return pa.table({
            C.WEB_CAPTION_ITM: pa.array([r[C.WEB_CAPTION_ITM] for r in out], pa.float32()),
            C.SYNTHETIC_CAPTION_ITM: pa.array([r[C.SYNTHETIC_CAPTION_ITM] for r in out], pa.list_(pa.float32())),
            C.CAPTIONS_KEPT: pa.array([r[C.CAPTIONS_KEPT] for r in out], pa.list_(pa.string())),
            C.CAPTION_BEST: pa.array([r[C.CAPTION_BEST] for r in out], pa.string()),
            C.CAPTION_BEST_SOURCE: pa.array([r[C.CAPTION_BEST_SOURCE] for r in out], pa.string()),
            C.REJECT_REASON: pa.array([r[C.REJECT_REASON] for r in out], pa.string()),
        })

    def match_probabilities(self, image: Any, texts: list[str]) -> np.ndarray:
        """ITM P(match) of each text with `image`: one vision pass, one cross-attending text pass per text."""
        torch = self.torch
        config = self.config
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        tokens = self.processor.tokenizer(texts, padding="longest", truncation=True, max_length=config.max_text_tokens,
                                          return_tensors="pt").to(self.device)
        with torch.inference_mode():
            image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
            image_embeds = image_embeds.expand(len(texts), -1, -1)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            text = self.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
            logits = self.model.itm_head(text.last_hidden_state[:, 0, :]).float()
        return torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()


_COLUMNS = (C.WEB_CAPTION_ITM, C.SYNTHETIC_CAPTION_ITM, C.CAPTIONS_KEPT, C.CAPTION_BEST, C.CAPTION_BEST_SOURCE,
            C.REJECT_REASON)


def _unique(texts: list[str]) -> list[str]:
    """First occurrence of each caption, case-insensitively (sampling often repeats itself)."""
    seen: set[str] = set()
    out = []
    for text in texts:
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out
