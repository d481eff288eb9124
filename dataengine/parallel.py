"""Independent calls of a pure function, fanned out as Ray tasks when Ray is up in this process.

Below the operators (the dedup index partitions its search with it) and above nothing of ours, so an
operator can use Ray without importing the runner's Ray adapter, which imports the operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def parallel_map(fn: Callable[..., T], args: list[tuple]) -> list[T]:
    """`fn(*a)` for each `a`, as Ray tasks when Ray is running (in this process), else in a loop."""
    import ray  # heavy, and only needed when there is more than one call

    if not ray.is_initialized() or len(args) < 2:
        return [fn(*a) for a in args]
    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(*a) for a in args])
