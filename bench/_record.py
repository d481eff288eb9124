"""Append a benchmark's printed report to bench/RESULTS.md under a dated heading."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_result(title: str, report: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a") as f:
        f.write(f"\n### {title}, {os.cpu_count()} cores, {stamp}\n\n```\n{report}\n```\n")


def report(title: str, lines: list[str], record: bool) -> None:
    """Print a benchmark's table and, unless told not to, append it to RESULTS.md."""
    text = "\n".join(lines)
    print(text)
    if record:
        append_result(title, text)
