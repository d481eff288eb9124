"""The test bed's subcommands of the `dataengine` CLI (`dataengine.core.plugins.COMMANDS` entry points):
`synthweb`, `demo-models` and `demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dataengine.cli import run_console, verbose_flag


def _cmd_synthweb(args: argparse.Namespace) -> int:
    from dataengine.testbed.synthweb import SynthWebServer, build_synthweb, write_url_list

    out = build_synthweb(Path(args.out), n=args.n, seed=args.seed)
    if not args.serve:
        print(f"built {args.n} items in {out} (truth.parquet, files/); --serve to serve them")
        return 0
    with SynthWebServer(out, host=args.host, port=args.port) as server:
        urls = write_url_list(out, args.public_url or server.base_url)
        print(f"serving {out} at {server.base_url}; URL list: {urls}; Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataengine.testbed.demo import fresh_run_dir, run_demo

    run_dir = fresh_run_dir(Path(args.spec), args.output)
    with run_console(run_dir, args):
        summary = run_demo(n=args.n, seed=args.seed, spec_path=Path(args.spec), output=str(run_dir),
                           train=not args.no_train)
    print(summary)
    return 0


def _cmd_demo_models(args: argparse.Namespace) -> int:
    from dataengine.testbed.synthweb.models import ensure_demo_models

    paths = ensure_demo_models(force=args.force)
    print("\n".join(f"synthweb-demo:{name} -> {path}" for name, path in paths.items()))
    return 0


def add_synthweb(subparsers: argparse._SubParsersAction) -> None:
    """`dataengine synthweb`: build (and serve) the synthetic web."""
    p = subparsers.add_parser("synthweb", help="build (and serve) the synthetic web")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--serve", action="store_true")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--public-url", help="base URL written into urls.parquet, as other machines reach the "
                   "server (default: the listening address)")
    p.set_defaults(fn=_cmd_synthweb)


def add_demo_models(subparsers: argparse._SubParsersAction) -> None:
    """`dataengine demo-models`: train (or show) the demo's models."""
    p = subparsers.add_parser("demo-models", help="train (or show) the demo's tiny CLIP and LM on the synthetic web")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.set_defaults(fn=_cmd_demo_models)


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    """`dataengine demo`: the demo spec against the synthetic web, scored."""
    p = subparsers.add_parser("demo", help="run pipelines/demo.yaml against the synthetic web and score it")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", default="pipelines/demo.yaml")
    p.add_argument("--output", default=None, help="run directory (default: the spec's output)")
    p.add_argument("--no-train", action="store_true", help="skip the spec's train: section (data stages only)")
    verbose_flag(p)
    p.set_defaults(fn=_cmd_demo)
