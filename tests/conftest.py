"""Shared fixtures: one local Ray per test session, the synthetic web, spec helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (a Ray start costs seconds here)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthweb_dir(tmp_path_factory) -> Path:
    """A small synthetic web (small images so tests stay fast), built once per session."""
    from dataengine.synthweb import build_synthweb

    return build_synthweb(tmp_path_factory.mktemp("synthweb"), n=120, seed=7, sizes=(320, 640), size_weights=(0.7, 0.3))


@pytest.fixture(scope="session")
def synthweb_server(synthweb_dir):
    from dataengine.synthweb import SynthWebServer

    with SynthWebServer(synthweb_dir) as server:
        yield server


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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
    from dataengine.runner import run_pipeline
    from dataengine.spec import parse_spec
    from dataengine.synthweb import SynthWebServer, write_url_list

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


# ---- training: tiny model parts and a run directory made directly (no pipeline needed) -----------

def _tiny_llama(out: Path, texts: list[str], hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataengine.synthweb.models import build_caption_tokenizer

    tok = build_caption_tokenizer(texts, out, vocab_size=300)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(str(out))
    return out


def make_train_rows(n: int, seed: int = 11) -> list[dict]:
    """Kept rows as a pipeline writes them: uid, JPEG image, caption, template conversation."""
    import io
    import json

    import numpy as np

    from dataengine.llm.templates import Templates, template_conversation
    from dataengine.synthweb.build import boxes_json
    from dataengine.synthweb.render import render_scene
    from dataengine.synthweb.scenes import KINDS, caption_scene, generate_scene

    templates, rows = Templates.load(), []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = generate_scene(rng)
        caption = caption_scene(scene, rng)
        buf = io.BytesIO()
        render_scene(scene, 64, 64, rng).save(buf, format="JPEG", quality=90)
        objects = json.loads(boxes_json([o.as_dict() for o in scene.objects]))
        _, turns = template_conversation({"objects": objects, "captions": [caption]}, seed + i, templates, 2, 0.0, KINDS)
        rows.append({"uid": f"0-{i}", "image": buf.getvalue(), "image_format": "jpeg", "caption": caption,
                     "caption_best": caption, "conversations": json.dumps(turns)})
    return rows


def write_train_run(run_dir: Path, rows: list[dict]) -> Path:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    (run_dir / "dataset").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "dataset" / "part-00000.parquet")
    (run_dir / "run.json").write_text(json.dumps({"name": "tiny", "spec_hash": "feedc0de", "status": "complete",
                                                  "started_at": "2026-11-22T00:00:00+00:00",
                                                  "totals": {"in": len(rows), "kept": len(rows), "rejected": 0}}))
    return run_dir


@pytest.fixture(scope="session")
def tiny_vlm_parts(tmp_path_factory) -> dict[str, Path]:
    """A random tiny open_clip (64 px, 8 px patches: 64 image tokens) and a tiny Llama with a BPE vocabulary."""
    from dataengine.synthweb.models import build_random_open_clip

    root = tmp_path_factory.mktemp("vlm-parts")
    texts = [r["caption"] for r in make_train_rows(60)] + [
        "USER: How many circles are there in the image? ASSISTANT: 2", "What colour is the star? Red.",
        "Is there a square in the image? Yes. No.", "Where is the hexagon in the image? At the top left."]
    return {"vision": build_random_open_clip(root / "clip", image_size=64),
            "lm": _tiny_llama(root / "llama", texts)}


@pytest.fixture(scope="session")
def tiny_train_run(tmp_path_factory) -> Path:
    """A finished run's layout with 32 kept rows (dataset/ + run.json)."""
    return write_train_run(tmp_path_factory.mktemp("train-run"), make_train_rows(32))
