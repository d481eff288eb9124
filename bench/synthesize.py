"""Instruction-synthesis throughput against an endpoint with a fixed latency: achieved requests/s vs
the limit C/L (C requests in flight, each answered after L seconds).

The endpoint is the fake OpenAI-compatible server (`dataengine.testbed.synthweb.llm_server`), run in its own
process so it does not share a GIL with the client; it answers every request after exactly L seconds
with a valid conversation. The client is the whole `llava_synthesis_mapper` op (prompt building, the
`openai` async client, cache writes, parsing, validation, grounding) with `max_concurrency = C`,
processing one batch of rows; the cache starts empty so every row is a request. The ratio
achieved / (C/L) is the share of the endpoint's capacity the op uses; CPU ms/req is the client process's
CPU time (all its threads: the op, the client's event loop) per request.

`--actors A --servers S`: A client processes (what `concurrency: A` gives the op: one actor each), each
with its own batch and bound C, against S fake-server processes (actor k calls server k mod S), all
started, warmed and then released together; the rate is every actor's rows over the time from the
first start to the last end, against the limit A x C / L.

Run: `.venv/bin/python bench/synthesize.py [--c 256] [--latency 2.0 1.0] [--actors 4 --servers 2] [--no-record]`
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.synchronize
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from _record import report  # noqa: E402  (bench/ is on sys.path when run as a script)

from dataengine.core import columns as C


def _serve(latency: float, port_queue: mp.Queue, stop: mp.synchronize.Event) -> None:
    from dataengine.testbed.synthweb.llm_responder import SceneResponder
    from dataengine.testbed.synthweb.llm_server import FakeLLMServer

    with FakeLLMServer(SceneResponder(), latency=latency) as server:
        port_queue.put(server.base_url)
        stop.wait()
        port_queue.put((server.requests, server.max_in_flight))


def _rows(n: int, tag: str) -> pa.Table:
    return pa.table({C.UID: [f"{tag}-{i}" for i in range(n)],
                     C.CAPTION: [f"a large red circle and two blue stars, picture {tag}-{i}" for i in range(n)]})


def _warm_op(base_url: str, concurrency: int, waves: int, run_dir: str, tag: str) -> Any:
    """The op as one actor holds it (bound to a scratch run directory), its connections opened and its
    modules imported by a small batch first, so the timed batch measures the steady state."""
    import os

    from dataengine.ops.llava_synthesis import LlavaSynthesisConfig, LlavaSynthesisMapper

    os.environ["BENCH_LLM_KEY"] = "bench"
    config = LlavaSynthesisConfig(backend="openai", batch_size=concurrency * waves,
                                  openai={"model": "fake", "base_url": base_url, "api_key_env": "BENCH_LLM_KEY",
                                          "max_concurrency": concurrency, "max_retries": 0, "timeout_s": 60})
    op = LlavaSynthesisMapper(LlavaSynthesisMapper.bind_run(config, Path(run_dir)))
    op.process(_rows(min(concurrency, 32), tag))
    return op


def measure(concurrency: int, latency: float, waves: int) -> dict[str, float]:
    """Run `waves * C` requests through the op against a server answering after `latency` seconds."""
    ctx = mp.get_context("spawn")  # a fresh interpreter for the server: no shared GIL, no forked threads
    queue, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(latency, queue, stop), daemon=True)
    proc.start()
    base_url = queue.get(timeout=60)
    with tempfile.TemporaryDirectory() as tmp:
        op = _warm_op(base_url, concurrency, waves, tmp, "warm")
        rows = _rows(concurrency * waves, f"c{concurrency}-l{latency}")
        started, cpu_started = time.perf_counter(), time.process_time()
        out = op.process(rows)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        op.backend.close()
    stop.set()
    requests, max_in_flight = queue.get(timeout=30)
    proc.join(timeout=10)
    kept = out.column(C.REJECT_REASON).null_count
    n = rows.num_rows
    return {"C": concurrency, "L": latency, "rows": n, "kept": kept, "seconds": seconds, "achieved": n / seconds,
            "limit": concurrency / latency, "ratio": n / seconds / (concurrency / latency), "max_in_flight": max_in_flight,
            "cpu_ms": cpu / n * 1e3}


def _actor(base_url: str, concurrency: int, latency: float, waves: int, tag: str, ready: mp.Queue,
           go: multiprocessing.synchronize.Event, results: mp.Queue) -> None:
    """One client process: the op built and warmed, then one batch of waves x C rows once `go` is set."""
    with tempfile.TemporaryDirectory() as tmp:
        op = _warm_op(base_url, concurrency, waves, tmp, f"warm-{tag}")
        rows = _rows(concurrency * waves, tag)
        ready.put(tag)
        go.wait()
        started, cpu_started = time.time(), time.process_time()
        out = op.process(rows)
        ended, cpu = time.time(), time.process_time() - cpu_started
        op.backend.close()
    results.put((started, ended, cpu, rows.num_rows, out.column(C.REJECT_REASON).null_count))


def measure_actors(actors: int, servers: int, concurrency: int, latency: float, waves: int) -> dict[str, float]:
    """`actors` client processes against `servers` server processes, released together."""
    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    serving = [ctx.Process(target=_serve, args=(latency, queue, stop), daemon=True) for _ in range(servers)]
    for proc in serving:
        proc.start()
    urls = [queue.get(timeout=60) for _ in serving]
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    clients = [ctx.Process(target=_actor, args=(urls[k % servers], concurrency, latency, waves,
                                                 f"a{k}-c{concurrency}-l{latency}", ready, go, results), daemon=True)
               for k in range(actors)]
    for proc in clients:
        proc.start()
    for _ in clients:
        ready.get(timeout=300)
    go.set()
    done = [results.get(timeout=600) for _ in clients]
    for proc in clients:
        proc.join(timeout=30)
    stop.set()
    in_flight = [queue.get(timeout=30)[1] for _ in serving]
    seconds = max(d[1] for d in done) - min(d[0] for d in done)
    n, kept, cpu = sum(d[3] for d in done), sum(d[4] for d in done), sum(d[2] for d in done)
    limit = actors * concurrency / latency
    return {"A": actors, "S": servers, "C": concurrency, "L": latency, "rows": n, "kept": kept, "seconds": seconds,
            "achieved": n / seconds, "limit": limit, "ratio": n / seconds / limit, "max_in_flight": sum(in_flight),
            "cpu_ms": cpu / n * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--c", type=int, nargs="+", default=[256])
    parser.add_argument("--latency", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--waves", type=int, default=6, help="batch = waves x C rows")
    parser.add_argument("--actors", type=int, default=1, help="client processes (the op's actors)")
    parser.add_argument("--servers", type=int, default=1, help="fake-server processes (with --actors > 1)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.actors > 1:
        lines = [f"{'actors':>6} {'servers':>7} {'C':>5} {'L s':>5} {'rows':>6} {'kept':>6} {'seconds':>8} {'req/s':>8} "
                 f"{'limit':>8} {'ratio':>6} {'CPU ms/req':>11}"]
        for c in args.c:
            for latency in args.latency:
                r = measure_actors(args.actors, args.servers, c, latency, args.waves)
                lines.append(f"{r['A']:>6} {r['S']:>7} {r['C']:>5} {r['L']:>5.2f} {r['rows']:>6} {r['kept']:>6} "
                             f"{r['seconds']:>8.2f} {r['achieved']:>8.1f} {r['limit']:>8.1f} {r['ratio']:>6.3f} "
                             f"{r['cpu_ms']:>11.2f}")
                print(lines[-1], flush=True)
        report(f"bench/synthesize.py: {args.actors} actors against {args.servers} fake servers", lines,
               record=not args.no_record)
        return
    lines = [f"{'C':>5} {'L s':>5} {'rows':>6} {'kept':>6} {'seconds':>8} {'req/s':>8} {'C/L':>8} {'ratio':>6} {'max in flight':>14} {'CPU ms/req':>11}"]
    for c in args.c:
        for latency in args.latency:
            r = measure(c, latency, args.waves)
            lines.append(f"{r['C']:>5} {r['L']:>5.2f} {r['rows']:>6} {r['kept']:>6} {r['seconds']:>8.2f} "
                         f"{r['achieved']:>8.1f} {r['limit']:>8.1f} {r['ratio']:>6.3f} {r['max_in_flight']:>14} {r['cpu_ms']:>11.2f}")
            print(lines[-1], flush=True)
    report("bench/synthesize.py: llava_synthesis_mapper (openai backend) vs the C/L limit", lines,
           record=not args.no_record)


if __name__ == "__main__":
    main()
