"""The training tests' shared model and sample: a tiny LLaVA built from the session's tiny parts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dataengine.train.config import ModelSpec
from dataengine.train.model import build_llava
from tests.conftest import encode_jpeg

TURNS = [{"from": "human", "value": "<image>\nHow many circles are there in the image?"}, {"from": "gpt", "value": "2"},
         {"from": "human", "value": "What colour is the star?"}, {"from": "gpt", "value": "Red."}]


@pytest.fixture(scope="module")
def llava(tiny_vlm_parts):
    return build_llava(ModelSpec(vision=str(tiny_vlm_parts["vision"]), lm=str(tiny_vlm_parts["lm"])))


def random_image(seed: int = 0) -> Any:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 80, 3), dtype=np.uint8))


def random_jpeg(seed: int = 0) -> bytes:
    return encode_jpeg(random_image(seed))
