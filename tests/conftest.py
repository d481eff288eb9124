"""Shared fixtures: one local Ray per test session, the synthetic web, spec helpers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Tests never touch the internet. Set before anything imports huggingface_hub (it reads this once): a
# hub id that is not cached fails at once instead of after ~70 s of DNS retries (a sandbox has no DNS).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first (order kept within a file): `make test` hands whole files to its two
    workers in this order, so the long ones start early instead of running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def _console_handlers_removed():
    """`cli.main` called in a test installs its console on the root logger: take it off afterwards."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_dataengine", False)]:
        root.removeHandler(handler)


#: seconds before pytest-timeout fails a test at which the busy Ray workers' stacks are dumped
STACKS_BEFORE_TIMEOUT = 20.0
#: Ray processes that run no task: an idle worker and Ray's own agents
RAY_NOT_WORKING = {"ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def busy_ray_worker_stacks() -> str:
    """Every busy Ray worker's Python stack on this machine (py-spy, which ray[default] installs): a test
    that hangs in a task shows where, instead of only its driver waiting in Ray Data's executor."""
    import sys

    import psutil

    py_spy = Path(sys.executable).with_name("py-spy")
    dumps = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or []).strip()  # Ray pads its process titles with spaces
        if not title.startswith("ray::") or title.split()[0] in RAY_NOT_WORKING:
            continue
        done = subprocess.run([str(py_spy), "dump", "--pid", str(proc.info["pid"])], capture_output=True, text=True,
                              timeout=30, check=False)
        dumps.append(f"--- {title} (pid {proc.info['pid']})\n{done.stdout or done.stderr}")
    return "\n".join(dumps) or "no busy Ray worker"


@pytest.fixture(autouse=True)
def _ray_stacks_before_a_timeout(request):
    """Shortly before pytest-timeout fails a test, print the busy Ray workers' stacks to its stderr (shown
    with the failure). Why: a hang inside a task (seen once in a fresh clone's suite, a read task that never
    returned) otherwise leaves only the driver's side of the wait."""
    import sys
    import threading

    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)
    if timeout <= 2 * STACKS_BEFORE_TIMEOUT:
        yield
        return

    def dump() -> None:
        print(f"\n{request.node.nodeid}: {timeout - STACKS_BEFORE_TIMEOUT:.0f} s, near its timeout; busy Ray "
              f"workers' stacks:\n{busy_ray_worker_stacks()}", file=sys.stderr, flush=True)

    timer = threading.Timer(timeout - STACKS_BEFORE_TIMEOUT, dump)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (a Ray start costs seconds here)."""
    import ray

    from dataengine.core.raytools import QUIET_WORKERS

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=512 * 1024 * 1024,
                 runtime_env=QUIET_WORKERS)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthweb_dir(tmp_path_factory) -> Path:
    """A small synthetic web (small images so tests stay fast), built once per session."""
    from dataengine.testbed.synthweb import build_synthweb

    return build_synthweb(tmp_path_factory.mktemp("synthweb"), n=120, seed=7, sizes=(320, 640), size_weights=(0.7, 0.3))


@pytest.fixture(scope="session")
def synthweb_server(synthweb_dir):
    from dataengine.testbed.synthweb import SynthWebServer

    with SynthWebServer(synthweb_dir) as server:
        yield server


def cpus_free_within(seconds: float) -> bool:
    """Whether every CPU of the session's Ray is free again within `seconds` (actors take a moment to go)."""
    import time

    import ray

    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def synthweb_spec(tmp_path: Path, synthweb_dir: Path, base_url: str, stages: list[dict], shard_rows: int = 40) -> Path:
    """A spec over a private copy of the synthetic web's URL list (served at `base_url`), output `tmp_path/run`."""
    from dataengine.testbed.synthweb import write_url_list

    urls = tmp_path / "urls.parquet"
    urls.write_bytes(write_url_list(synthweb_dir, base_url).read_bytes())
    return write_spec(tmp_path / "spec.yaml", {
        "name": "t", "input": {"path": str(urls), "id_col": "id", "shard_rows": shard_rows},
        "output": str(tmp_path / "run"), "stages": stages})


def run_outcome(run_dir: Path) -> tuple[set, dict]:
    """(kept source ids, {rejected source id: reason}); fails if a uid is in both tables or twice."""
    kept = pl.read_parquet(run_dir / "dataset" / "*.parquet", columns=["uid", "source_id"])
    rejected = pl.read_parquet(run_dir / "rejected" / "*.parquet", columns=["uid", "source_id", "reject_reason"])
    uids = kept["uid"].to_list() + rejected["uid"].to_list()
    assert len(uids) == len(set(uids)), "a uid appears twice across dataset/ and rejected/"
    return set(kept["source_id"]), dict(zip(rejected["source_id"], rejected["reject_reason"]))


def download_stage(**overrides) -> dict:
    """A download stage for tests: loopback allowed, short timeouts, small batches."""
    stage = {"op": "download", "allow_private_networks": True, "timeout": 1.0, "deadline": 3.0,
             "retries": 2, "backoff_base": 0.05, "backoff_max": 0.2, "threads": 8, "batch_size": 16,
             "max_bytes": 8 * 1024 * 1024}
    stage.update(overrides)
    return stage


@pytest.fixture(scope="session")
def synthweb_run(ray_local, synthweb_dir, tmp_path_factory):
    """One pipeline run over the session's synthetic web, shared by the tests that read its outputs.

    It has a server of its own, so `/flaky/` URLs fail exactly once whatever other tests fetched.
    """
    from dataengine.engine.runner import run_pipeline
    from dataengine.engine.spec import parse_spec
    from dataengine.testbed.synthweb import SynthWebServer, write_url_list

    out = tmp_path_factory.mktemp("run")
    urls = out / "urls.parquet"  # a private copy: other tests rewrite the synthetic web's list
    with SynthWebServer(synthweb_dir) as server:
        shutil.copyfile(write_url_list(synthweb_dir, server.base_url), urls)
        spec = parse_spec({"name": "t", "input": {"path": str(urls), "id_col": "id", "shard_rows": 40},
                           "output": str(out / "run"), "stages": [download_stage()]})
        result = run_pipeline(spec)
        truth = pl.read_parquet(synthweb_dir / "truth.parquet")
        yield spec, result, truth


os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """The demo's trained CLIP, LM, BLIP captioner and ITM filter, from the model cache, trained there on
    first use (about a minute on 2 cores; a test that may be first to ask allows for it with a timeout)."""
    import torch

    from dataengine.testbed.synthweb.models import ensure_demo_models

    threads = torch.get_num_threads()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the other worker has the other core: two threads would thrash
        torch.set_num_threads(1)
    try:
        # families still to train go side by side in child processes, a thread each (fresh clone: core 262 s
        # beside blip 95 s; in this process one after another, 406 s of this worker's time)
        return ensure_demo_models(vlm=False)
    finally:
        torch.set_num_threads(threads)


# ---- training: tiny model parts and a run directory made directly (no pipeline needed) -----------

@pytest.fixture(scope="session")
def tiny_vlm_parts(tmp_path_factory) -> dict[str, Path]:
    """A random tiny open_clip (64 px, 8 px patches: 64 image tokens) and a tiny Llama with a BPE vocabulary."""
    from dataengine.testbed.synthweb.models import build_random_open_clip
    from dataengine.testbed.synthweb.train_rows import build_random_llama, make_train_rows

    root = tmp_path_factory.mktemp("vlm-parts")
    texts = [r["caption"] for r in make_train_rows(60)] + [
        "USER: How many circles are there in the image? ASSISTANT: 2", "What colour is the star? Red.",
        "Is there a square in the image? Yes. No.", "Where is the hexagon in the image? At the top left."]
    return {"vision": build_random_open_clip(root / "clip", image_size=64),
            "lm": build_random_llama(root / "llama", texts)}


@pytest.fixture(scope="session")
def tiny_train_run(tmp_path_factory) -> Path:
    """A finished run's layout with 32 kept rows (dataset/ + run.json)."""
    from dataengine.testbed.synthweb.train_rows import make_train_rows, write_train_run

    return write_train_run(tmp_path_factory.mktemp("train-run"), make_train_rows(32))


# ---- browser: a page opened in headless Chromium (Debian's `chromium`; .ci/run installs it) ----------

CHROMIUM = Path(os.environ.get("DATAENGINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]


def open_in_chromium(path: Path, screenshot: Path | None = None) -> dict:
    """Load a local HTML file in headless Chromium through Playwright and report what a reader would see:
    console errors and page errors, dialogs opened, every URL requested, images (and how many failed to
    decode), the ids of the sections rendered visible, charts, scripts and inline event handlers, the
    page's text and height."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    seen: dict = {"errors": [], "dialogs": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("requestfailed", lambda r: seen["errors"].append(f"request failed: {r.url}"))
            page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            seen.update(page.evaluate("""() => ({
                images: document.images.length,
                broken_images: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
                sections: Array.from(document.querySelectorAll('section[id]'))
                               .filter(s => s.getBoundingClientRect().height > 0).map(s => s.id),
                charts: document.querySelectorAll('figure.chart svg').length,
                scripts: document.querySelectorAll('script').length,
                handlers: Array.from(document.querySelectorAll('*')).filter(
                    e => Array.from(e.attributes).some(a => a.name.startsWith('on'))).length,
                text: document.body.innerText,
                height: document.body.scrollHeight,
            })"""))
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def encode_jpeg(image: Any, quality: int = 90) -> bytes:
    """JPEG bytes of a PIL image or an RGB array: the encoded images the tests feed to stages."""
    from PIL import Image

    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def kill_session(leader: subprocess.Popen) -> None:
    """`kill -9` a run started with `start_new_session=True` and everything it started (its embedded Ray:
    GCS, raylet and workers, whatever process group they put themselves in), and wait until all are gone,
    as if the machine had killed them: a rerun must not meet the killed run's last workers still writing."""
    import psutil

    def members() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == leader.pid:
                    found.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    for p in members():
        with contextlib.suppress(psutil.Error):
            p.kill()
    leader.wait()
    psutil.wait_procs(members(), timeout=30)
