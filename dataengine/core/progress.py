"""Progress events: what a run is doing now, for whoever shows it.

The library logs and never draws. Stages and training report through the `dataengine.progress`
logger with the event attached (`extra={"progress": event}`): in a log file each is a plain line,
and the CLI's console (`dataengine.console`) draws them live. Plain messages on the same logger are
milestones ("stage 1: 642 train rows ..."), shown on the console too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROGRESS_LOGGER = "dataengine.progress"
#: no new training step for this long is said on the console (a stage's start takes 30-45 s on 2 busy cores)
STALL_SECONDS = 300.0
log = logging.getLogger(PROGRESS_LOGGER)


@dataclass(frozen=True)
class StageProgress:
    """One stage's rows so far in the running part of a pipeline (one console line)."""

    key: str
    stage: str
    rows_in: int
    kept: int
    rejected: int
    seconds: float
    done: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        state = "done" if self.done else f"{self.rows_per_second:,.1f} rows/s"
        return (f"{self.stage}: {self.rows_in:,} in, {self.kept:,} kept, {self.rejected:,} rejected, "
                f"{state}" + (f" ({self.rows_per_second:,.1f} rows/s, {self.seconds:.1f}s)" if self.done else ""))


@dataclass(frozen=True)
class StepProgress:
    """A training stage's optimizer steps so far (one bar on a terminal)."""

    key: str
    label: str
    step: int
    total: int
    loss: float | None
    seconds: float  # since the stage started (worker start-up included)
    step_seconds: float | None = None  # the last step's own time
    done: bool = False

    def describe(self) -> str:
        loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
        pace = f", {self.step_seconds:.2f} s/step" if self.step_seconds is not None else ""
        tail = f", done in {self.seconds:.1f}s" if self.done else pace
        return f"{self.label}: step {self.step}/{self.total}{loss}{tail}"


ProgressEvent = StageProgress | StepProgress


def report(event: ProgressEvent) -> None:
    """Log `event` on the progress logger (the console draws it; a log file gets its line)."""
    log.info(event.describe(), extra={"progress": event})


def note(message: str, *args: object) -> None:
    """A milestone line for the console and the log (what started, what finished, where it went)."""
    log.info(message, *args)


@dataclass(frozen=True)
class StepTrack:
    """One training's steps to follow: the metrics file it appends to, its progress key and label."""

    metrics_path: Path
    key: str
    label: str


class _Follow:
    """What has been read of one track's metrics file."""

    def __init__(self, track: StepTrack) -> None:
        self.track = track
        self.step, self.loss, self.seconds, self.reported = 0, None, None, 0
        # steps an earlier attempt wrote (a resumed stage) are not this run's progress
        self.offset = track.metrics_path.stat().st_size if track.metrics_path.exists() else 0

    def read_new(self) -> None:
        try:
            with self.track.metrics_path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        for line in complete.splitlines():
            row = json.loads(line)
            self.step, self.loss, self.seconds = row.get("step", self.step), row.get("loss"), row.get("seconds")
        self.offset += len(complete)


@contextlib.contextmanager
def watch_steps(metrics_path: Path, key: str, label: str, total: int, poll: float = 0.5,
                stall_after: float = STALL_SECONDS) -> Iterator[None]:
    """Report the steps a training loop appends to `metrics_path` (one JSON line per step, from
    whichever process trains) while the body runs, then the last one as done. Every `stall_after`
    seconds without a new step, a warning says so: a training whose data feed waits for a CPU that never
    frees is silent otherwise (Ray Data writes why to the run's log, not to the console)."""
    with watch_sweep_steps([StepTrack(metrics_path, key, label)], total, poll, stall_after):
        yield


@contextlib.contextmanager
def watch_sweep_steps(tracks: list[StepTrack], total: int, poll: float = 0.5,
                      stall_after: float = STALL_SECONDS) -> Iterator[None]:
    """`watch_steps` for trainings that run one after another in one run (a seed sweep), each `total`
    steps. A stall is no new step in any of them for `stall_after`; the warning names the first one not
    yet done, the one that should be moving. Why not a watcher each: a seed waiting its turn is not stalled."""
    stop = threading.Event()
    started = time.perf_counter()
    follows = [_Follow(track) for track in tracks]

    def follow() -> None:
        moved, warned = started, started
        while not stop.wait(poll):
            now = time.perf_counter()
            for f in follows:
                f.read_new()
                if f.step != f.reported:
                    f.reported, moved = f.step, now
                    report(StepProgress(f.track.key, f.track.label, f.step, total, f.loss, now - started, f.seconds))
            if now - max(moved, warned) >= stall_after:
                warned = now
                waiting = next((f for f in follows if f.step < total), follows[-1])
                log.warning("%s: no new step for %.0f s (%s); still waiting. If it never moves, the run's log says "
                            "why (Ray Data: \"Cluster resources are not enough to run any task\" means the data feed "
                            "has no free CPU)", waiting.track.label, now - moved,
                            f"at step {waiting.step}/{total}" if waiting.step else "not started")
        for f in follows:
            f.read_new()

    thread = threading.Thread(target=follow, name=f"watch-{tracks[0].key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    for f in follows:
        report(StepProgress(f.track.key, f.track.label, f.step, total, f.loss, time.perf_counter() - started,
                            f.seconds, done=True))
