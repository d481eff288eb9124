"""Checkpoint files on disk: what a checkpoint holds, whether a copy is complete, which is newest.

Ray Train registers a checkpoint only when its controller has collected every worker's report for
that step, and it polls workers every couple of seconds: a worker killed within that window leaves a
checkpoint that is complete on disk but unknown to Ray, which would restart from an older one (or
from the start). So a restart takes the newest *complete* checkpoint on disk. A copy that was cut
off (a kill during the upload) is told apart by the file list written into every checkpoint: each
listed file must be there with its size.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE, OPTIMIZER_FILE, LINEAGE_FILE = "trainer_state.json", "optimizer.pt", "dataengine_lineage.json"
FILES_FILE = "dataengine_files.json"


def write_file_list(directory: Path) -> None:
    """Record every file of a finished checkpoint directory with its size (call last)."""
    files = {str(p.relative_to(directory)): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != FILES_FILE}
    (directory / FILES_FILE).write_text(json.dumps(files, indent=1))


def is_complete(directory: Path) -> bool:
    """Whether every file the checkpoint listed is present with its recorded size."""
    try:
        files = json.loads((directory / FILES_FILE).read_text())
        return all((directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, json.JSONDecodeError, AttributeError):  # missing, cut off, or deleted while we look
        return False


def checkpoint_step(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / STATE_FILE).read_text())["step"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def complete_checkpoints(storage: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under a stage's Ray Train storage, newest first."""
    found = []
    for state in storage.glob("**/checkpoint_*/" + STATE_FILE):
        directory = state.parent
        if not (directory / FILES_FILE).exists():
            log.warning("%s has no %s (written before checkpoints listed their files, or cut off): not resumed from",
                        directory, FILES_FILE)
        step = checkpoint_step(directory)
        if step is not None and is_complete(directory):
            found.append((step, directory))
    return sorted(found, reverse=True)


def latest_checkpoint(storage: Path) -> Path | None:
    """The complete checkpoint with the highest step, if any."""
    found = complete_checkpoints(storage)
    return found[0][1] if found else None


def prune_checkpoints(storage: Path, keep: int = 2) -> list[Path]:
    """After a stage finished: delete every checkpoint under `storage` but the newest `keep` complete ones
    (Ray's `num_to_keep` only prunes those it registered, not cut-off copies or ones a kill kept from it).
    Returns what was deleted."""
    kept = {directory for _, directory in complete_checkpoints(storage)[:keep]}
    deleted = sorted(d for d in storage.glob("**/checkpoint_*") if d.is_dir() and d not in kept)
    for directory in deleted:
        shutil.rmtree(directory, ignore_errors=True)
    return deleted
