"""perplexity_filter on a tiny GPT-2 saved with save_pretrained and loaded through dataengine.models."""

import math

import pyarrow as pa
import pytest

from dataengine.core import columns as C
from dataengine.models.loaders import load_causal_lm
from dataengine.models.sources import ModelNotFound
from dataengine.ops import apply_stage
from dataengine.ops.perplexity import PerplexityConfig, PerplexityFilter
from dataengine.testbed.synthweb.models import build_random_causal_lm

CAPTIONS = ["a red circle", "two blue squares and a green star", "a small yellow hexagon at the top left"]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return build_random_causal_lm(tmp_path_factory.mktemp("tiny-lm"), CAPTIONS * 20)


def test_perplexity_matches_transformers_loss_per_caption(tiny_lm):
    import torch

    op = PerplexityFilter(PerplexityConfig(model=str(tiny_lm), device="cpu"))
    batch = pa.table({C.UID: ["a", "b", "c", "d"], C.CAPTION: [*CAPTIONS[:2], None, CAPTIONS[2]]})
    out = apply_stage(op, batch, "ppl", 0).to_pylist()
    assert [r[C.REJECT_REASON] for r in out] == [None, None, "no_caption", None]
    model, tokenizer = load_causal_lm(str(tiny_lm), device="cpu", dtype="float32")
    for row in (out[0], out[1], out[3]):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(row[C.CAPTION], add_special_tokens=False)["input_ids"]]])
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=ids).loss
        assert row[C.TEXT_PPL] == pytest.approx(math.exp(float(loss)), rel=1e-4)  # batching and padding change nothing


def test_max_ppl_and_truncation(tiny_lm):
    probe = PerplexityFilter(PerplexityConfig(model=str(tiny_lm), device="cpu"))
    ppl = probe.perplexities(CAPTIONS)
    cut = sorted(ppl)[1]
    op = PerplexityFilter(PerplexityConfig(model=str(tiny_lm), device="cpu", max_ppl=cut))
    reasons = apply_stage(op, pa.table({C.UID: ["a", "b", "c"], C.CAPTION: CAPTIONS}), "ppl", 0) \
        .column(C.REJECT_REASON).to_pylist()
    assert reasons == [None if p <= cut else f"text_ppl>{cut:g}" for p in ppl] and reasons.count(None) == 2
    short = PerplexityFilter(PerplexityConfig(model=str(tiny_lm), device="cpu", max_length=4))
    a, b = "a red circle and two more", "a red circle then nothing else"
    ids = [short.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b)]
    assert ids[0][:3] == ids[1][:3] and ids[0][3:] != ids[1][3:]
    first, second = short.perplexities([a, b])
    assert first == pytest.approx(second, rel=1e-5)  # only the BOS + 3 tokens that fit were scored
    assert probe.perplexities([a, b])[0] != pytest.approx(probe.perplexities([a, b])[1], rel=1e-5)


def test_missing_lm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set"):
        load_causal_lm("nobody/no-such-model-anywhere", device="cpu")
    with pytest.raises(ModelNotFound, match="holds no config.json"):
        load_causal_lm(str(tmp_path), device="cpu")


def test_a_hub_id_is_looked_up_in_the_cache_then_the_hub(monkeypatch):
    """Offline-first: the local cache, then the hub; with HF_HUB_OFFLINE the cache only. The error lists both."""
    from dataengine.models.sources import from_local_or_hub

    calls = []

    def load(source: str, local_only: bool):
        calls.append((source, local_only))
        raise OSError("not there")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFound, match=r"thing 'org/m' from the hub cache .* and the hub: cache: not there \| hub: not there"):
        from_local_or_hub("org/m", load, "thing")
    assert calls == [("org/m", True), ("org/m", False)]
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set, so not the hub"):
        from_local_or_hub("org/m", load, "thing")
    assert calls == [("org/m", True)]


def test_config_refuses_two_thresholds():
    with pytest.raises(ValueError, match="not both"):
        PerplexityConfig(max_ppl=100, keep_lowest_fraction=0.2)


def test_the_preparer_built_without_the_model_tokenises_as_the_actor_does(tiny_lm):
    from dataengine.ops.perplexity import TOKENS

    config = PerplexityConfig(model=str(tiny_lm), device="cpu", max_length=4)
    batch = pa.table({C.CAPTION: [CAPTIONS[2], "", CAPTIONS[0]]})
    in_a_task = PerplexityFilter.preparer(config)(batch)  # a prepare task: the tokenizer only
    in_the_actor = PerplexityFilter(config).prepare(batch)
    assert in_a_task.equals(in_the_actor)
    tokens = in_a_task.column(TOKENS).to_pylist()
    assert len(tokens[0]) == 4 and tokens[1] is None and in_a_task.column(C.REJECT_REASON).to_pylist()[1] == "no_caption"
