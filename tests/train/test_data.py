"""Training rows: the image token expands to the patch count, labels cover the replies only, long samples are skipped."""

from __future__ import annotations

import json

import numpy as np

from dataengine.train.data import IGNORE_INDEX, encode_row
from tests.train.conftest import TURNS, random_jpeg


def test_image_token_expands_to_patch_count_and_labels_cover_replies_only(llava):
    model, processor = llava
    row = {"uid": "0-0", "image": random_jpeg(), "conversations": json.dumps(TURNS), "caption": "x"}
    encoded = encode_row(row, processor, stage=2, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    image_id = model.config.image_token_id
    assert int((ids == image_id).sum()) == (64 // 8) ** 2 == model.config.image_seq_length
    trained = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    eos = processor.tokenizer.eos_token
    assert trained == f" 2{eos} Red.{eos}"
    assert np.all(labels[ids == image_id] == IGNORE_INDEX)
    # labels equal the input ids wherever they are set (the shift happens in the loss)
    assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # stage 1 trains on the caption only
    stage1 = encode_row(row, processor, stage=1, max_length=512)
    assert processor.tokenizer.decode(stage1["input_ids"][stage1["labels"] != IGNORE_INDEX]) == f" x{eos}"


def test_too_long_sample_is_a_skip_not_a_truncation(llava):
    _, processor = llava
    row = {"uid": "0-0", "image": random_jpeg(), "conversations": json.dumps(TURNS)}
    full = encode_row(row, processor, stage=2, max_length=512)
    skipped = encode_row(row, processor, stage=2, max_length=len(full["input_ids"]) - 1)
    assert skipped["skip"] == "too_long" and "input_ids" not in skipped
    assert encode_row({**row, "image": b"not an image"}, processor, 2, 512)["skip"] == "bad_image"

