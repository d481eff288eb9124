"""Scale benchmark (a): caption rows through `caption_rules_filter`, the engine vs one plain process.

The engine (`dataengine run` in a subprocess: embedded Ray, the Parquet input planned from its footer,
one Ray task per shard reading its rows from the input, running the op, writing its kept and rejected
parts and committing them) against the floor: the same op's `process` over the same rows
in one Python process, reading and writing Parquet with pyarrow. Both write kept and rejected rows.
Prints rows/s, the engine's ratio to the floor (2 cores: 2x is the ideal) and the driver's peak RSS
(polled: the `dataengine run` process only, not its Ray workers), at each size given, so the growth
shows. Appends the report to bench/RESULTS.md.

Run: `.venv/bin/python bench/scale.py --sizes 1000000 10000000`; with `--address HOST:6379` (the address
`ray start --head --num-cpus 2` prints: the node's IP, not 127.0.0.1) the runs join that Ray (what a
cluster user pays per run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from _engine import run_dataengine  # noqa: E402  (bench/ is on sys.path when run as a script)
from _record import report  # noqa: E402

from dataengine.core import columns as C
from dataengine.ops.caption_rules import CaptionRulesConfig, CaptionRulesFilter

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "scale"
BATCH, SHARD_ROWS = 4096, 50_000
GOOD = ["a red circle next to a blue square", "two dogs running on a beach at sunset", "a bowl of fresh fruit"]
BAD = ["IMG_2041.JPG", "click here to buy now", "x", "qwzxkjv plmnbt rrrrrrrrrrrr"]


def make_input(n: int, path: Path) -> None:
    """n caption rows, 1 in 5 broken, written in row groups so the writer never holds them all."""
    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, n, 1_000_000):
        m = min(1_000_000, n - start)
        pick = rng.integers(0, 5, m)
        captions = [BAD[i % len(BAD)] if p == 0 else f"{GOOD[i % len(GOOD)]} {i}" for i, p in enumerate(pick, start)]
        table = pa.table({"url": [f"http://127.0.0.1/{i}.jpg" for i in range(start, start + m)], "caption": captions})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def floor(src: Path, out: Path) -> float:
    """The op over every row in one process, Parquet in and out; returns seconds."""
    op = CaptionRulesFilter(CaptionRulesConfig())
    started = time.perf_counter()
    reader = pq.ParquetFile(src)
    kept_writer = rejected_writer = None
    for batch in reader.iter_batches(batch_size=BATCH):
        table = pa.Table.from_batches([batch])
        reasons = op.process(table).column(C.REJECT_REASON)
        table = table.append_column(C.REJECT_REASON, reasons)
        alive = pc.is_null(reasons)
        kept, rejected = table.filter(alive), table.filter(pc.invert(alive))
        kept_writer = kept_writer or pq.ParquetWriter(out / "kept.parquet", kept.schema)
        rejected_writer = rejected_writer or pq.ParquetWriter(out / "rejected.parquet", rejected.schema)
        kept_writer.write_table(kept)
        rejected_writer.write_table(rejected)
    for w in (kept_writer, rejected_writer):
        if w is not None:
            w.close()
    return time.perf_counter() - started


def engine(src: Path, out: Path, address: str | None = None) -> tuple[float, int]:
    """`dataengine run` on the same rows (its embedded Ray, or the running one at `address`); returns
    seconds and the driver's peak RSS in bytes."""
    spec = {"name": "scale", "input": {"path": str(src), "shard_rows": SHARD_ROWS}, "output": str(out),
            "stages": [{"op": "caption_rules_filter", "batch_size": BATCH}]}
    spec_path = out.parent / f"{out.name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return run_dataengine(spec_path, address)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--address", help="join this running Ray (e.g. `ray start --head` first) instead of the "
                                          "embedded one each run starts and stops: Ray's start is then paid once")
    args = parser.parse_args()
    lines = [f"{'rows':>11} {'floor rows/s':>13} {'engine rows/s':>14} {'ratio':>6} {'driver peak RSS':>16}"]
    for n in args.sizes:
        work = WORK / str(n)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        src = work / "captions.parquet"
        make_input(n, src)
        (work / "floor").mkdir()
        os.sync()  # each side starts with the disk's write-back done (the input's, then the floor's ~1 GB at 10M)
        floor_s = floor(src, work / "floor")
        os.sync()
        engine_s, rss = engine(src, work / "run", args.address)
        lines.append(f"{n:>11,} {n / floor_s:>13,.0f} {n / engine_s:>14,.0f} {floor_s / engine_s:>5.2f}x "
                     f"{rss / 2**20:>12,.0f} MiB")
        print(lines[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    ray = f", joining the running Ray at {args.address}" if args.address else ""
    report(f"scale (a): caption_rules_filter, engine vs one process{ray}", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
