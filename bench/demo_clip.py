"""How well a demo CLIP recipe separates mismatched captions on a finished demo run, cut by cut.

The demo's `clip_score_filter` is judged against the synthetic web's truth (mismatched captions). This
trains a CLIP under the current `DEMO_RECIPE` with the given overrides (or reuses `--out` when it holds
one), scores every row of the run that reached the CLIP stage (the same images and web captions the demo
scored) and prints, per `min_score` cut, the precision and recall of the rows it would reject: the cut in
`pipelines/demo.yaml` is chosen from these stored scores, not guessed.

Run: `.venv/bin/python bench/demo_clip.py --run runs/demo [--recipe '{"clip_epochs": 12}'] [--out DIR] [--no-record]`
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)

from dataengine.core import columns as C
from dataengine.ops.clip_score import ClipScoreConfig, ClipScoreFilter
from dataengine.testbed.demo import outcomes
from dataengine.testbed.synthweb import build as T
from dataengine.testbed.synthweb import models as M

BEFORE_CLIP = ("download", "caption_rules_filter", "perplexity_filter")
CUTS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def rows_reaching_clip(run: Path) -> pl.DataFrame:
    """The run's rows that no stage before CLIP rejected, with their image, web caption and truth."""
    truth = pl.read_parquet(run.with_name(run.name + "-web") / T.TRUTH_FILE)
    rows = outcomes(run, truth, (C.IMAGE, C.CAPTION), include_images=True)
    return rows.filter(pl.col("stage").is_null() | ~pl.col("stage").is_in(BEFORE_CLIP))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished demo run (runs/demo; its web is runs/demo-web)")
    parser.add_argument("--recipe", default="{}", help="DEMO_RECIPE overrides, as JSON")
    parser.add_argument("--out", help="where the CLIP is trained (reused when it exists); default: a temp dir")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    recipe = {**M.DEMO_RECIPE, **json.loads(args.recipe)}
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(args.out or tmp) / "clip"
        trained = "reused"
        if not clip.exists():
            started = time.perf_counter()
            M.train_clip_recipe(clip, recipe)
            trained = f"trained in {time.perf_counter() - started:.0f} s"
        rows = rows_reaching_clip(Path(args.run))
        op = ClipScoreFilter(ClipScoreConfig(model=str(clip), pretrained=None, min_score=0.5, device="cpu"))
        scored = op.process(pa.table({C.UID: [str(i) for i in range(rows.height)], C.IMAGE: rows[C.IMAGE].to_arrow(),
                                      C.CAPTION: rows[C.CAPTION].to_arrow()}))
    score = np.asarray(scored.column(C.CLIP_SCORE).to_pylist(), dtype=np.float64)
    mismatched = (rows[T.CAPTION_NOISE] == "mismatched").to_numpy()
    changed = {k: v for k, v in recipe.items() if M.DEMO_RECIPE.get(k) != v}
    lines = [f"CLIP {trained} (recipe v{recipe['version']}, overrides {changed or 'none'}); {rows.height} rows reach CLIP, "
             f"{int(mismatched.sum())} mismatched", f"{'min_score':>9} {'rejected':>8} {'precision':>9} {'recall':>6}"]
    for cut in CUTS:
        rejected = score < cut
        hits = int((rejected & mismatched).sum())
        lines.append(f"{cut:>9} {int(rejected.sum()):>8} {hits / max(1, rejected.sum()):>9.3f} "
                     f"{hits / max(1, mismatched.sum()):>6.3f}")
    report("bench/demo_clip.py: demo CLIP cuts against the truth", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
