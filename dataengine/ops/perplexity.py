"""`perplexity_filter`: caption perplexity under a causal LM, kept by a maximum or a quantile.

Fluent captions have low perplexity; gibberish, keyword soup and broken text have high perplexity.
The score (`text_ppl`: exp of the mean token negative log-likelihood, the caption truncated to
`max_length` tokens) is always written. `max_ppl` decides in the stream; `keep_lowest_fraction`
(POINTS keeps the lowest 20%) makes the op a barrier decided over every scored row.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.models.loaders import load_causal_lm
from dataengine.ops.base import ModelOp, ModelOpConfig, Score, register_op
from dataengine.ops.thresholds import KeepFractionBarrier, at_most_one


class PerplexityConfig(ModelOpConfig):
    """Perplexity filter settings."""

    op: Literal["perplexity_filter"] = "perplexity_filter"
    model: str = Field(default="Qwen/Qwen2.5-0.5B", description="Hub id or local directory of a causal LM.")
    batch_size: int = Field(default=32, gt=0)
    max_length: int = Field(default=128, gt=1, description="Tokens scored per caption; longer ones are truncated.")
    max_ppl: float | None = Field(default=None, gt=1, description="Keep captions with perplexity at most this.")
    keep_lowest_fraction: float | None = Field(default=None, gt=0, le=1, description="Keep this fraction, lowest first.")

    @model_validator(mode="after")
    def _one_threshold(self) -> "PerplexityConfig":
        at_most_one(self, "max_ppl", "keep_lowest_fraction")
        return self


@register_op
class PerplexityFilter(KeepFractionBarrier, ModelOp[PerplexityConfig]):
    """Score captions with a causal LM; reject above the threshold."""

    Config = PerplexityConfig
    score = Score(C.TEXT_PPL, "caption perplexity (log scale)", "max_ppl", "keep_lowest_fraction",
                  higher_is_better=False, log_scale=True)
    not_kept_reason = "text_ppl_not_lowest_{:g}"

    def load_model(self, config: PerplexityConfig) -> Any:
        model, self.tokenizer = load_causal_lm(config.model, config.device, config.dtype)
        self.tokenizer.padding_side = "right"  # absolute positions stay right; the mask hides the padding
        self.prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        return model

    def process(self, batch: pa.Table) -> pa.Table:
        config = self.config
        captions = batch.column(C.CAPTION).to_pylist() if C.CAPTION in batch.column_names else [None] * batch.num_rows
        rows = [i for i, c in enumerate(captions) if c and c.strip()]
        ppl: list[float | None] = [None] * batch.num_rows
        reasons: list[str | None] = ["no_caption" if not (c and c.strip()) else None for c in captions]
        for i, value in zip(rows, self.perplexities([captions[i] for i in rows])):
            ppl[i] = value
            if config.max_ppl is not None and value > config.max_ppl:
                reasons[i] = f"text_ppl>{config.max_ppl:g}"
        return pa.table({C.TEXT_PPL: pa.array(ppl, pa.float32()), C.REJECT_REASON: pa.array(reasons, pa.string())})

    def perplexities(self, texts: list[str]) -> list[float]:
        """exp(mean NLL) of each text's tokens, each predicted from the ones before (BOS/EOS first)."""
        if not texts:
            return []
        torch = self.torch
        config = self.config
        room = config.max_length - (1 if self.prefix is not None else 0)
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        if self.prefix is not None:
            encoded = [[self.prefix, *ids] for ids in encoded]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none",
        ).view(len(texts), -1)
        target_mask = mask[:, 1:].float()
        counts = target_mask.sum(dim=1).clamp(min=1)
        mean_nll = (nll * target_mask).sum(dim=1) / counts
        return [math.exp(min(v, 80.0)) for v in mean_nll.tolist()]  # exp(80) ~ 5e34: keeps float32 finite
