"""Training mixtures: rows from several runs, in chosen proportions, pinned to the data they came from.

A mixture spec (YAML) names its sources (finished runs) and how to mix them: `sampling: weights` (each
source's share of the mixture is its weight over the sum, as data recipes state them) or `sqrt`
(InstructBLIP: a source's share is proportional to the square root of its size, so small datasets are
not drowned and large ones not over-repeated). `max_rows` caps a source before mixing (Cambrian caps
each source at 250k-350k). `size` is the mixture's row count (default: the sources' rows after caps).

Within a source, rows are taken in the order of a hash of (seed, uid): a source sampled below its
size gives the same rows on every build, and one sampled above it repeats every row the same number of
times (plus one more for the first rows in that order). `dataengine mix` writes the chosen rows
(source, uid, repeats) as `rows-<id>.parquet` and the manifest `mixture.yaml` beside it; the id is a
digest of the rows and of each source's data version (a digest of its kept Parquet files), so a
manifest names exactly one set of training rows. The trainer reads it (`train: data: mixture.yaml`),
refuses a source whose data changed since, and records the id and the sources' versions in every
checkpoint's lineage.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataengine.core import columns as C
from dataengine.core.atomic import write_parquet_atomic, write_text_atomic
from dataengine.train.data import Source, TrainingData, data_version, kept_files

MIXTURE_FILE = "mixture.yaml"


class MixtureError(ValueError):
    """A mixture that cannot be built or used as it stands: the message says which source and why."""


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(min_length=1, description="A finished run's directory (its dataset/ is read).")
    name: str | None = Field(default=None, description="The source's name in the mixture; default: the run's folder.")
    weight: float = Field(default=1.0, gt=0, description="sampling: weights: this source's share is weight / sum.")
    max_rows: int | None = Field(default=None, gt=0, description="Cap on the rows taken from this source (Cambrian).")


class MixtureSpec(BaseModel):
    """How to mix: the sources, the sampling rule, the size and the seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="mixture", min_length=1)
    sampling: Literal["weights", "sqrt"] = Field(default="weights", description="weights, or sqrt: share ∝ √size "
                                                                                 "(InstructBLIP).")
    size: int | None = Field(default=None, gt=0, description="Rows in the mixture; default: the sources' rows.")
    seed: int = Field(default=0, description="Seed of the per-row order within each source.")
    sources: list[SourceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "MixtureSpec":
        names = [source_name(s) for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"sources: names must differ (set name:), repeated: {', '.join(repeated)}")
        return self


def source_name(source: SourceSpec) -> str:
    return source.name or Path(source.run).name


def load_mixture_spec(path: str | Path) -> MixtureSpec:
    data = yaml.safe_load(Path(path).read_text())
    try:
        return MixtureSpec.model_validate(data)
    except ValueError as e:
        raise MixtureError(f"{path}: {e}") from None


def order_key(seed: int, uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).digest(), "little")


def shares(sizes: list[int], weights: list[float], sampling: str) -> list[float]:
    """Each source's share of the mixture."""
    raw = [math.sqrt(n) for n in sizes] if sampling == "sqrt" else list(weights)
    total = sum(raw)
    if total <= 0:
        raise MixtureError("every source is empty: no rows to mix")
    return [r / total for r in raw]


def allocate(total: int, fractions: list[float]) -> list[int]:
    """Integer counts summing to `total`, proportional to `fractions` (largest remainders)."""
    exact = [total * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _source_uids(run: str) -> list[str]:
    uids: list[str] = []
    for path in kept_files(run):
        uids.extend(pq.read_table(path, columns=[C.UID]).column(C.UID).to_pylist())
    return uids


def build_mixture(spec: MixtureSpec, out_dir: str | Path) -> dict[str, Any]:
    """Choose the rows, write `rows-<id>.parquet` and `mixture.yaml` under `out_dir`; returns the manifest."""
    out = Path(out_dir)
    names, ordered, versions = [], [], []
    for source in spec.sources:
        try:
            uids = _source_uids(source.run)
            versions.append(data_version(source.run))
        except FileNotFoundError as e:
            raise MixtureError(f"source {source_name(source)}: {e}") from None
        uids.sort(key=lambda u: order_key(spec.seed, u))
        ordered.append(uids[:source.max_rows] if source.max_rows else uids)
        names.append(source_name(source))
    sizes = [len(u) for u in ordered]
    size = spec.size or sum(sizes)
    fractions = shares(sizes, [s.weight for s in spec.sources], spec.sampling)
    targets = allocate(size, fractions)
    chosen: list[tuple[int, str, int]] = []  # (source, uid, repeats)
    for k, (uids, target) in enumerate(zip(ordered, targets)):
        if target and not uids:
            raise MixtureError(f"source {names[k]}: no kept rows, but its share is {target} rows")
        every, extra = divmod(target, len(uids)) if uids else (0, 0)
        chosen.extend((k, uid, every + (i < extra)) for i, uid in enumerate(uids) if every + (i < extra))
    sources_of, uids_of, repeats_of = zip(*chosen) if chosen else ((), (), ())
    rows = pa.table({C.MIXTURE_SOURCE: pa.array(sources_of, pa.int32()), C.UID: pa.array(uids_of, pa.string()),
                     C.MIXTURE_REPEATS: pa.array(repeats_of, pa.int32())})
    digest = hashlib.sha256()
    for name, version in zip(names, versions):
        digest.update(f"{name}\x1f{version}\x1e".encode())
    for k, uid, repeats in chosen:
        digest.update(f"{k}\x1f{uid}\x1f{repeats}\x1e".encode())
    mixture_id = digest.hexdigest()[:16]
    rows_file = f"rows-{mixture_id}.parquet"
    write_parquet_atomic(rows, out / rows_file)
    manifest = {
        "name": spec.name, "id": mixture_id, "rows_file": rows_file, "sampling": spec.sampling, "seed": spec.seed,
        "size": size,
        "sources": [{"name": name, "run": str(Path(s.run).resolve()), "data_version": version, "weight": s.weight,
                     "max_rows": s.max_rows, "available": avail, "share": round(share, 6), "rows": target,
                     "distinct_rows": min(target, avail)}
                    for name, s, version, avail, share, target in zip(names, spec.sources, versions, sizes, fractions,
                                                                     targets)],
    }
    write_text_atomic(out / MIXTURE_FILE, yaml.safe_dump(manifest, sort_keys=False))
    return manifest


@dataclass(frozen=True)
class Mixture:
    """A built mixture, checked against its sources: each source's kept files and the chosen rows."""

    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def rows_path(self) -> Path:
        return self.path.parent / self.manifest["rows_file"]

    def source_files(self) -> list[tuple[str, list[str]]]:
        return [(s["name"], kept_files(s["run"])) for s in self.manifest["sources"]]

    def lineage(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "id": self.id, "sampling": self.manifest["sampling"],
                "sources": [{k: s[k] for k in ("name", "run", "data_version", "rows")} for s in self.manifest["sources"]]}


def load_mixture(path: str | Path) -> Mixture:
    """A mixture manifest, its sources checked: a source whose kept rows changed since is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / MIXTURE_FILE
    if not path.is_file():
        raise MixtureError(f"{path}: no mixture manifest (build one with `dataengine mix SPEC --out DIR`)")
    manifest = yaml.safe_load(path.read_text())
    if not isinstance(manifest, dict) or not {"id", "rows_file", "sources"} <= manifest.keys():
        raise MixtureError(f"{path}: not a mixture manifest written by `dataengine mix` (it needs id, rows_file, sources)")
    mixture = Mixture(path, manifest)
    if not mixture.rows_path.is_file():
        raise MixtureError(f"{path}: its rows file {mixture.rows_path} is missing")
    for source in manifest["sources"]:
        try:
            now = data_version(source["run"])
        except FileNotFoundError as e:
            raise MixtureError(f"{path}: source {source['name']}: {e}") from None
        if now != source["data_version"]:
            raise MixtureError(f"{path}: source {source['name']} ({source['run']}) changed since the mixture was built "
                               f"(data version {source['data_version']} -> {now}); rebuild it with `dataengine mix`")
    return mixture


def mixture_data(mixture: Mixture) -> TrainingData:
    """What the trainer reads for a mixture: each source's kept files, the rows the mixture chose."""
    sources = tuple(Source(tuple(files), f"{name}/", str(mixture.rows_path), k)
                    for k, (name, files) in enumerate(mixture.source_files()))
    return TrainingData(sources, mixture.id, mixture.lineage())
