"""The console: live lines on a terminal, plain lines in a pipe, everything else in RUN/dataengine.log."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time

import pytest

from dataengine.console import Console
from dataengine.core.progress import StageProgress, StepProgress, note, report, watch_steps
from tests.conftest import download_stage, synthweb_spec

# what must never reach the console by default: Ray Data's operator reports, Ray's auth notice, C++
# core-worker messages, worker output prefixes, loader chatter, third-party progress bars
# (tests/test_demo.py runs the real command in a pipe and checks its output against this list)
NOISE = ["logging_progress", "streaming_executor", "Token authentication", "core_worker", "pid=", "faiss.loader",
         "Loading weights", "Writing model shards", "Progress bars disabled", "Execution plan"]


@pytest.fixture
def console():
    """A Console on a StringIO, attached to the root logger for the test."""
    consoles = []

    def attach(live: bool, interval: float = 60.0) -> tuple[Console, io.StringIO]:
        stream = io.StringIO()
        handler = Console(stream, live=live, interval=interval)
        logging.getLogger().addHandler(handler)
        consoles.append(handler)
        return handler, stream

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    yield attach
    for handler in consoles:
        logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


def _stage(rows_in: int, rejected: int, done: bool = False, stage: str = "download") -> StageProgress:
    return StageProgress(f"run/segment-0/{stage}", stage, rows_in, rows_in - rejected, rejected, 2.0, done)


def test_plain_lines_per_stage_at_most_every_interval_and_when_done(console):
    _, out = console(live=False, interval=60.0)
    note("running download -> caption_rules_filter: 4 of 4 shards to do")
    report(_stage(100, 5))
    report(_stage(200, 9))  # within the interval: not printed
    report(_stage(80, 2, stage="caption_rules_filter"))  # another stage has its own interval
    report(_stage(400, 20, done=True))
    logging.getLogger("dataengine.engine.runner").info("committed shard 000001")  # log file only
    logging.getLogger("ray.data").warning("Progress bars disabled")  # log file only
    logging.getLogger("dataengine.engine.raydata").warning("a dataengine warning")
    assert out.getvalue().splitlines() == [
        "running download -> caption_rules_filter: 4 of 4 shards to do",
        "download: 100 in, 95 kept, 5 rejected, 50.0 rows/s",
        "caption_rules_filter: 80 in, 78 kept, 2 rejected, 40.0 rows/s",
        "download: 400 in, 380 kept, 20 rejected, done (200.0 rows/s, 2.0s)",
        "warning: a dataengine warning",
    ]
    assert "\x1b[" not in out.getvalue()


def test_a_terminal_gets_live_lines_redrawn_in_place_and_finished_ones_kept(console, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # lines are cut to the terminal's width
    handler, out = console(live=True)
    report(_stage(100, 5))
    time.sleep(0.12)  # redraws are at most every 0.1 s
    report(StepProgress("t/steps", "train stage 1", 6, 24, 2.5, 3.0, 0.5))
    time.sleep(0.12)
    report(_stage(200, 9))
    screen = out.getvalue()
    assert "\x1b[1F\x1b[J" in screen and "\x1b[2F\x1b[J" in screen  # back up over the 1, then 2 live lines
    last = screen.rsplit("\x1b[J", 1)[1].splitlines()
    assert re.match(r"\s+download\s+200 in\s+191 kept\s+9 rejected\s+100.0 rows/s", last[0]), last
    assert re.match(r"\s+train stage 1\s+\[######\.{18}\] 6/24 steps  loss 2.500  0.50 s/step", last[1]), last
    note("stage 1: evaluating ...")  # a milestone is printed above the live lines, which are drawn again
    report(StepProgress("t/steps", "train stage 1", 24, 24, 1.5, 9.0, 0.4, done=True))
    report(_stage(400, 20, done=True))
    assert handler._running == {}
    tail = out.getvalue().rsplit("\x1b[J", 1)[1].splitlines()
    assert re.match(r"\s+download\s+400 in\s+380 kept\s+20 rejected\s+200.0 rows/s  done in 2.0s$", tail[-1]), tail
    assert "stage 1: evaluating ..." in out.getvalue()
    assert re.search(r"train stage 1\s+\[#{24}\] 24/24 steps  loss 1.500  9.0s", out.getvalue())


def test_watch_steps_reports_each_new_step_of_a_metrics_file_and_the_last_as_done(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 7, "loss": 9.0}) + "\n")  # an earlier attempt's steps are not this run's
    seen: list = []

    class Collect(logging.Handler):
        def emit(self, record):
            if hasattr(record, "progress"):
                seen.append(record.progress)

    collect = Collect()
    logging.getLogger("dataengine.progress").addHandler(collect)
    logging.getLogger("dataengine.progress").setLevel(logging.INFO)

    def train() -> None:
        for step in (1, 2, 3):
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "loss": 3.0 - step, "seconds": 0.1 * step}) + "\n")
            time.sleep(0.08)

    try:
        with watch_steps(metrics, "t/steps", "train stage 2", total=3, poll=0.02):
            worker = threading.Thread(target=train)
            worker.start()
            worker.join()
    finally:
        logging.getLogger("dataengine.progress").removeHandler(collect)
    assert [e.step for e in seen if not e.done] == [1, 2, 3]
    final = seen[-1]
    assert final.done and (final.step, final.total, final.loss, final.label) == (3, 3, 0.0, "train stage 2")
    assert final.step_seconds == pytest.approx(0.3) and final.describe().startswith("train stage 2: step 3/3, loss 0.000, done")


def test_watch_steps_warns_when_no_step_comes(tmp_path):
    """A training that makes no step (its data feed starved, say) is said on the console, again after each
    further stall period, and the warning names the stage and where it stopped."""
    metrics = tmp_path / "metrics.jsonl"
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno == logging.WARNING:
                warnings.append(record.getMessage())

    collect = Collect()
    logging.getLogger("dataengine.progress").addHandler(collect)
    try:
        with watch_steps(metrics, "t/steps", "train stage 2", total=9, poll=0.01, stall_after=0.1):
            time.sleep(0.3)  # not started: about three stall periods
            metrics.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
            time.sleep(0.35)  # stopped at step 1
    finally:
        logging.getLogger("dataengine.progress").removeHandler(collect)
    where = ["not started" if "not started" in w else "at step 1/9" if "at step 1/9" in w else w for w in warnings]
    assert where[0] == "not started" and where[-1] == "at step 1/9"
    assert where == sorted(where, key=lambda w: w != "not started")  # once a step came, never "not started" again
    assert len(warnings) <= 8  # once per stall period, not once per poll (65 polls)
    assert all(w.startswith("train stage 2: no new step for") and "Cluster resources are not enough" in w for w in warnings)


def test_a_seed_waiting_its_turn_in_a_sweep_is_not_a_stall(tmp_path):
    """Seeds of a sweep train one after another in one run: while seed 0 makes steps, seed 1 waiting is no
    stall (one watcher per seed warned "not started" for it). A real stall names the seed that should move."""
    from dataengine.core.progress import StepTrack, watch_sweep_steps

    tracks = [StepTrack(tmp_path / f"seed{i}.jsonl", f"s{i}/steps", f"train stage 2 (seed {i})") for i in (0, 1)]
    warnings: list[str] = []
    steps: list = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno == logging.WARNING:
                warnings.append(record.getMessage())
            elif hasattr(record, "progress"):
                steps.append(record.progress)

    collect = Collect()
    logging.getLogger("dataengine.progress").addHandler(collect)
    logging.getLogger("dataengine.progress").setLevel(logging.INFO)

    def step(track: StepTrack, n: int) -> None:
        with track.metrics_path.open("a") as f:
            f.write(json.dumps({"step": n, "loss": 1.0 / n}) + "\n")

    try:
        with watch_sweep_steps(tracks, total=12, poll=0.01, stall_after=0.5):
            for n in range(1, 13):  # seed 0: 0.6 s of steps, longer than a stall period
                step(tracks[0], n)
                time.sleep(0.05)
            assert warnings == []
            step(tracks[1], 1)
            step(tracks[1], 2)
            time.sleep(1.2)  # seed 1 stops at step 2: two stall periods
    finally:
        logging.getLogger("dataengine.progress").removeHandler(collect)
    assert 1 <= len(warnings) <= 2, warnings
    assert all(w.startswith("train stage 2 (seed 1): no new step for") and "(at step 2/12)" in w for w in warnings)
    assert [e.step for e in steps if e.key == "s0/steps" and not e.done] == list(range(1, 13))
    assert [(e.key, e.step) for e in steps if e.done] == [("s0/steps", 12), ("s1/steps", 2)]


def test_verbose_prints_every_log_line_on_the_console(ray_local, synthweb_dir, synthweb_server, tmp_path, capfd):
    """`--verbose` after the command: our INFO lines on the console, no redirection (in-process, on the
    session's Ray)."""
    from dataengine import cli

    spec = synthweb_spec(tmp_path, synthweb_dir, synthweb_server.base_url, [download_stage()])
    assert cli.main(["run", str(spec), "--no-report", "--verbose"]) == 0
    err = capfd.readouterr().err
    assert "INFO dataengine.engine.runner: committed shard" in err and "INFO dataengine.progress: download: 120 in" in err
    assert "committed shard" in (tmp_path / "run" / "dataengine.log").read_text()
