"""The image side of a transformers model stage's CPU half (BLIP's captioner and ITM filter): decode,
and resize as the model's own image processor does, in a prepare task or the actor."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from dataengine.core import columns as C
from dataengine.models.loaders import hf_image_prep
from dataengine.models.pixels import pixels_column


class ImagePreparer:
    """The CPU half of a BLIP stage's image side: decode each image and resize it as the model's image
    processor does (its config only, no weights); rows without an image, or with a broken one, are
    rejected here."""

    def __init__(self, model: str, column: str) -> None:
        self.column = column
        self.resize, self.size, self.mean, self.std = hf_image_prep(model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table(self.columns(batch))

    def columns(self, batch: pa.Table) -> dict[str, pa.Array]:
        from PIL import Image

        n = batch.num_rows
        images = batch.column(C.IMAGE).to_pylist() if C.IMAGE in batch.column_names else [None] * n
        reasons: list[str | None] = [None] * n
        pixels: list[np.ndarray | None] = [None] * n
        for i, image in enumerate(images):
            if image is None:
                reasons[i] = "no_image"
                continue
            try:
                pixels[i] = self.resize(Image.open(io.BytesIO(image)))
            except (OSError, ValueError):
                reasons[i] = "decode_error"
        return {self.column: pixels_column(pixels, *self.size), C.REJECT_REASON: pa.array(reasons, pa.string())}
