"""Stage 2 under several seeds: one Ray Train run per seed (run a few at once, as before) vs
`train_stage_seeds` (one Ray Train run whose workers take the seeds one after another).

Same tiny LLaVA (a random tiny open_clip tower + a tiny Llama), same rows, same seeds and steps; run
side by side on this machine, each at two step counts, so the fixed cost per Ray Train run (its
actors and worker processes starting, their imports, the data's encoding) shows apart from the
steps: the saving should stay about constant per seed while the steps grow.

    .venv/bin/python bench/train_seeds.py [--rows 512] [--seeds 3] [--steps 10 40] [--record]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

WORK = REPO / "bench" / "_work" / "train_seeds"


def _prepare(rows: int) -> tuple[Path, dict[str, Path]]:
    """bench/train.py's tiny run and model parts, and one assembled model every seed starts from."""
    import train as train_bench  # bench/train.py

    from dataengine.train.config import ModelSpec
    from dataengine.train.model import build_llava

    run, parts = train_bench._prepare(rows, hidden=128)
    model, processor = build_llava(ModelSpec(vision=str(parts["vision"]), lm=str(parts["lm"])))
    parts["start"] = WORK / "start"  # every seed's stage 2 starts from this one assembled model, as from a stage 1
    model.save_pretrained(str(parts["start"]))
    processor.save_pretrained(str(parts["start"]))
    return run, parts


def _specs(parts: dict[str, Path], seeds: int, steps: int, cpus_per_worker: float) -> list:
    from dataengine.train.config import TrainSpec

    return [TrainSpec.model_validate({
        "model": {"vision": str(parts["vision"]), "lm": str(parts["lm"])}, "stages": [2], "seed": seed,
        "stage2_init": str(parts["start"]),
        "cpus_per_worker": cpus_per_worker,
        "stage2": {"lr": 1e-3, "global_batch": 32, "micro_batch": 32, "max_steps": steps, "max_length": 512,
                   "checkpoint_every": 10**6}, "eval": {"heldout_fraction": 0.0}}) for seed in range(seeds)]


def _fresh_run(run: Path, name: str) -> Path:
    """A copy of the run's data without any training in it."""
    copy = WORK / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("train"))
    return copy


def separate_runs(run: Path, parts: dict[str, Path], seeds: int, steps: int, cpus: float) -> float:
    """The former way: a Ray Train run per seed, one more at once than there are CPUs, sharing them."""
    from dataengine.core.layout import stage_dir
    from dataengine.train.trainer import train_stage

    at_once = min(seeds, int(cpus) + 1)
    specs = _specs(parts, seeds, steps, max(0.1, max(1.0, cpus - 1) / at_once))
    target = _fresh_run(run, f"separate-{steps}")
    started = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        list(pool.map(lambda s: train_stage(target, s, 2, out=stage_dir(target, 2, s.seed or None)), specs))
    return time.perf_counter() - started


def one_run(run: Path, parts: dict[str, Path], seeds: int, steps: int, cpus: float) -> float:
    """`train_stage_seeds`: the seeds one after another in one Ray Train run."""
    from dataengine.core.layout import stage_dir
    from dataengine.train.trainer import train_stage_seeds

    specs = _specs(parts, seeds, steps, max(0.1, max(1.0, cpus - 1)))
    target = _fresh_run(run, f"one-{steps}")
    started = time.perf_counter()
    train_stage_seeds(target, [(s, stage_dir(target, 2, s.seed or None)) for s in specs], 2)
    return time.perf_counter() - started


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--record", action="store_true", help="append the report to bench/RESULTS.md")
    args = parser.parse_args()
    run, parts = _prepare(args.rows)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    lines = [f"{'steps/seed':>10} {'seeds':>5} {'separate s':>10} {'one run s':>9} {'ratio':>6} {'saved s/seed':>12}"]
    for steps in args.steps:
        separate = separate_runs(run, parts, args.seeds, steps, cpus)
        one = one_run(run, parts, args.seeds, steps, cpus)
        lines.append(f"{steps:>10} {args.seeds:>5} {separate:>10.1f} {one:>9.1f} {separate / one:>6.2f} "
                     f"{(separate - one) / args.seeds:>12.1f}")
        print(lines[-1], flush=True)
    ray.shutdown()
    report = "\n".join([f"tiny LLaVA stage 2, {args.rows} rows, micro-batch 32, {int(cpus)} CPUs: {args.seeds} seeds as "
                        "separate Ray Train runs (a few at once) vs one run (train_stage_seeds)", *lines])
    print(report)
    if args.record:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n### bench/train_seeds.py: stage-2 seeds, separate runs vs one run, {stamp}\n\n```\n{report}\n```\n")


if __name__ == "__main__":
    main()
