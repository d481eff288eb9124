"""LLM token usage and spend of a run, shared by every worker, and the budget that caps it.

Each worker appends one JSON line per paid request to its own file under `<run>/_state/llm-usage/`
(no two writers share a file, so no locks; the run directory is shared on a cluster anyway). Totals
are the sum over all files: they include requests of failed attempts and of rows that were later
redone, because those were paid too. A worker reads the totals when it starts a batch and adds its
own spend as it goes, so with a budget the run stops after at most the requests already in flight.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


class BudgetExhausted(RuntimeError):
    """The run's LLM budget is spent; the run stops and a rerun with a larger budget continues."""


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd += cost_usd

    def as_dict(self) -> dict[str, float | int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "cost_usd": round(self.cost_usd, 6)}


@dataclass(frozen=True)
class Budget:
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None

    def exceeded(self, usage: Usage) -> str | None:
        """Why `usage` is over budget, or None."""
        if self.max_cost_usd is not None and usage.cost_usd >= self.max_cost_usd:
            return f"LLM budget reached: ${usage.cost_usd:.4f} spent of max_cost_usd ${self.max_cost_usd:g}"
        if self.max_total_tokens is not None and usage.total_tokens >= self.max_total_tokens:
            return f"LLM budget reached: {usage.total_tokens} tokens used of max_total_tokens {self.max_total_tokens}"
        return None


def read_usage(directory: str | Path) -> Usage:
    """Totals over every worker's usage file (a torn last line from a killed worker is skipped)."""
    total = Usage()
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            total.add(int(row["prompt_tokens"]), int(row["completion_tokens"]), float(row["cost_usd"]))
    return total


class UsageLedger:
    """This worker's append-only usage file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._file: TextIO | None = None

    def record(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        """One line, flushed to the OS at once (a killed worker loses nothing it was billed for); the file
        stays open between lines, as hundreds of replies a second arrive."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close/__del__)
        self._file.write(json.dumps({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "cost_usd": cost_usd}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        self.close()

    def totals(self) -> Usage:
        return read_usage(self.directory)
