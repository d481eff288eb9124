"""Every path inside a run directory, named once. The runner, the ops that keep state, the trainer,
the evaluator, the exporter, the report and `dataengine query` all read and write these.

    RUN/
      run.json            the manifest: spec, shards, per-stage counts, attempts, training results
      dataengine.log      what the console did not show
      report.html         the run report
      dataset/            kept rows (Parquet parts)         rejected/  rejected rows, with reasons
      _parts/             parts workers wrote, not yet committed or read by the next segment (removed at the end)
      _state/             commit markers, barrier decisions, the LLM reply cache and usage
      export/             LLaVA JSON + images, conversations.parquet
      train/stageN/       init/ checkpoints/ final/ metrics.jsonl result.json
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "run.json"
LOG_FILE = "dataengine.log"
REPORT_FILE = "report.html"
DATASET_DIR, REJECTED_DIR, PARTS_DIR = "dataset", "rejected", "_parts"
STATE_DIR = "_state"
COMMITTED_DIR = f"{STATE_DIR}/committed"
LLM_CACHE_DIR, LLM_USAGE_DIR = f"{STATE_DIR}/llm-cache", f"{STATE_DIR}/llm-usage"
EXPORT_DIR = "export"
TRAIN_DIR, RESULT_FILE, METRICS_FILE = "train", "result.json", "metrics.jsonl"
INIT_DIR, CHECKPOINTS_DIR, FINAL_DIR = "init", "checkpoints", "final"


def stage_dir(run_dir: Path, stage: int, seed: int | None = None) -> Path:
    """`RUN/train/stageN`: one training stage's model, checkpoints, metrics and result; with `seed`,
    `RUN/train/stageN-seedS`, a repeat of the stage with another seed (`train.stage2_seeds`)."""
    return Path(run_dir) / TRAIN_DIR / (f"stage{stage}" if seed is None else f"stage{stage}-seed{seed}")
