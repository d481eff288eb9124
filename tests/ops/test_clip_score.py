"""clip_score_filter on a tiny open_clip saved to disk and loaded through the real path."""

import io
import json
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from dataengine.core import columns as C
from dataengine.engine.runner import run_pipeline
from dataengine.engine.spec import parse_spec
from dataengine.models.loaders import load_open_clip
from dataengine.models.sources import ModelNotFound
from dataengine.ops import apply_stage
from dataengine.ops.clip_score import ClipScoreConfig, ClipScoreFilter
from dataengine.ops.thresholds import rank_fraction_decision, within_fraction
from dataengine.testbed.synthweb.models import build_random_open_clip
from tests.conftest import download_stage, encode_jpeg


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_random_open_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


def _jpeg(colour, size=(48, 40)) -> bytes:
    return encode_jpeg(Image.new("RGB", size, colour))


def _batch():
    return pa.table({C.UID: ["a", "b", "c", "d", "e"],
                     C.IMAGE: [_jpeg("red"), _jpeg("blue"), _jpeg("green"), None, b"not an image"],
                     C.CAPTION: ["a red square", "a blue square", "", "a cat", "a dog"]})


def test_scores_match_open_clip_computed_directly(tiny_clip):
    import torch

    op = ClipScoreFilter(ClipScoreConfig(model=str(tiny_clip), pretrained=None, device="cpu", write_embedding=True))
    out = apply_stage(op, _batch(), "clip", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in out] == [None, None, "no_caption", "no_image", "decode_error"]
    model, preprocess, tokenizer = load_open_clip(str(tiny_clip), device="cpu", dtype="float32")
    with torch.inference_mode():
        image = preprocess(Image.open(io.BytesIO(_jpeg("red"))).convert("RGB")).unsqueeze(0)
        a = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokenizer(["a red square"])), dim=-1)
    assert out[0][C.CLIP_SCORE] == pytest.approx(float((a * b).sum()), abs=1e-5)
    embedding = np.array(out[0][C.CLIP_IMAGE_EMBEDDING])
    assert embedding.shape == (32,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(embedding, a[0].numpy(), atol=1e-5)
    assert out[2][C.CLIP_SCORE] is None and out[2][C.CLIP_IMAGE_EMBEDDING] is None


def test_min_score_rejects_below_threshold(tiny_clip):
    probe = ClipScoreFilter(ClipScoreConfig(model=str(tiny_clip), pretrained=None, device="cpu"))
    scores = [r[C.CLIP_SCORE] for r in apply_stage(probe, _batch().slice(0, 2), "clip", 0).to_pylist()]
    cut = (scores[0] + scores[1]) / 2
    op = ClipScoreFilter(ClipScoreConfig(model=str(tiny_clip), pretrained=None, device="cpu", min_score=cut))
    reasons = [r[C.REJECT_REASON] for r in apply_stage(op, _batch().slice(0, 2), "clip", 0).to_pylist()]
    expected = [None if s >= cut else f"clip_score<{cut:g}" for s in scores]
    assert reasons == expected and reasons.count(None) == 1


def test_rank_fraction_is_exact_with_ties():
    scores = pa.table({C.UID: [f"u{i}" for i in range(10)], "s": [0.5, 0.9, 0.5, 0.1, 0.5, 0.7, 0.5, 0.2, 0.3, 0.5]})
    decision = json.loads(json.dumps(rank_fraction_decision(scores, "s", 0.3, highest=True)))
    kept = [u for u, k in zip(scores.column(C.UID).to_pylist(), within_fraction(scores, decision)) if k]
    assert kept == ["u0", "u1", "u5"]  # 0.9, 0.7, then the first of the tied 0.5s by uid
    lowest = rank_fraction_decision(scores, "s", 0.2, highest=False)
    assert [u for u, k in zip(scores.column(C.UID).to_pylist(), within_fraction(scores, lowest)) if k] == ["u3", "u7"]
    assert not within_fraction(scores, rank_fraction_decision(scores, "s", 0.01, highest=True)).any()


@pytest.mark.parametrize("model,pretrained,match", [
    ("/no/such/dir", None, "no architecture '/no/such/dir'"),
    ("ViT-B-32", "no_such_tag", "no pretrained tag 'no_such_tag'"),
    ("ViT-B-32", "/no/such/ckpt.pt", "checkpoint file '/no/such/ckpt.pt' for ViT-B-32 not found"),
])
def test_missing_models_say_what_and_where(model, pretrained, match):
    with pytest.raises(ModelNotFound, match=match):
        load_open_clip(model, pretrained, device="cpu")


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(ModelNotFound, match="holds no open_clip_config.json"):
        load_open_clip(str(tmp_path), device="cpu")


@pytest.mark.slow
def test_keep_top_fraction_is_a_barrier_and_keeps_the_top_rows(ray_local, synthweb_run, tiny_clip, tmp_path):
    _, first, _ = synthweb_run
    urls = first.run_dir.parent / "urls.parquet"  # the session run's private copy; its server is still up
    spec = parse_spec({"name": "top", "input": {"path": str(urls), "id_col": "id", "shard_rows": 40},
                       "output": str(tmp_path / "run"),
                       "stages": [download_stage(), {"op": "clip_score_filter", "model": str(tiny_clip),
                                                     "pretrained": None, "keep_top_fraction": 0.3, "batch_size": 32}]})
    result = run_pipeline(spec)
    clip = result.stages[-1]
    assert clip["in"] == first.stages[-1]["kept"]
    assert clip["kept"] == int(np.floor(0.3 * clip["in"] + 0.5))
    assert clip["rejected_by_reason"] == {"clip_score_not_top_0.3": clip["in"] - clip["kept"]}
    # rows the download rejected left the stream: the model's batches held alive rows (a block's last is partial)
    shards = result.manifest["input"]["shards"]
    assert math.ceil(clip["in"] / 32) <= clip["batches"] <= math.ceil(clip["in"] / 32) + shards
    assert clip["mean_batch_fill"] == round(clip["in"] / (clip["batches"] * 32), 4) > 0.5
    assert "batches" not in result.stages[1]  # download runs as tasks: not a model stage
    kept = pl.read_parquet(result.run_dir / "dataset" / "*.parquet")
    rejected = pl.read_parquet(result.run_dir / "rejected" / "*.parquet").filter(pl.col("reject_stage") == "clip_score_filter")
    assert kept.height == clip["kept"] and kept["clip_score"].min() >= rejected["clip_score"].max()
    decision = json.loads((result.run_dir / "_state" / "decision-1.json").read_text())
    assert decision["keep"] == clip["kept"] and decision["rows"] == clip["in"]
    assert not (result.run_dir / "_parts").exists()  # intermediate rows cleaned up at the end


def test_text_caption_best_scores_capfilts_caption_and_falls_back_to_the_web_one(tiny_clip):
    base = _batch()
    best = pa.array(["a completely different caption"] + [None] * (base.num_rows - 1), pa.string())
    with_best = base.append_column(C.CAPTION_BEST, best)
    op = ClipScoreFilter(ClipScoreConfig(model=str(tiny_clip), pretrained=None, device="cpu", text="caption_best"))
    scores = op.process(with_best).column(C.CLIP_SCORE).to_pylist()
    plain = ClipScoreFilter(ClipScoreConfig(model=str(tiny_clip), pretrained=None, device="cpu"))
    swapped = base.set_column(base.column_names.index(C.CAPTION), C.CAPTION,
                              pa.array(["a completely different caption"] + base.column(C.CAPTION).to_pylist()[1:]))
    assert scores == pytest.approx(plain.process(swapped).column(C.CLIP_SCORE).to_pylist(), abs=1e-6)


def test_the_preparer_hands_the_model_what_open_clips_own_preprocessing_gives(tiny_clip):
    import torch

    from dataengine.models.pixels import pixels_array, to_model_input
    from dataengine.ops.clip_score import PIXELS, ClipPreparer

    config = ClipScoreConfig(model=str(tiny_clip), pretrained=None, device="cpu")
    preparer = ClipPreparer(config)
    prepared = preparer(_batch())
    assert prepared.column(C.REJECT_REASON).to_pylist() == [None, None, "no_caption", "no_image", "decode_error"]
    assert preparer.size == (64, 64)  # the tiny model's input size, read from its config without loading it
    assert prepared.column(PIXELS).type.list_size == 64 * 64 * 3  # uint8 HWC at the model's size, not float CHW
    _, preprocess, _ = load_open_clip(str(tiny_clip), device="cpu", dtype="float32")
    ours = to_model_input(pixels_array(prepared.column(PIXELS).slice(0, 2), 64, 64), torch.device("cpu"), torch.float32,
                          preparer.mean, preparer.std)
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(_jpeg(c))).convert("RGB")) for c in ("red", "blue")])
    assert torch.equal(ours, theirs)


def test_preparing_in_tasks_or_in_the_actor_gives_the_same_outputs(ray_local, synthweb_run, tiny_clip, tmp_path):
    _, first, _ = synthweb_run
    urls = first.run_dir.parent / "urls.parquet"
    outputs = {}
    for where in ("tasks", "actor"):
        spec = parse_spec({"name": "split", "input": {"path": str(urls), "id_col": "id", "shard_rows": 40},
                           "output": str(tmp_path / where),
                           "stages": [download_stage(), {"op": "clip_score_filter", "model": str(tiny_clip),
                                                         "pretrained": None, "min_score": 0.0, "write_embedding": True,
                                                         "batch_size": 16, "prepare_in": where}]})
        result = run_pipeline(spec)
        kept = pl.read_parquet(result.run_dir / "dataset" / "*.parquet").sort("uid")
        rejected = pl.read_parquet(result.run_dir / "rejected" / "*.parquet").sort("uid")
        outputs[where] = (kept.select("uid", "clip_score", "clip_image_embedding"),
                          rejected.select("uid", "reject_stage", "reject_reason", "clip_score"), result.stages[-1])
    (kept_t, rejected_t, stage_t), (kept_a, rejected_a, stage_a) = outputs["tasks"], outputs["actor"]
    assert kept_t.height > 0 and kept_t.equals(kept_a) and rejected_t.equals(rejected_a)
    assert not any(c.startswith(C.PREPARED_PREFIX) for c in pl.read_parquet(tmp_path / "tasks" / "dataset" / "*.parquet").columns)
    assert stage_t["in"] == stage_a["in"] and stage_t["kept"] == stage_a["kept"] > 0
    assert stage_t["batches"] >= 1 and stage_t["mean_batch_fill"] > 0
