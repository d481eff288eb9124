"""`export`: the trainer-readiness check in the stream, then LLaVA JSON / Parquet files when the run completes.

As a stage it checks every alive row the way a LLaVA trainer will use it (`dataengine.llm.readiness`):
one `<image>` token for the one image, in the first human turn; roles alternating; and, with a
`tokenizer`, text plus `image_tokens` within `max_length`, so nothing is silently truncated in
training. Failures are rejections (`not_trainable:<why>`, `too_long`). After the run is complete the
runner calls `after_run`, which writes the export (`dataengine.io.export`); `dataengine export RUN`
writes the same files from any finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from dataengine.core import columns as C
from dataengine.io.export import FORMATS, ExportOptions, export_run, sample_turns
from dataengine.llm.readiness import readiness_problem, token_length
from dataengine.models.loaders import load_tokenizer
from dataengine.ops.base import Op, OpConfig, register_op

ExportFormat = Literal["llava_json", "parquet"]


class ExportConfig(OpConfig):
    """What to export and what the trainer can take."""

    op: Literal["export"] = "export"
    formats: list[ExportFormat] = Field(default_factory=lambda: list(FORMATS), min_length=1)
    out: str | None = Field(default=None, description="Export directory; default: <run>/export.")
    caption_data: bool = Field(default=False, description="Stage-1 caption samples instead of conversations.")
    short_answer_prompt: bool = Field(default=False, description="Append LLaVA-1.5's 'Answer the question using a "
                                                                 "single word or phrase.' to short-answer questions.")
    write_images: bool = Field(default=True, description="Write image files next to the JSON.")
    tokenizer: str | None = Field(default=None, description="The trainer LM's tokenizer (hub id or local dir) for "
                                                            "the length check; null: structure checks only.")
    max_length: int = Field(default=2048, gt=0, description="Trainer context length, image tokens included.")
    image_tokens: int = Field(default=576, ge=0, description="Tokens one image expands to (576: LLaVA-1.5, 336 px).")

    def options(self) -> ExportOptions:
        return ExportOptions(tuple(self.formats), self.caption_data, self.short_answer_prompt, self.write_images)


@register_op
class Export(Op[ExportConfig]):
    """Reject rows a trainer could not use; write the export after the run."""

    Config = ExportConfig

    def __init__(self, config: ExportConfig) -> None:
        super().__init__(config)
        self.tokenizer = None
        if config.tokenizer:
            self.tokenizer = load_tokenizer(config.tokenizer)

    def process(self, batch: pa.Table) -> pa.Table:
        config = self.config
        options = config.options()
        reasons: list[str | None] = []
        lengths: list[int | None] = []
        texts = batch.select([c for c in (C.CONVERSATIONS, C.CAPTION_BEST, C.CAPTION) if c in batch.column_names])
        has_image = (pc.is_valid(batch.column(C.IMAGE)).to_pylist() if C.IMAGE in batch.column_names
                     else [False] * batch.num_rows)
        for row, image in zip(texts.to_pylist(), has_image):  # image bytes stay in Arrow
            try:
                turns = sample_turns(row, options)
            except json.JSONDecodeError:
                turns = None
            problem = "no_conversation" if turns is None else readiness_problem(turns)
            length = None
            if problem is None and self.tokenizer is not None:
                length = token_length(turns, self.tokenizer, config.image_tokens)
                if length > config.max_length:
                    problem = "too_long"
            if problem is None and not image:
                problem = "no_image"
            reasons.append(None if problem is None else f"not_trainable:{problem}")
            lengths.append(length)
        return pa.table({C.CONVERSATION_TOKENS: pa.array(lengths, pa.int32()), C.REJECT_REASON: pa.array(reasons, pa.string())})

    @classmethod
    def after_run(cls, config: ExportConfig, run_dir: Path) -> None:
        export_run(run_dir, config.out, config.options())
