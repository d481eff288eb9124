"""The pipeline spec: pydantic models for the YAML files in `pipelines/`.

Unknown keys are errors (a typo must not pass silently), and every error names the field path, the
bad value and what is allowed, e.g. `stages[1].image_size: must be > 0, got -5`.

Examples:
    >>> spec = load_spec("pipelines/demo.yaml")  # doctest: +SKIP
    >>> [s.op for s in spec.stages]  # doctest: +SKIP
    ['download']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dataengine.core.fields import decisive, payload_hash
from dataengine.core.layout import MANIFEST
from dataengine.core.schemas import SCHEMA_DIR
from dataengine.io.inputs import InputSpec
from dataengine.ops import get_op, list_ops, stage_name
from dataengine.train.config import TrainSpec

SCHEMA_PATH = SCHEMA_DIR / "pipeline.schema.json"


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists one line per bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: invalid pipeline spec\n" + "\n".join(f"  {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourcesSpec(_Strict):
    """Size of the embedded Ray (ignored when connecting to a cluster with --address)."""

    num_cpus: int | None = Field(default=None, gt=0, description="Default: all cores of this machine.")
    num_gpus: int | None = Field(default=None, ge=0, description="Default: what Ray detects.")
    object_store_memory: int | None = Field(default=None, gt=0, description="Bytes; default: Ray's choice.")


def _stage_union() -> Any:
    configs = tuple(get_op(name).Config for name in list_ops())
    union = configs[0] if len(configs) == 1 else Union[configs]  # noqa: UP007 - built at runtime
    return Annotated[union, Field(discriminator="op")]


StageSpec = _stage_union()


class PipelineSpec(_Strict):
    """A pipeline: input, output directory, resources and the ordered stages."""

    name: str = Field(min_length=1)
    description: str | None = None
    input: InputSpec
    output: str = Field(min_length=1, description="Run directory: dataset/, rejected/, run.json.")
    resources: ResourcesSpec = ResourcesSpec()
    stages: list[StageSpec] = Field(min_length=1)  # type: ignore[valid-type]
    train: TrainSpec | None = Field(default=None, description="Train a LLaVA-style model on the kept rows "
                                    "after the data stages (`dataengine train RUN` does it for a finished run).")

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "PipelineSpec":
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            name = stage_name(stage)
            if name in seen:
                raise ValueError(
                    f"stages[{i}]: stage name {name!r} is already used by stages[{seen[name]}]; "
                    "give repeated ops distinct `name`s"
                )
            seen[name] = i
        for i, stage in enumerate(self.stages[:-1]):
            if stage.op == "export":
                raise ValueError(f"stages[{i}]: export must be the last stage (it checks and writes the final rows)")
        return self

    def stage_names(self) -> list[str]:
        return [stage_name(s) for s in self.stages]

    def spec_hash(self) -> str:
        """Hash of everything that decides the data outputs. Excluded: the output path, the `train:`
        section (its checkpoints record their own hash), and fields marked
        `operational` (an LLM budget, timeouts, request concurrency): a run stopped by its budget
        resumes under a larger one."""
        payload = decisive(self)
        payload.pop("output", None)
        payload.pop("train", None)  # training reads the data; it does not change it
        return payload_hash(payload)


def missing_requirements(spec: PipelineSpec) -> list[str]:
    """One line per optional package a stage needs that this Python cannot import."""
    import importlib.util

    return [f"stages[{i}] ({stage_name(stage)}): needs the {req.module} package, not installed here: {req.install}"
            for i, stage in enumerate(spec.stages) for req in get_op(stage.op).requires(stage)
            if importlib.util.find_spec(req.module) is None]


def parse_spec(data: Any, source: str = "<spec>") -> PipelineSpec:
    """Validate a parsed YAML/JSON document; raise `SpecError` with one line per problem."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"top level must be a mapping of keys, got {type(data).__name__}"])
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, [_describe(err, data) for err in e.errors()]) from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec file; raise `SpecError` naming the file and every bad field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(str(path), [f"cannot read spec file: {e.strerror or e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [f"{where}YAML syntax error: {problem}"]) from None
    return parse_spec(data, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline spec, as exported to `schemas/pipeline.schema.json`."""
    return PipelineSpec.model_json_schema()


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path


# ---- error messages -------------------------------------------------------------------------

def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[0] == "stages" and isinstance(loc[i - 1], int) and part in list_ops():
            continue  # the discriminator tag pydantic inserts for the op's config
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(loc: tuple[Any, ...], data: Any) -> list[str]:
    model: type[BaseModel] | None = PipelineSpec
    node = data
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
            if model is not None and part in model.model_fields:
                annotation = model.model_fields[part].annotation
                model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            model = get_op(node["op"]).Config if isinstance(node, dict) and node.get("op") in list_ops() else None
        elif part in list_ops():
            continue
    return sorted(model.model_fields) if model is not None else []


def _describe(err: dict[str, Any], data: Any) -> str:
    loc, kind, ctx, value = tuple(err["loc"]), err["type"], err.get("ctx") or {}, err.get("input")
    where = _path(loc)
    comparisons = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in comparisons:
        bound = next(iter(ctx.values()))
        return f"{where}: must be {comparisons[kind]} {bound}, got {_show(value)}"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc, data)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required, but missing"
    if kind == "union_tag_invalid":
        return f"{_path(loc)}.op: unknown op {_show(ctx.get('tag'))} (known: {', '.join(list_ops())})"
    if kind == "union_tag_not_found":
        return f"{where}.op: required, names the operator (known: {', '.join(list_ops())})"
    if kind == "literal_error":
        return f"{where}: must be one of {ctx.get('expected')}, got {_show(value)}"
    if kind in ("too_short", "too_long"):
        return f"{where}: {err['msg'].lower()}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.split("_")[0].replace("int", "an integer").replace("float", "a number") \
            .replace("bool", "true or false").replace("string", "a string").replace("dict", "a mapping") \
            .replace("list", "a list").replace("model", "a mapping")
        return f"{where}: must be {expected}, got {_show(value)}"
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where != "(top level)" else message


def train_section(run_dir: str | Path, spec_path: str | None) -> TrainSpec:
    """The `train:` section from `spec_path`, else from the spec recorded in the run's run.json."""
    run_json = Path(run_dir) / MANIFEST
    if spec_path:
        spec = load_spec(spec_path)
    elif run_json.is_file():
        spec = parse_spec(json.loads(run_json.read_text())["spec"], str(run_json))
    else:
        raise FileNotFoundError(f"{run_dir}: no run.json (not a run directory?) and no --spec given")
    if spec.train is None:
        raise SpecError(str(spec_path or run_json), ["the spec has no train: section (add one, or pass --spec)"])
    return spec.train
