"""`blip_caption_mapper`: BLIP's captioner writes K synthetic captions per image (CapFilt, step one).

BLIP (Li et al., 2022) bootstraps its web data by captioning every image and keeping, with a
separate image-text matching filter (`capfilt_filter`), whichever of the web and synthetic captions
match the image. It found nucleus sampling (top_p 0.9) gives more diverse, more useful synthetic
captions than beam search, despite being noisier; both are here. The prompt ("a picture of ") is
what BLIP's captioner was trained with; it is stripped from the output.

Any `BlipForConditionalGeneration` checkpoint loads (hub id such as
Salesforce/blip-image-captioning-large, or a local directory). Sampling is seeded per batch from
its rows' uids, so a resumed run writes the same captions for the same shard.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from dataengine.core import columns as C
from dataengine.models.loaders import load_blip
from dataengine.models.pixels import pixels_array, to_model_input
from dataengine.ops.base import ModelOp, ModelOpConfig, prepare_then_infer, register_op
from dataengine.ops.image_prep import ImagePreparer


class BlipCaptionConfig(ModelOpConfig):
    """Captioner settings."""

    op: Literal["blip_caption_mapper"] = "blip_caption_mapper"
    model: str = Field(default="Salesforce/blip-image-captioning-large", description="BLIP captioner: hub id or local dir.")
    num_captions: int = Field(default=5, gt=0, le=64, description="Synthetic captions per image (K).")
    decoding: Literal["nucleus", "beam"] = Field(default="nucleus", description="nucleus: BLIP's CapFilt choice.")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling mass.")
    temperature: float = Field(default=1.0, gt=0)
    num_beams: int = Field(default=3, gt=0, description="beam: beams (>= num_captions is raised to it).")
    max_new_tokens: int = Field(default=30, gt=0)
    min_new_tokens: int = Field(default=5, ge=0, description="BLIP generates at least 5 tokens.")
    repetition_penalty: float = Field(default=1.0, gt=0)
    prompt: str | None = Field(default="a picture of ", description="Text the captioner continues; stripped from the output.")
    seed: int = Field(default=0, description="Seeds nucleus sampling (per batch, with its uids).")
    batch_size: int = Field(default=16, gt=0, description="Images per batch.")


@register_op
class BlipCaptionMapper(ModelOp[BlipCaptionConfig]):
    """Write `synthetic_captions` (K per image) with a BLIP captioner."""

    Config = BlipCaptionConfig

    def load_model(self, config: BlipCaptionConfig) -> Any:
        model, self.processor = load_blip(config.model, "caption", config.device, config.dtype)
        self.prepare = self.preparer(config)
        self.prompt = self.processor.tokenizer([config.prompt], return_tensors="pt") if config.prompt else None
        return model

    @classmethod
    def splits(cls, config: BlipCaptionConfig) -> bool:
        return True

    @classmethod
    def preparer(cls, config: BlipCaptionConfig) -> ImagePreparer:
        return ImagePreparer(config.model, PIXELS)

    def process(self, batch: pa.Table) -> pa.Table:
        return prepare_then_infer(self, self.prepare, batch)

    def infer(self, prepared: pa.Table) -> pa.Table:
        seed = _batch_seed(prepared.column(C.UID).to_pylist(), self.config.seed)
        captions = self.caption_pixels(pixels_array(prepared.column(PIXELS), *self.prepare.size), seed)
        return pa.table({C.SYNTHETIC_CAPTIONS: pa.array(captions, pa.list_(pa.string()))})

    def caption(self, images: list[Any], seed: int = 0) -> list[list[str]]:
        """K captions per PIL image, prompt stripped, whitespace normalised."""
        return self.caption_pixels(np.stack([self.prepare.resize(image) for image in images]), seed)

    def caption_pixels(self, pixels: np.ndarray, seed: int = 0) -> list[list[str]]:
        """K captions per prepared image (n x H x W x 3 uint8)."""
        config = self.config
        torch = self.torch
        k, n = config.num_captions, len(pixels)
        generate: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "min_new_tokens": config.min_new_tokens,
                                    "repetition_penalty": config.repetition_penalty, "num_return_sequences": k}
        if config.decoding == "nucleus":
            generate.update(do_sample=True, top_p=config.top_p, top_k=0, temperature=config.temperature)
        else:
            generate.update(do_sample=False, num_beams=max(config.num_beams, k))
        with torch.inference_mode():
            torch.manual_seed(seed)
            pixel_values = to_model_input(pixels, self.device, self.dtype, self.prepare.mean, self.prepare.std, scale=None)
            prompt_ids = self.prompt["input_ids"].repeat(n, 1).to(self.device) if self.prompt is not None else None
            mask = self.prompt["attention_mask"].repeat(n, 1).to(self.device) if self.prompt is not None else None
            out = self.model.generate(pixel_values=pixel_values, input_ids=prompt_ids, attention_mask=mask, **generate)
        decoded = self.processor.batch_decode(out, skip_special_tokens=True)
        prompt = (config.prompt or "").strip().lower()
        cleaned = [" ".join(_strip_prompt(d.strip(), prompt).split()) for d in decoded]
        return [cleaned[j * k:(j + 1) * k] for j in range(n)]


PIXELS = f"{C.PREPARED_PREFIX}blip_pixels"


def _strip_prompt(text: str, prompt: str) -> str:
    return text[len(prompt):].strip() if prompt and text.lower().startswith(prompt) else text


def _batch_seed(uids: list[str], seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{','.join(sorted(uids))}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
