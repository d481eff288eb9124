"""The `dataengine` command. Library code logs; this module prints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dataengine.core.plugins import COMMANDS, registered
from dataengine.engine.spec import SpecError

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def _cmd_validate(args: argparse.Namespace) -> int:
    from dataengine.engine.spec import load_spec, missing_requirements

    status = 0
    for path in args.specs:
        spec = load_spec(path)
        missing = missing_requirements(spec)
        if missing:
            print(f"{path}: valid, but this Python cannot run it:\n  " + "\n  ".join(missing), file=sys.stderr)
            status = 2
        else:
            print(f"{path}: ok ({spec.name}: {' -> '.join(spec.stage_names())})")
    return status


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from dataengine.engine.spec import SCHEMA_PATH, json_schema, write_json_schema

    if args.write:
        print(f"wrote {write_json_schema()}")
    elif args.check:
        current = json.loads(SCHEMA_PATH.read_text()) if SCHEMA_PATH.exists() else None
        if current != json_schema():
            print(f"{SCHEMA_PATH} is out of date: run `dataengine schema --write`", file=sys.stderr)
            return EXIT_FAILED
        print(f"{SCHEMA_PATH}: up to date")
    else:
        print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from dataengine.engine.runner import format_summary, run_pipeline
    from dataengine.engine.spec import load_spec

    spec = load_spec(args.spec)
    with run_console(Path(args.output or spec.output), args):
        result = run_pipeline(spec, output=args.output, address=args.address)
    print(format_summary(result.manifest))
    print(f"\noutputs: {result.run_dir}/dataset (kept), {result.run_dir}/rejected, {result.run_dir}/run.json")
    if not args.no_report:
        _write_report_after_run(result.run_dir)
    return 0


def run_console(run_dir: Path, args: argparse.Namespace) -> Any:
    """The console for a command that writes into `run_dir`: live progress here, the rest in its log."""
    from dataengine import console
    from dataengine.core.raytools import show_ray_progress

    show_ray_progress(args.verbose)  # our lines replace Ray Data's; --verbose shows both
    return console.run_log(run_dir.expanduser(), args.verbose)


def _write_report_after_run(run_dir: Path) -> None:
    """The run's report page; the run's outputs stand even if the page cannot be made."""
    from dataengine.analysis.report import write_report

    try:
        print(f"report: {write_report(run_dir).resolve()}")
    except Exception as e:  # noqa: BLE001 - a report problem must not turn a finished run into a failure
        logging.getLogger("dataengine").warning("the run finished but its report failed: %s "
                                                "(retry with `dataengine report %s`)", e, run_dir)


def _cmd_export(args: argparse.Namespace) -> int:
    from dataengine.io.export import FORMATS, ExportOptions, export_run

    options = ExportOptions(tuple(args.format or FORMATS), args.caption_data, args.short_answer_prompt,
                            not args.no_images)
    result = export_run(args.run, args.out, options)
    skipped = ", ".join(f"{k}={v}" for k, v in result.skipped.items()) or "none"
    print(f"exported {result.samples} samples to {result.out_dir} ({', '.join(result.files)}); skipped: {skipped}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from dataengine.engine import jobs

    job_id = jobs.submit(args.spec, args.address, args.job_id, args.cluster_dir, args.python)
    print(f"submitted {job_id} to {args.address}; follow with: dataengine logs {job_id} --follow --address {args.address}")
    if not args.wait:
        return 0
    final = jobs.wait(args.address, job_id, timeout=args.timeout)
    print(f"{job_id}: {final}")
    if final == "FAILED":
        why = jobs.failure_line(args.address, job_id)
        print(why or f"error: the job failed; its log: dataengine logs {job_id} --address {args.address}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else EXIT_FAILED


def _cmd_jobs(args: argparse.Namespace) -> int:
    from dataengine.engine import jobs

    rows = jobs.list_jobs(args.address)
    for job in sorted(rows, key=lambda j: j["start_time"] or 0):
        print(f"{job['id']:<32} {job['status']:<10} {job['metadata'].get('dataengine_spec', '-'):<20} {job['entrypoint']}")
    if not rows:
        print(f"no jobs on {args.address}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from dataengine.engine import jobs

    print(jobs.status(args.address, args.job))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from dataengine.engine import jobs

    if args.follow:
        jobs.follow_logs(args.address, args.job, lambda text: print(text, end="", flush=True))
    else:
        print(jobs.logs(args.address, args.job), end="")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from dataengine.engine import jobs

    stopped = jobs.stop(args.address, args.job)
    print(f"{args.job}: {'stop requested' if stopped else 'not running'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dataengine.engine.raydata import ray_session
    from dataengine.engine.spec import ResourcesSpec, train_section
    from dataengine.eval.train_then_eval import format_train_summary, train_run

    spec = train_section(args.run, args.spec)
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    with run_console(Path(args.run), args), ray_session(args.address, ResourcesSpec()):
        results = train_run(args.run, spec, stages, resume=args.resume)
    print(format_train_summary(results))
    _write_report_after_run(Path(args.run))  # now with the training curves and scores
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    from dataengine.train.mixture import MIXTURE_FILE, build_mixture, load_mixture_spec

    spec = load_mixture_spec(args.spec)
    out = Path(args.out or Path(args.spec).with_suffix(""))
    manifest = build_mixture(spec, out)
    print(f"{spec.name}: {manifest['size']} rows ({spec.sampling}), id {manifest['id']}")
    for s in manifest["sources"]:
        print(f"  {s['name']:<20} {s['rows']:>9} rows ({s['share']:.1%}) of {s['available']} available"
              f"{', repeated' if s['rows'] > s['available'] else ''}  data {s['data_version']}")
    print(f"\nmanifest: {out / MIXTURE_FILE} (train on it with `train: data: {out / MIXTURE_FILE}`)")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    import polars as pl

    from dataengine.analysis.query import run_sql

    try:
        frame = run_sql(args.run, args.sql)
    except (pl.exceptions.PolarsError, ValueError) as e:  # bad SQL: say so, no traceback
        print(f"error: query failed: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with pl.Config(tbl_rows=args.limit, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        print(frame)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dataengine.analysis.report import write_report

    path = write_report(args.run, args.out)
    print(f"report: {path.resolve()}")
    return 0


def verbose_flag(p: argparse.ArgumentParser) -> None:
    """`-v` after the command too (`dataengine run spec.yaml -v`); SUPPRESS keeps a `-v` given before it."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="every log line on the console (the full log is in RUN/dataengine.log either way)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataengine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every log line on the console (Ray's included), not only progress and warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check pipeline specs without running them")
    p.add_argument("specs", nargs="+")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("schema", help="print, write or check schemas/pipeline.schema.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    p.set_defaults(fn=_cmd_schema)

    p = sub.add_parser("run", help="run (or resume) a pipeline")
    p.add_argument("spec")
    p.add_argument("--output", help="run directory (default: the spec's output)")
    p.add_argument("--address", help="Ray cluster address (default: start an embedded Ray)")
    p.add_argument("--no-report", action="store_true", help="do not write RUN/report.html at the end")
    verbose_flag(p)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("export", help="write a finished run's kept rows as LLaVA JSON + images and/or Parquet")
    p.add_argument("run")
    p.add_argument("--format", action="append", choices=["llava_json", "parquet"],
                   help="repeat for several (default: both)")
    p.add_argument("--out", help="export directory (default: RUN/export)")
    p.add_argument("--caption-data", action="store_true", help="stage-1 caption samples instead of conversations")
    p.add_argument("--short-answer-prompt", action="store_true",
                   help="append 'Answer the question using a single word or phrase.' to short-answer questions")
    p.add_argument("--no-images", action="store_true", help="do not copy image files")
    p.set_defaults(fn=_cmd_export)

    default_api = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    p = sub.add_parser("submit", help="submit a pipeline spec (and its train: section) as a Ray job")
    p.add_argument("spec")
    p.add_argument("--address", default=default_api, help="the head's Jobs API (default: %(default)s)")
    p.add_argument("--job-id", help="submission id (default: Ray's)")
    p.add_argument("--cluster-dir", help="absolute directory on the cluster's nodes that the spec's relative input "
                   "and output paths are resolved against (default: this machine's cwd, for a cluster that shares "
                   "this filesystem; KubeRay manifests here: /home/ray/dataengine)")
    p.add_argument("--python", default="python", help="the Python on the cluster that runs the job, with dataengine's "
                   "dependencies installed (default: the `python` on the head's PATH)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits")
    p.set_defaults(fn=_cmd_submit)
    for name, fn, text in (("status", _cmd_status, "a job's status"), ("logs", _cmd_logs, "a job's logs"),
                           ("stop", _cmd_stop, "stop a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        p.add_argument("--address", default=default_api)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(fn=fn)
    p = sub.add_parser("jobs", help="list the cluster's jobs")
    p.add_argument("--address", default=default_api)
    p.set_defaults(fn=_cmd_jobs)

    p = sub.add_parser("train", help="train the spec's `train:` section on a finished run's kept rows")
    p.add_argument("run", help="run directory (its run.json holds the spec)")
    p.add_argument("--stage", choices=["1", "2", "all"], default="all")
    p.add_argument("--spec", help="take the train: section from this spec instead of the run's")
    p.add_argument("--resume", action="store_true", help="continue a stopped stage from its last checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: start an embedded Ray)")
    verbose_flag(p)
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("mix", help="build a training mixture from several runs (weights or sqrt-size sampling, "
                       "per-source caps): a content-addressed manifest the trainer reads")
    p.add_argument("spec", help="mixture spec (YAML: name, sampling, size, seed, sources: [{run, weight, max_rows}])")
    p.add_argument("--out", help="directory for mixture.yaml and its rows file (default: the spec's path without .yaml)")
    p.set_defaults(fn=_cmd_mix)

    p = sub.add_parser("query", help="polars SQL over a run's tables `dataset` and `rejected`")
    p.add_argument("run")
    p.add_argument("sql")
    p.add_argument("--limit", type=int, default=25, help="rows to print")
    p.set_defaults(fn=_cmd_query)

    p = sub.add_parser("report", help="write RUN/report.html: funnel, score histograms, samples, duplicates, "
                       "conversations, LLM cost, training curves (one self-contained page)")
    p.add_argument("run")
    p.add_argument("--out", help="write the page here instead of RUN/report.html")
    p.set_defaults(fn=_cmd_report)

    for add_command in registered(COMMANDS).values():  # plugins' commands (the test bed's demo)
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dataengine import console

    console.setup(args.verbose)
    from dataengine.engine.jobs import JobError
    from dataengine.engine.runner import AccountingError, RunError
    from dataengine.io.inputs import InputError
    from dataengine.train.trainer import TrainError

    try:
        return args.fn(args)
    except (SpecError, InputError, RunError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TrainError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except AccountingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
