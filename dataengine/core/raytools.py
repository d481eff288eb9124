"""Ray helpers for the layers below the engine: worker log setup, progress bars, reading files and
mapping Arrow tables with Ray Data (the trainer's and evaluator's data), and fanning a pure function out
as Ray tasks (the dedup index's partitions).

Here, not in the engine's adapter (`engine/raydata.py`), because that adapter imports the operators and
the trainer, and these are used by them. Ray is imported inside each function: importing this module
costs nothing, and a process without Ray running never starts one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

if TYPE_CHECKING:
    import ray.data

T = TypeVar("T")


def quiet_worker_logs() -> None:
    """Worker setup hook (and called again by the training loop, after Ray Train sets up its logging):
    Ray Train's placement-group cleaner polls the State API, which needs the dashboard; without one (the
    embedded default) it warns every few seconds for the whole training. Train workers also log every
    checkpoint report at INFO (under a logger named by its file path), Ray Data announces the datasets a
    worker runs (the trainer's and evaluator's tokenizing), and transformers draws progress bars for every
    save and load: our trainer and evaluator log their own progress. It imports nothing: it runs in every
    worker process, and importing Ray Train or transformers there would cost seconds per worker."""
    import ray

    report_logger = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    for name in ("ray.train", report_logger, "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it when first imported


#: runtime-env entry that runs `quiet_worker_logs` in every worker process (embedded Ray, clusters, jobs)
QUIET_WORKERS = {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"}


def show_ray_progress(show: bool) -> None:
    """Whether Ray Data draws (or, off a terminal, logs) its own per-operator progress in this process;
    the CLI turns it off and draws one line per stage instead."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = show


def read_files(files: list[str], read: Callable[[str], pa.Table]) -> ray.data.Dataset:
    """`read(path)` for each file in a task of its own, streamed: `read_parquet`'s threaded listing
    races on an optional fsspec import in Ray 2.60 (see `engine.raydata.stream_pipeline`)."""
    import ray.data

    def read_batch(batch: dict) -> pa.Table:
        return pa.concat_tables([read(str(path)) for path in batch["path"]])

    return ray.data.from_items([{"path": f} for f in files]).map_batches(read_batch, batch_size=1, batch_format="numpy")


def map_tables(ds: ray.data.Dataset, fn: Callable[..., pa.Table], fn_kwargs: dict, batch_size: int,
               num_cpus: float) -> ray.data.Dataset:
    """`fn(table, **fn_kwargs)` over Arrow batches in tasks."""
    return ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus)


def parallel_map(fn: Callable[..., T], args: list[tuple]) -> list[T]:
    """`fn(*a)` for each `a`, as Ray tasks when Ray is running (in this process), else in a loop."""
    import ray  # heavy, and only needed when there is more than one call

    if not ray.is_initialized() or len(args) < 2:
        return [fn(*a) for a in args]
    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(*a) for a in args])


def get(refs: Any) -> Any:
    """`ray.get`, raising a task's own exception (an `InputError`, an `AccountingError`) instead of Ray's
    wrapper, whose message carries the remote traceback: the CLI prints the message, never a traceback."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
            raise cause from None
        raise


def cluster_cpus(default: float = 0.0) -> float:
    """CPUs the connected Ray cluster has (`default` when it reports none)."""
    import ray

    return float(ray.cluster_resources().get("CPU", default))


def submit(fn: Callable[..., T], *args: Any, num_cpus: float = 1, num_gpus: float = 0) -> Any:
    """`fn(*args)` as one Ray task asking `num_cpus` (and `num_gpus`); the reference to `get`. The one
    place below the engine's adapter that sets a task's resources."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn).remote(*args)
