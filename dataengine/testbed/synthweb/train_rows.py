"""Training data and models made, not fetched: kept rows as a pipeline writes them, and a random tiny LM.

Tests and `bench/train.py` train on these: rows of the synthetic web's clean scenes with their true
caption and a template conversation, in a run directory's layout (`dataset/part-*.parquet` + `run.json`).
"""

from __future__ import annotations

from pathlib import Path


def build_random_llama(out: Path, texts: list[str], hidden: int = 32) -> Path:
    """A random 2-layer Llama (rotary positions, tied embeddings) with a BPE vocabulary trained on `texts`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataengine.testbed.synthweb.tokenizer import build_caption_tokenizer

    tok = build_caption_tokenizer(texts, out, vocab_size=300)
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

    from dataengine.llm.backends.template import Templates, template_conversation
    from dataengine.testbed.synthweb.build import boxes_json
    from dataengine.testbed.synthweb.render import render_scene
    from dataengine.testbed.synthweb.scenes import KINDS, caption_scene, generate_scene

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
