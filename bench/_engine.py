"""Run `dataengine run` as a user would (a subprocess with its embedded Ray) and watch its memory."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def run_dataengine(spec_path: Path, address: str | None = None) -> tuple[float, int]:
    """Wall seconds and the driver's peak RSS in bytes (the `dataengine run` process only, polled every
    0.1 s; its Ray workers are not counted). Exits with the run's stderr if it fails. With `address`, the
    run joins that running Ray (`--address`) instead of starting its embedded one."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "dataengine.cli", "run", str(spec_path), "--no-report"]
    proc = subprocess.Popen(command + (["--address", address] if address else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def poll() -> None:
        process = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"dataengine run failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - started, peak[0]
