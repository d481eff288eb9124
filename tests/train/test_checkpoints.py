"""Checkpoints: a copy cut off is never resumed from; a finished stage keeps only its newest."""

from __future__ import annotations

import json
from pathlib import Path


def _fake_checkpoint(storage: Path, attempt: str, step: int) -> Path:
    """A checkpoint directory as `_save_checkpoint` leaves it: weights, state, and the file list last."""
    from dataengine.train.checkpoints import STATE_FILE, write_file_list

    ckpt = storage / attempt / f"checkpoint_{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"x" * 100)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
    write_file_list(ckpt)
    return ckpt


def test_a_checkpoint_copy_cut_off_is_not_resumed_from(tmp_path):
    """A restart takes the newest *complete* checkpoint: one whose copy was cut off (a file short or
    missing) is passed over for the older complete one."""
    from dataengine.train.checkpoints import is_complete, latest_checkpoint

    storage = tmp_path / "checkpoints"
    oldest, newest = (_fake_checkpoint(storage, "stage2-1", step) for step in (1, 2))
    assert is_complete(newest) and latest_checkpoint(storage) == newest
    (newest / "model.safetensors").write_bytes(b"x" * 40)  # the copy was cut off
    assert not is_complete(newest) and latest_checkpoint(storage) == storage / "stage2-1" / "checkpoint_1"
    (oldest / "model.safetensors").unlink()
    assert latest_checkpoint(storage) is None


def test_a_finished_stage_keeps_only_its_newest_complete_checkpoints(tmp_path):
    from dataengine.train.checkpoints import prune_checkpoints

    storage = tmp_path / "checkpoints"
    for attempt, steps in (("stage1-1", (1, 2, 3)), ("stage1-2", (4, 5))):  # a second attempt after --resume
        for step in steps:
            _fake_checkpoint(storage, attempt, step)
    (storage / "stage1-2" / "checkpoint_5" / "model.safetensors").write_bytes(b"x")  # cut off: not kept
    (storage / "stage1-2" / "checkpoint_6").mkdir()  # an empty copy from a kill
    deleted = prune_checkpoints(storage, keep=2)
    left = sorted(p.name for p in storage.glob("*/checkpoint_*"))
    assert left == ["checkpoint_3", "checkpoint_4"] and len(deleted) == 4
