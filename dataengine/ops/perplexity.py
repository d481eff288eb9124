"""`perplexity_filter`: caption perplexity under a causal LM, kept by a maximum or a quantile.

Fluent captions have low perplexity; gibberish, keyword soup and broken text have high perplexity.
The score (`text_ppl`: exp of the mean token negative log-likelihood, the caption truncated to
`max_length` tokens) is always written. `max_ppl` decides in the stream; `keep_lowest_fraction`
(POINTS keeps the lowest 20%) makes the op a barrier decided over every scored row.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.models.loaders import load_causal_lm, load_tokenizer
from dataengine.models.pixels import host_tensor, padded, ragged_tokens
from dataengine.ops.base import ModelOp, ModelOpConfig, Score, prepare_then_infer, register_op
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
        self.prepare = PerplexityPreparer(config, self.tokenizer)
        return model

    @classmethod
    def splits(cls, config: PerplexityConfig) -> bool:
        return True

    @classmethod
    def preparer(cls, config: PerplexityConfig) -> PerplexityPreparer:
        return PerplexityPreparer(config, load_tokenizer(config.model))

    def process(self, batch: pa.Table) -> pa.Table:
        return prepare_then_infer(self, self.prepare, batch)

    def infer(self, prepared: pa.Table) -> pa.Table:
        config = self.config
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = padded(prepared.column(TOKENS), pad)
        ppl = self.perplexities_of(ids, mask)
        columns: dict[str, Any] = {C.TEXT_PPL: pa.array(ppl)}
        if config.max_ppl is not None:
            high = pc.greater(columns[C.TEXT_PPL], pa.scalar(config.max_ppl, pa.float32()))
            columns[C.REJECT_REASON] = pc.if_else(high, f"text_ppl>{config.max_ppl:g}", pa.scalar(None, pa.string()))
        return pa.table(columns)

    def perplexities(self, texts: list[str]) -> list[float]:
        """exp(mean NLL) of each text's tokens, each predicted from the ones before (BOS/EOS first)."""
        if not texts:
            return []
        prepared = self.prepare(pa.table({C.CAPTION: texts}))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return self.perplexities_of(*padded(prepared.column(TOKENS), pad)).tolist()

    def perplexities_of(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float32 perplexities of right-padded token ids (n x width) under their mask."""
        torch = self.torch
        input_ids, attention = host_tensor(ids).to(self.device), host_tensor(mask).to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none",
            ).view(len(ids), -1)
            target_mask = attention[:, 1:].float()
            counts = target_mask.sum(dim=1).clamp(min=1)
            mean_nll = ((nll * target_mask).sum(dim=1) / counts).double().cpu().numpy()
        return np.exp(np.minimum(mean_nll, 80.0)).astype(np.float32)  # exp(80) ~ 5e34: keeps float32 finite


TOKENS = f"{C.PREPARED_PREFIX}ppl_tokens"


class PerplexityPreparer:
    """The CPU half of `perplexity_filter`: each caption's token ids (BOS/EOS first, truncated to
    `max_length`), unpadded; rows without a caption are rejected here."""

    def __init__(self, config: PerplexityConfig, tokenizer: Any) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        captions = batch.column(C.CAPTION).to_pylist() if C.CAPTION in batch.column_names else [None] * n
        rows = [i for i, c in enumerate(captions) if c and c.strip()]
        reasons: list[str | None] = [None if c and c.strip() else "no_caption" for c in captions]
        room = self.config.max_length - (1 if self.prefix is not None else 0)
        tokens: list[list[int] | None] = [None] * n
        if rows:
            encoded = self.tokenizer([captions[i] for i in rows], add_special_tokens=False, truncation=True,
                                     max_length=room)["input_ids"]
            for i, ids in zip(rows, encoded):
                tokens[i] = [self.prefix, *ids] if self.prefix is not None else ids
        return pa.table({TOKENS: ragged_tokens(tokens), C.REJECT_REASON: pa.array(reasons, pa.string())})
