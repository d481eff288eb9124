"""What `dataengine` prints while it works: a console that reads like a tool, and a log file for the rest.

On a terminal: one live line per running stage (rows in, kept, rejected, rows/s) and a bar per
training stage, redrawn in place. Not on a terminal (CI, a pipe, a Ray job's log): a plain line per
stage every few seconds and when it ends. Milestones and dataengine's warnings are printed as lines.

Everything else (Ray's operator reports and worker output, loaders' chatter, third-party progress
bars, C++ core-worker messages) goes to `RUN/dataengine.log`: while a run is being written, the
process's stderr file descriptor points at the log, so output that never passes through Python's
logging lands there too. `--verbose` keeps the old behaviour: every log line on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from dataengine.core.layout import LOG_FILE
from dataengine.core.progress import PROGRESS_LOGGER, ProgressEvent, StageProgress, StepProgress

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_INTERVAL_S = float(os.environ.get("DATAENGINE_PROGRESS_INTERVAL", "5"))
_REDRAW_S = 0.1
_BAR = 24


class Console(logging.Handler):
    """A logging handler that draws progress events and prints milestones and dataengine's warnings."""

    def __init__(self, stream: IO[str], live: bool | None = None, interval: float = PLAIN_INTERVAL_S) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.interval = interval
        self._running: dict[str, ProgressEvent] = {}
        self._printed_at: dict[str, float] = {}
        self._drawn = 0
        self._drawn_at = 0.0
        self._lock_ = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == PROGRESS_LOGGER or (record.name.startswith("dataengine") and record.levelno >= logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "progress", None)
            with self._lock_:
                if event is None:
                    self._print_line(self._plain(record))
                elif self.live:
                    self._draw_event(event)
                else:
                    self._print_event(event)
        except Exception:  # noqa: BLE001 - a drawing problem must never stop a run
            self.handleError(record)

    def _plain(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"

    # ---- not a terminal: plain lines, each key at most every `interval` seconds, and when done ----

    def _print_event(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.done or now - self._printed_at.get(event.key, -1e9) >= self.interval:
            self._printed_at[event.key] = now
            self._write(event.describe() + "\n")

    # ---- a terminal: running events redrawn in place, finished ones printed above them ----------

    def _draw_event(self, event: ProgressEvent) -> None:
        if event.done:
            self._running.pop(event.key, None)
            self._print_line(_render(event, self._width()))
            return
        self._running[event.key] = event
        if time.monotonic() - self._drawn_at >= _REDRAW_S:
            self._redraw("")

    def _print_line(self, line: str) -> None:
        if self.live and self._drawn:
            self._redraw(line + "\n")
        else:
            self._write(line + "\n")

    def _redraw(self, above: str) -> None:
        """Replace the live lines (with `above` printed first, where it stays)."""
        width = self._width()
        lines = [_render(e, width) for e in self._running.values()]
        up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self._write(up + above + "".join(line + "\n" for line in lines))
        self._drawn, self._drawn_at = len(lines), time.monotonic()

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _render(event: ProgressEvent, width: int) -> str:
    """One terminal line for an event."""
    if isinstance(event, StageProgress):
        rate = f"{event.rows_per_second:>9,.1f} rows/s" + (f"  done in {event.seconds:.1f}s" if event.done else "")
        line = (f"  {event.stage:<24}{event.rows_in:>10,} in{event.kept:>10,} kept{event.rejected:>9,} rejected  "
                f"{rate}")
    else:
        assert isinstance(event, StepProgress)
        filled = int(_BAR * event.step / event.total) if event.total else 0
        loss = f"  loss {event.loss:.3f}" if event.loss is not None else ""
        pace = f"  {event.seconds:.1f}s" if event.done else \
            f"  {event.step_seconds:.2f} s/step" if event.step_seconds is not None else ""
        line = f"  {event.label:<24}[{'#' * filled}{'.' * (_BAR - filled)}] {event.step}/{event.total} steps{loss}{pace}"
    return line[:width]


def setup(verbose: bool) -> None:
    """The process's logging: `--verbose` prints every log line; otherwise the console handler only."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_dataengine", False)]:  # ours from an earlier call only
        root.removeHandler(old)
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.setLevel(logging.DEBUG)
        logging.getLogger("dataengine").setLevel(logging.DEBUG)
    else:
        handler = Console(sys.stderr)
        root.setLevel(logging.INFO)
    handler._dataengine = True  # type: ignore[attr-defined]
    root.addHandler(handler)


@contextlib.contextmanager
def run_log(run_dir: Path, verbose: bool) -> Iterator[Path]:
    """Send everything but the console's own lines to `run_dir/dataengine.log` while the body runs.

    The console keeps writing to the terminal (a duplicate of the original stderr); the process's
    stderr descriptor (fd 2) and `sys.stderr` point at the log, so Ray's worker output, C++ messages
    and third-party bars land there. Only when stderr is this process's real stderr (not a test's
    capture) and not `--verbose`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_FILE
    root = logging.getLogger()
    log_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(file_handler)
    log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    redirect = not verbose and _is_process_stderr(sys.stderr)
    saved_fd, saved_stderr, consoles = None, sys.stderr, [h for h in root.handlers if isinstance(h, Console)]
    if redirect:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        terminal = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding=getattr(saved_stderr, "encoding", "utf-8"))
        for console in consoles:
            console.stream = terminal
        os.dup2(log_file.fileno(), 2)
    failed = False
    try:
        yield path
    except BaseException:
        failed = True
        logging.getLogger("dataengine").debug("run ended by an exception", exc_info=True)
        raise
    finally:
        root.removeHandler(file_handler)
        if saved_fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            for console in consoles:
                console.stream.flush()
                console.stream = saved_stderr
            terminal.close()
        log_file.close()
        if failed:
            print(f"the full log: {path}", file=sys.stderr)


def _is_process_stderr(stream: IO[str]) -> bool:
    try:
        return stream is sys.__stderr__ and stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False
