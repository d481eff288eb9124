"""The operator contract and registry.

An operator is a class registered by name with a typed pydantic config. It processes a batch (a
`pyarrow.Table` of the rows still alive) and returns the columns it adds, one value per row, plus an
optional `reject_reason` column (null = keep). It never drops rows: `apply_stage` routes rejected rows
onward with their reason, so the runner can prove every input row ends kept or rejected.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from dataengine.core import columns as C
from dataengine.core.schemas import sample_schema


class OpConfig(BaseModel):
    """Fields every stage has. Subclasses add their own and set `op: Literal["<name>"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    name: str | None = Field(default=None, description="Stage name in outputs; defaults to the op name.")
    batch_size: int = Field(default=64, gt=0, description="Rows per batch handed to the op.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per task or actor.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per actor (model ops).")
    concurrency: int | None = Field(default=None, gt=0, description="Max parallel tasks/actors; default: as many as fit.")


class ModelOpConfig(OpConfig):
    """Fields of ops that hold a model: where it runs and in what precision."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: the GPU when the actor has one (num_gpus > 0), else the CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    concurrency: int | None = Field(default=1, gt=0, description="Actors in the pool (each loads the model once).")
    min_actors: int | None = Field(default=None, gt=0, description="Smallest actor pool (default 1; up to "
                                                                     "`concurrency` as the stream keeps them busy).")
    prepare_in: Literal["auto", "tasks", "actor"] = Field(
        default="auto", description="Where the stage's CPU half runs (decode, resize, tokenise): tasks: Ray Data tasks "
        "that scale with the cluster's CPUs and hand the actor arrays it only moves to the device; actor: in the "
        "model's actor, no hop between processes; auto: tasks when the stage has GPUs, else the actor.")
    prepared_batches: int = Field(default=4, gt=0, description="Prepared batches queued per actor (prepare_in: tasks), "
                                                               "so the model does not wait on the CPUs.")


ConfigT = TypeVar("ConfigT", bound=OpConfig)


@dataclass(frozen=True)
class Score:
    """A filter's score as code outside the op needs it: the report draws it against the cut, a
    quantile barrier ranks by it. `threshold_field` / `fraction_field` name the config fields holding
    an absolute cut and a keep-fraction."""

    column: str
    label: str
    threshold_field: str
    fraction_field: str | None
    higher_is_better: bool
    log_scale: bool = False
    note: str = ""


class Op(ABC, Generic[ConfigT]):
    """Base class of all operators, generic over their config (`class Dedup(Op[DedupConfig])`), so
    `self.config` and the classmethods' `config` have the op's own config type.

    Stateless ops run as Ray tasks; ops with `stateful = True` hold a model and run as a pool of
    actors that build the op once in `__init__`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[OpConfig]]
    stateful: ClassVar[bool] = False
    score: ClassVar[Score | None] = None  # filters: their score column and threshold fields

    def __init__(self, config: ConfigT) -> None:
        self.config: ConfigT = config

    @abstractmethod
    def process(self, batch: pa.Table) -> pa.Table:
        """Return the added columns for `batch` (same row count and order) and optionally `reject_reason`."""

    # A barrier op scores in the stream (`process`) and decides after every row is scored: the runner
    # ends the segment after it, calls `decide` once over the alive rows' `decision_columns`, saves the
    # decision, and starts the next segment with `apply_decision`. Both are classmethods: deciding must
    # not load the op's model.

    # A model stage splits into a CPU half and a model half (`preparer` and `infer`): the engine runs the
    # preparer in tasks (`prepare_in: tasks`) or in the actor before `infer` (`actor`); `process` is
    # then both halves in one process, so the outputs are the same wherever the preparer ran.

    @classmethod
    def splits(cls, config: ConfigT) -> bool:
        """Whether this configuration has a CPU half (`preparer`); asked on the driver: builds nothing."""
        return False

    @classmethod
    def preparer(cls, config: ConfigT) -> Preparer:
        """The stage's CPU half, built without the model (once per worker process)."""
        raise NotImplementedError(f"{cls.__qualname__} has no preparer")

    def infer(self, prepared: pa.Table) -> pa.Table:
        """The model half: the rows the preparer kept, with its `_prepared_*` columns; returns what `process`
        returns for them. Moves arrays to the device and runs the model; no per-row Python."""
        raise NotImplementedError(f"{type(self).__qualname__} is not split into a preparer and infer")

    @classmethod
    def is_barrier(cls, config: ConfigT) -> bool:
        return False

    @classmethod
    def bind_run(cls, config: ConfigT, run_dir: Path) -> ConfigT:
        """The config this run's workers get: ops that keep state in the run directory (a cache,
        usage files) learn where it is here. Called by the runner after the spec hash is taken."""
        return config

    @classmethod
    def after_run(cls, config: ConfigT, run_dir: Path) -> None:
        """Work that needs the finished run (an export); called once the run is complete."""

    @classmethod
    def ray_llm_stage(cls, config: ConfigT) -> RayLLMStage | None:
        """How the op generates through Ray Data LLM (a dataset-level processor the engine's Ray adapter
        runs between the op's prepare and finish phases); None for ordinary ops."""
        return None

    @classmethod
    def requires(cls, config: ConfigT) -> list[Requirement]:
        """Optional packages this configuration needs (checked before a run starts and by `validate`)."""
        return []

    @classmethod
    def decision_columns(cls, config: ConfigT) -> list[str]:
        return []

    @classmethod
    def quantile(cls, config: ConfigT) -> Quantile | None:
        """A barrier whose decision is a rank cut (keep the best `fraction` by `column`) says so here:
        the engine then finds the cut across tasks instead of gathering every score (`decide` is not
        called). None: `decide` sees all rows at once."""
        return None

    @classmethod
    def near_duplicates(cls, config: ConfigT) -> NearDuplicates | None:
        """A barrier whose decision is near-duplicate grouping says how here: above `exact_max_rows` the
        engine partitions, searches and groups across tasks (`decide` is not called). None: `decide`."""
        return None

    @classmethod
    def decide(cls, config: ConfigT, scores: pa.Table) -> dict[str, Any]:
        """A JSON-serialisable decision from `uid` + `decision_columns` of every alive row."""
        raise NotImplementedError(f"{cls.__qualname__} is not a barrier op")

    @classmethod
    def apply_decision(cls, config: ConfigT, batch: pa.Table, decision: dict[str, Any]) -> pa.Table:
        """The `reject_reason` column (and any other added columns) for `batch` under `decision`."""
        raise NotImplementedError(f"{cls.__qualname__} is not a barrier op")


ModelConfigT = TypeVar("ModelConfigT", bound=ModelOpConfig)


class ModelOp(Op[ModelConfigT]):
    """An op that holds a model: it runs as a pool of actors, each loading the model once, on the
    config's device and in its dtype (`load_model`), and keeps where the weights landed."""

    stateful: ClassVar[bool] = True

    def __init__(self, config: ModelConfigT) -> None:
        super().__init__(config)
        import torch

        self.torch = torch
        self.model = self.load_model(config)
        weights = next(self.model.parameters())
        self.device, self.dtype = weights.device, weights.dtype

    @abstractmethod
    def load_model(self, config: ModelConfigT) -> Any:
        """Load and return the model (in eval mode, on `config.device` in `config.dtype`); keep its
        processor or tokenizer on `self`."""


@dataclass(frozen=True)
class Quantile:
    """Keep round(fraction * n) rows, best first by `column` (highest or lowest), ties by smaller uid."""

    column: str
    fraction: float
    highest: bool


@dataclass(frozen=True)
class NearDuplicates:
    """Group rows whose descriptors in `column` are near (cosine >= `threshold`, or at most `threshold`
    differing bits for binary codes, and colours within `colour_tolerance` where the codes carry a colour
    layout after `hash_bytes`); keep one per group, the highest `priority` first, ties by smaller
    uid; reject the others as `duplicate_of:<kept uid>`. `screen(uids, descriptors)` rejects rows before
    grouping (uid -> reason: copies of a benchmark) and must be picklable (tasks call it)."""

    column: str
    metric: Literal["cosine", "hamming"]
    threshold: float
    priority: str | None = None
    exact_max_rows: int = 50_000
    partitions: int | None = None
    assign: int = 8
    screen: Callable[[list[str], np.ndarray], dict[str, str]] | None = None
    hash_bytes: int | None = None  # binary codes: the bytes Hamming distance counts (the rest: a colour layout)
    colour_tolerance: int | None = None  # binary codes: the most any colour-layout byte may differ (`dedup.hamming.within`)
    one_task_only: str | None = None  # an option decided in one task only (dedup's "crops"): above exact_max_rows, an error


@dataclass(frozen=True)
class RayLLMStage:
    """An op's generation through Ray Data LLM, in the adapter's terms: run the op with `prepare` (it
    writes each row's request), then the vLLM processor built from `processor_kwargs` with
    `preprocess`/`postprocess` translating rows, then the op itself (it reads the replies)."""

    prepare: OpConfig
    processor_kwargs: dict[str, Any]
    preprocess: Callable[[dict[str, Any]], dict[str, Any]]
    postprocess: Callable[[dict[str, Any]], dict[str, Any]]


class Requirement(NamedTuple):
    """An optional package a configured op needs: the module it imports and how to install it."""

    module: str
    install: str


Preparer = Callable[[pa.Table], pa.Table]
"""A model stage's CPU half: rows in, `_prepared_*` columns (and `reject_reason` for rows it cannot
prepare: no image, a broken one) out, one value per row."""

PREPARE, INFER = "prepare", "infer"  # the phases of a split model stage (`Step.phase`)


class Step(NamedTuple):
    """One step of a segment: run stage `index`'s op, or, with a `decision`, apply its decision. `phase`:
    one half of a split model stage (PREPARE in tasks, INFER in the actor); None: the whole op."""

    index: int
    config: OpConfig
    decision: dict[str, Any] | None = None
    phase: str | None = None


def prepares_in_tasks(config: OpConfig) -> bool:
    """Whether a stage runs its CPU half in tasks apart from its actor: it is split, and `prepare_in` is
    tasks, or auto with GPUs (on a CPU the model competes with the preparer for the same cores)."""
    op = get_op(config.op)
    if not (op.stateful and op.splits(config)):
        return False
    where = getattr(config, "prepare_in", "actor")
    if where == "auto":
        where = "tasks" if config.num_gpus > 0 else "actor"
    return where == "tasks"


def split_steps(steps: list[Step]) -> list[Step]:
    """Each step whose stage prepares in tasks becomes two: PREPARE, then INFER."""
    out = []
    for step in steps:
        if step.decision is None and step.phase is None and prepares_in_tasks(step.config):
            out += [step._replace(phase=PREPARE), step._replace(phase=INFER)]
        else:
            out.append(step)
    return out


def drop_prepared(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in batch.column_names if c.startswith(C.PREPARED_PREFIX)])


def prepare_then_infer(op: Op, prepare: Preparer, batch: pa.Table) -> pa.Table:
    """`process` of a split op: both halves in this process. Rows the preparer rejects keep its reason;
    the others get what `infer` says (their columns null where `infer` did not run)."""
    prepared = prepare(batch)
    reasons = prepared.column(C.REJECT_REASON) if C.REJECT_REASON in prepared.column_names else None
    alive = np.arange(batch.num_rows) if reasons is None else np.flatnonzero(pc.is_null(reasons).to_numpy(zero_copy_only=False))
    rows = batch.take(alive)
    for name in prepared.column_names:
        if name != C.REJECT_REASON:
            rows = rows.append_column(name, prepared.column(name).take(alive))
    result = op.infer(rows) if len(alive) else None
    out: dict[str, Any] = {}
    if result is not None:
        dead = np.setdiff1d(np.arange(batch.num_rows), alive, assume_unique=True)
        restore = pa.array(np.argsort(np.concatenate([alive, dead]), kind="stable"))
        for name in result.column_names:
            column = result.column(name)
            out[name] = pa.chunked_array([*column.chunks, pa.nulls(len(dead), column.type)], column.type).take(restore)
    if reasons is not None:
        inferred = out.get(C.REJECT_REASON)
        out[C.REJECT_REASON] = reasons if inferred is None else pc.coalesce(reasons, inferred.cast(pa.string()))
    return pa.table(out) if out else pa.table({C.REJECT_REASON: pa.nulls(batch.num_rows, pa.string())})


def run_step(step: Step, op: Any, batch: pa.Table, schema: pa.Schema | None = None,
             count_batch: bool = False) -> pa.Table:
    """Run a step on a batch: the op's `process`, its preparer (`op` is then the preparer) or its
    `infer` (the prepared columns dropped after it), or its class's `apply_decision`. `count_batch`:
    the batch is one of a model stage's batches (run.json reports how full they were)."""
    name = stage_name(step.config)
    if step.decision is None:
        assert op is not None
        if step.phase == PREPARE:
            return _apply(op, step.config.op, batch, name, step.index, schema)
        if step.phase == INFER:
            return drop_prepared(_apply(op.infer, op.name, batch, name, step.index, schema, count_batch))
        return _apply(op.process, op.name, batch, name, step.index, schema, count_batch)
    op_class = get_op(step.config.op)
    return _apply(lambda rows: op_class.apply_decision(step.config, rows, step.decision), op_class.name,
                  batch, name, step.index, schema)


_REGISTRY: dict[str, type[Op]] = {}
OpT = TypeVar("OpT", bound=type[Op])


def register_op(cls: OpT) -> OpT:
    """Class decorator: register an op under the name its config's `op: Literal["<name>"]` gives."""
    literal = getattr(cls.Config.model_fields["op"].annotation, "__args__", None)
    if not (isinstance(literal, tuple) and len(literal) == 1 and isinstance(literal[0], str)):
        raise TypeError(f"{cls.__qualname__}.Config.op must be Literal['<op name>'] (the name the spec uses)")
    name = literal[0]
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"op {name!r} is registered twice ({_REGISTRY[name].__qualname__}, {cls.__qualname__})")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def get_op(name: str) -> type[Op]:
    """The op class registered as `name`; KeyError naming the known ops otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r} (known: {', '.join(list_ops())})") from None


def list_ops() -> list[str]:
    return sorted(_REGISTRY)


def stage_name(config: OpConfig) -> str:
    return config.name or config.op


def apply_stage(op: Op, batch: pa.Table, stage: str, stage_index: int, schema: pa.Schema | None = None) -> pa.Table:
    """Run `op.process` on the rows of `batch` that are still alive and merge its output back in.

    Rows rejected by an earlier stage pass through untouched (their new columns are null). Rows the
    op rejects get `reject_stage = stage`. The time spent is spread over the batch's rows in
    `_seconds_<stage_index>` so the runner can sum per-stage busy time across the cluster.
    Columns the sample `schema` knows are cast to its types; workers get the schema from the driver
    (default: loaded here from `schemas/`), as a cluster worker may not have the schema files.
    """
    return _apply(op.process, op.name, batch, stage, stage_index, schema)


def _apply(fn: Callable[[pa.Table], pa.Table], op_name: str, batch: pa.Table, stage: str, stage_index: int,
           schema: pa.Schema | None, count_batch: bool = False) -> pa.Table:
    n = batch.num_rows
    batch = _ensure_reject_columns(batch)
    alive = pc.is_null(batch.column(C.REJECT_REASON)).to_numpy(zero_copy_only=False)
    alive_idx = np.flatnonzero(alive)
    started = time.perf_counter()
    alive_rows = batch if len(alive_idx) == n else batch.take(alive_idx)  # (no copy when all are alive)
    result = fn(alive_rows) if len(alive_idx) else None
    elapsed = time.perf_counter() - started
    if result is not None and result.num_rows != len(alive_idx):
        raise RuntimeError(
            f"stage {stage!r} (op {op_name}) returned {result.num_rows} rows for {len(alive_idx)}: ops must not drop or add rows"
        )
    if result is not None:
        batch = _merge_columns(batch, result, alive_idx, stage, schema or sample_schema())
    seconds = np.zeros(n, dtype=np.float64)
    if len(alive_idx):
        seconds[alive_idx] = elapsed / len(alive_idx)
    column = f"{C.STAGE_SECONDS_PREFIX}{stage_index}"
    if column in batch.column_names:  # a barrier stage's decision adds to the time it spent scoring
        seconds += batch.column(column).to_numpy(zero_copy_only=False)
    batch = _set_column(batch, column, pa.array(seconds))
    if count_batch and len(alive_idx):  # one batch, spread over the rows in it: summed, it counts batches
        share = np.zeros(n, dtype=np.float64)
        share[alive_idx] = 1.0 / len(alive_idx)
        batch = _set_column(batch, f"{C.STAGE_BATCHES_PREFIX}{stage_index}", pa.array(share))
    return batch


def _ensure_reject_columns(batch: pa.Table) -> pa.Table:
    for col in (C.REJECT_STAGE, C.REJECT_REASON):
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(batch.num_rows, pa.string()))
    return batch


def _merge_columns(batch: pa.Table, result: pa.Table, alive_idx: np.ndarray, stage: str, known: pa.Schema) -> pa.Table:
    """Scatter `result` (rows = alive_idx) into `batch`; dead rows keep old values or get nulls."""
    n = batch.num_rows
    dead_idx = np.setdiff1d(np.arange(n), alive_idx, assume_unique=True)
    # positions of [alive..., dead...] in the original order
    restore = np.argsort(np.concatenate([alive_idx, dead_idx]), kind="stable")
    for name in result.column_names:
        if name == C.REJECT_STAGE:
            raise ValueError(f"stage {stage!r} set {C.REJECT_STAGE}; ops set only {C.REJECT_REASON}")
        new = result.column(name)
        if name in known.names:
            new = new.cast(known.field(name).type)
        elif name == C.REJECT_REASON:
            new = new.cast(pa.string())
        if not len(dead_idx):  # every row was alive: the op's column is the column
            batch = _set_column(batch, name, new)
            continue
        if name in batch.column_names:
            old = batch.column(name).take(dead_idx).cast(new.type)
        else:
            old = pa.nulls(len(dead_idx), new.type)
        old_chunks = old.chunks if isinstance(old, pa.ChunkedArray) else [old]
        merged = pa.chunked_array([*new.chunks, *old_chunks], new.type).take(pa.array(restore))
        batch = _set_column(batch, name, merged)
    if C.REJECT_REASON in result.column_names:
        newly = np.zeros(n, dtype=bool)
        newly[alive_idx] = pc.is_valid(result.column(C.REJECT_REASON)).to_numpy(zero_copy_only=False)
        stage_col = pc.if_else(pa.array(newly), pa.scalar(stage), batch.column(C.REJECT_STAGE))
        batch = _set_column(batch, C.REJECT_STAGE, stage_col.cast(pa.string()))
    return batch


def _set_column(table: pa.Table, name: str, values: Any) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
