"""`capfilt_filter`: a BLIP image-text matching (ITM) model keeps the captions that match the image.

CapFilt's second step. The filter is a *separate* ITM model: BLIP found that a filter sharing the
captioner's weights passes the captioner's own mistakes (confirmation bias: 8% vs 25% of noise
caught), so the spec names its own checkpoint (e.g. Salesforce/blip-itm-large-coco). The web
caption and every synthetic caption are scored (ITM match probability, all stored); those at or above
`threshold` are kept (`captions_kept`, as BLIP keeps every caption that passes), `caption_best` first.
`caption_best` is, by default the web caption when it passes, since a matching human caption is
worth more than a generated one, else the best synthetic one (`prefer: score`: always the highest,
or the web caption unless a synthetic one beats it by `margin`). Synthetic captions can be held to a
stricter bar (`synthetic_threshold`) where the captioner's mistakes score like the truth. A row whose
captions all fall below is rejected as `capfilt_no_match`.

The image is encoded once per row and each caption is matched against it through the ITM head, so
K captions cost K text passes, not K image passes.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from dataengine.core import columns as C
from dataengine.models.loaders import load_blip, load_tokenizer
from dataengine.models.pixels import host_tensor, padded, pixels_array, ragged_tokens, to_model_input
from dataengine.ops.base import ModelOp, ModelOpConfig, Score, prepare_then_infer, register_op
from dataengine.ops.image_prep import ImagePreparer


class CapfiltConfig(ModelOpConfig):
    """ITM filter settings."""

    op: Literal["capfilt_filter"] = "capfilt_filter"
    model: str = Field(default="Salesforce/blip-itm-large-coco", description="BLIP ITM model: hub id or local dir.")
    threshold: float = Field(default=0.5, ge=0, le=1, description="Keep captions whose match probability is at least this.")
    keep_web_caption: bool = Field(default=True, description="Score the web caption too (false: synthetic captions only).")
    synthetic_threshold: float | None = Field(
        default=None, ge=0, le=1, description="A synthetic caption is kept only at or above this (default: "
        "threshold). Higher than threshold when the captioner's mistakes score like the truth: a row whose web "
        "caption fails is then rejected rather than given a wrong caption.")
    margin: float = Field(default=0.0, ge=0, le=1, description="prefer: score: a synthetic caption replaces a "
                                                              "passing web caption only when it scores this much higher.")
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
        self.prepare = CapfiltPreparer(config, self.processor.tokenizer)  # the tokenizer just loaded, not again
        return model

    @classmethod
    def splits(cls, config: CapfiltConfig) -> bool:
        return True

    @classmethod
    def preparer(cls, config: CapfiltConfig) -> CapfiltPreparer:
        return CapfiltPreparer(config)

    def process(self, batch: pa.Table) -> pa.Table:
        return prepare_then_infer(self, self.prepare, batch)

    def infer(self, prepared: pa.Table) -> pa.Table:
        """One vision pass over the batch's images, one text pass over all its (image, caption) pairs;
        then each row's captions ranked against the threshold."""
        pixels = pixels_array(prepared.column(PIXELS), *self.prepare.size)
        tokens = prepared.column(TOKENS).combine_chunks()
        per_row = np.diff(tokens.offsets.to_numpy())
        pad = self.processor.tokenizer.pad_token_id or 0
        ids, mask = padded(tokens.flatten(), pad)
        scores = self.pair_probabilities(pixels, np.repeat(np.arange(len(per_row)), per_row), ids, mask)
        texts = prepared.column(TEXTS).to_pylist()
        webs = prepared.column(WEB).to_pylist()
        out: list[dict[str, Any]] = []
        start = 0
        for row_texts, has_web, count in zip(texts, webs, per_row):
            row_scores = scores[start:start + count]
            start += count
            out.append(self._rank(row_texts, row_scores, has_web))
        return pa.table({name: pa.array([r[name] for r in out], TYPES[name]) for name in _COLUMNS})

    def _rank(self, texts: list[str], scores: np.ndarray, has_web: bool) -> dict[str, Any]:
        config = self.config
        result: dict[str, Any] = dict.fromkeys(_COLUMNS)
        sources = (["web"] if has_web else []) + ["synthetic"] * (len(texts) - (1 if has_web else 0))
        ranked = sorted(zip(scores.tolist(), texts, sources), key=lambda t: -t[0])
        synthetic_bar = config.threshold if config.synthetic_threshold is None else config.synthetic_threshold
        kept = [(s, t, src) for s, t, src in ranked if s >= (config.threshold if src == "web" else synthetic_bar)]
        if kept and config.prefer == "web":  # a passing web caption leads, the rest by score
            kept.sort(key=lambda k: k[2] != "web")
        elif kept and config.margin and has_web and scores[0] >= config.threshold:
            # prefer: score with a margin: the web caption leads unless a synthetic one beats it by `margin`
            kept.sort(key=lambda k: -(k[0] + (config.margin if k[2] == "web" else 0.0)))
        result.update({C.WEB_CAPTION_ITM: float(scores[0]) if has_web else None,
                       C.SYNTHETIC_CAPTION_ITM: [float(s) for s in scores[1 if has_web else 0:]],
                       C.CAPTIONS_KEPT: _unique([t for _, t, _ in kept])})
        if kept:
            result[C.CAPTION_BEST], result[C.CAPTION_BEST_SOURCE] = kept[0][1], kept[0][2]
        else:
            result[C.REJECT_REASON] = "capfilt_no_match"
        return result

    def match_probabilities(self, image: Any, texts: list[str]) -> np.ndarray:
        """ITM P(match) of each text with one PIL `image`."""
        encoded = self.prepare.tokenizer(texts, truncation=True, max_length=self.config.max_text_tokens)["input_ids"]
        ids, mask = padded(ragged_tokens(encoded), self.processor.tokenizer.pad_token_id or 0)
        pixels = self.prepare.images.resize(image)[None]
        return self.pair_probabilities(pixels, np.zeros(len(texts), dtype=np.int64), ids, mask)

    def pair_probabilities(self, pixels: np.ndarray, image_of_pair: np.ndarray, ids: np.ndarray,
                           mask: np.ndarray) -> np.ndarray:
        """ITM P(match) of each (image, text) pair: one vision pass per image, one cross-attending text
        pass per pair (K captions of an image cost K text passes, not K image passes)."""
        torch = self.torch
        prep = self.prepare
        with torch.inference_mode():
            images = to_model_input(pixels, self.device, self.dtype, prep.mean, prep.std, scale=None)
            image_embeds = self.model.vision_model(pixel_values=images).last_hidden_state
            image_embeds = image_embeds[host_tensor(image_of_pair).to(self.device)]
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            text = self.model.text_encoder(input_ids=host_tensor(ids).to(self.device),
                                           attention_mask=host_tensor(mask).to(self.device),
                                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
            logits = self.model.itm_head(text.last_hidden_state[:, 0, :]).float()
        return torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()


PIXELS, TOKENS = f"{C.PREPARED_PREFIX}itm_pixels", f"{C.PREPARED_PREFIX}itm_tokens"
TEXTS, WEB = f"{C.PREPARED_PREFIX}itm_texts", f"{C.PREPARED_PREFIX}itm_has_web"


class CapfiltPreparer:
    """The CPU half of `capfilt_filter`: the image as the ITM model's processor resizes it, and the
    captions to match (the web one first, when kept, then the synthetic ones) as token ids; rows
    without an image or a caption, or with a broken image, are rejected here."""

    def __init__(self, config: CapfiltConfig, tokenizer: Any | None = None) -> None:
        self.config = config
        self.images = ImagePreparer(config.model, PIXELS)
        self.size, self.mean, self.std = self.images.size, self.images.mean, self.images.std
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        config = self.config
        n = batch.num_rows
        columns = self.images.columns(batch)
        reasons = columns[C.REJECT_REASON].to_pylist()
        captions = batch.column(C.CAPTION).to_pylist() if C.CAPTION in batch.column_names else [None] * n
        synthetic_lists = batch.column(C.SYNTHETIC_CAPTIONS).to_pylist() if C.SYNTHETIC_CAPTIONS in batch.column_names \
            else [None] * n
        texts: list[list[str] | None] = [None] * n
        has_web: list[bool | None] = [None] * n
        for i, (caption, synthetic) in enumerate(zip(captions, synthetic_lists)):
            web = (caption or "").strip() if config.keep_web_caption else ""
            synthetic = [c for c in synthetic or [] if c and c.strip()]
            if reasons[i] == "no_image":
                continue
            if not web and not synthetic:
                reasons[i] = "no_caption"
                continue
            if reasons[i] is None:
                texts[i], has_web[i] = ([web] if web else []) + synthetic, bool(web)
        flat = [t for row in texts if row for t in row]
        encoded = iter(self.tokenizer(flat, truncation=True, max_length=config.max_text_tokens)["input_ids"]) if flat \
            else iter([])
        tokens = [[next(encoded) for _ in row] if row else None for row in texts]
        columns.update({TOKENS: pa.array(tokens, pa.list_(pa.list_(pa.int32()))), TEXTS: pa.array(texts, pa.list_(pa.string())),
                        WEB: pa.array(has_web, pa.bool_()), C.REJECT_REASON: pa.array(reasons, pa.string())})
        return pa.table(columns)


_COLUMNS = (C.WEB_CAPTION_ITM, C.SYNTHETIC_CAPTION_ITM, C.CAPTIONS_KEPT, C.CAPTION_BEST, C.CAPTION_BEST_SOURCE,
            C.REJECT_REASON)
TYPES = {C.WEB_CAPTION_ITM: pa.float32(), C.SYNTHETIC_CAPTION_ITM: pa.list_(pa.float32()),
         C.CAPTIONS_KEPT: pa.list_(pa.string()), C.CAPTION_BEST: pa.string(), C.CAPTION_BEST_SOURCE: pa.string(),
         C.REJECT_REASON: pa.string()}


def _unique(texts: list[str]) -> list[str]:
    """First occurrence of each caption, case-insensitively (sampling often repeats itself)."""
    seen: set[str] = set()
    out = []
    for text in texts:
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out
