"""Tiny BLIP models: saved in the Hugging Face format, loaded back with plain `from_pretrained`, trained on
the synthetic web well enough for a CapFilt demo."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dataengine.testbed.synthweb.blip_models import (
    BLIP_PROMPT,
    BLIP_RECIPE,
    build_blip_processor,
    build_blip_tokenizer,
    build_random_blip_captioner,
    build_random_blip_itm,
    colour_shape_pairs,
    hard_negative,
    tiny_blip_config,
)
from dataengine.testbed.synthweb.models import _clean_pairs, _web_like_pairs, train_blip_recipe

CAPTION = "a photo of two red circles and a cyan hexagon on a light grey background"


@pytest.fixture(scope="module")
def images():
    ims, caps = _clean_pairs(3, 64, seed=5)
    return ims, caps


@pytest.fixture(scope="module")
def random_captioner(tmp_path_factory):
    return build_random_blip_captioner(tmp_path_factory.mktemp("blip") / "cap", seed=0)


@pytest.fixture(scope="module")
def random_itm(tmp_path_factory):
    return build_random_blip_itm(tmp_path_factory.mktemp("blip") / "itm", seed=0)


def test_tokenizer_has_blips_token_conventions(tmp_path):
    """Same ids as Salesforce's BLIP: BERT's 30522 + [DEC] (bos) + [ENC]; pad 0, [CLS] 101, [SEP] 102."""
    from transformers import AutoProcessor, BlipProcessor

    build_blip_processor(tmp_path, image_size=64)
    for processor in (BlipProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        tok = processor.tokenizer
        assert type(processor).__name__ == "BlipProcessor"
        assert len(tok) == 30524
        assert (tok.bos_token, tok.bos_token_id) == ("[DEC]", 30522)
        assert tok.convert_tokens_to_ids("[ENC]") == 30523
        assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
        assert processor.image_processor.size["height"] == processor.image_processor.size["width"] == 64
    config = tiny_blip_config().text_config
    assert (config.vocab_size, config.bos_token_id, config.pad_token_id, config.sep_token_id) == (30524, 30522, 0, 102)


def test_tokenizer_round_trips_a_synthetic_caption():
    tok = build_blip_tokenizer()
    ids = tok(CAPTION)["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP], as BERT and BLIP's processor give
    assert "##gon" in tok.convert_ids_to_tokens(ids)  # real WordPiece: "hexagon" is he ##xa ##gon
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION


def test_shrunk_vocab_keeps_bert_ids_and_wordpieces():
    full = build_blip_tokenizer()
    small = build_blip_tokenizer(texts=[CAPTION])
    assert len(small) < 200
    assert (small.pad_token_id, small.cls_token_id, small.sep_token_id) == (0, 101, 102)
    assert small.bos_token_id == len(small) - 2 and small.convert_tokens_to_ids("[ENC]") == len(small) - 1
    assert small.tokenize(CAPTION) == full.tokenize(CAPTION)
    assert small.decode(small(CAPTION)["input_ids"], skip_special_tokens=True) == CAPTION
    assert small.tokenize("zebra") == ["[UNK]"]


def test_random_captioner_loads_and_generates(random_captioner, images):
    """generate with no prompt, with BLIP's prompt, sampled K per image and with beams; ids decode."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(random_captioner).eval()
    processor = BlipProcessor.from_pretrained(random_captioner)
    ims, _ = images
    pixel_values = processor(images=ims, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (3, 3, 64, 64)
    with torch.no_grad():
        plain = model.generate(pixel_values=pixel_values, max_new_tokens=8)
        assert plain.shape[0] == 3 and (plain[:, 0] == 30522).all()  # starts at [DEC]
        texts = processor.batch_decode(plain, skip_special_tokens=True)
        assert all(isinstance(t, str) for t in texts)

        inputs = processor(images=ims, text=[BLIP_PROMPT.strip()] * 3, return_tensors="pt")
        prompted = model.generate(**inputs, max_new_tokens=8)
        assert all(t.startswith(BLIP_PROMPT.strip()) for t in processor.batch_decode(prompted, skip_special_tokens=True))

        sampled = model.generate(pixel_values=pixel_values, do_sample=True, top_p=0.9, num_return_sequences=4,
                                 max_new_tokens=8)
        assert sampled.shape[0] == 12  # image i's samples are rows 4i .. 4i+3

        beams = model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=8)
        assert beams.shape[0] == 3


def test_random_itm_loads_and_scores(random_itm, images):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(random_itm).eval()
    processor = BlipProcessor.from_pretrained(random_itm)
    ims, caps = images
    inputs = processor(images=ims, text=caps, return_tensors="pt", padding=True)
    with torch.no_grad():
        itm = model(**inputs).itm_score
        itc = model(**inputs, use_itm_head=False).itm_score
    assert itm.shape == (3, 2)
    assert torch.allclose(itm.softmax(-1).sum(-1), torch.ones(3))
    assert itc.shape == (3, 3)


def test_itm_training_logits_match_forward(random_itm, images):
    """Training scores image embeddings once per batch; that shortcut must equal the model's forward."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from dataengine.testbed.synthweb.blip_models import _itm_logits

    model = BlipForImageTextRetrieval.from_pretrained(random_itm).eval()
    processor = BlipProcessor.from_pretrained(random_itm)
    ims, caps = images
    inputs = processor(images=ims, text=caps, return_tensors="pt", padding=True)
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        ours = _itm_logits(model, embeds, inputs["input_ids"], inputs["attention_mask"])
        assert torch.allclose(ours, model(**inputs).itm_score, atol=1e-5)


def test_hard_negatives_are_false_and_close():
    _, caps = _clean_pairs(200, 16, seed=3)
    rng = np.random.default_rng(0)
    for caption in caps:
        negative = hard_negative(caption, rng)
        assert negative != caption
        assert re.search(r"\ban [^aeiou]|\ba [aeiou]", negative) is None, negative  # articles fixed after edits
    assert colour_shape_pairs("two red circles and a cyan hexagon") == {("red", "circle"), ("cyan", "hexagon")}


def _quality(captioner, itm, n=100):
    """Held-out clean pairs drawn as the web draws them (another seed): captioner colour / (colour, shape) accuracy, ITM accept rates."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    ims, caps = _web_like_pairs(n, 64, seed=99)  # as the demo's downloads reach the models
    truth = [colour_shape_pairs(c) for c in caps]
    cap_model = BlipForConditionalGeneration.from_pretrained(captioner).eval()
    processor = BlipProcessor.from_pretrained(captioner)
    with torch.no_grad():
        out = cap_model.generate(**processor(images=ims, return_tensors="pt"), max_new_tokens=40)
    got = [colour_shape_pairs(t) for t in processor.batch_decode(out, skip_special_tokens=True)]
    colours = np.mean([{c for c, _ in g} == {c for c, _ in t} for g, t in zip(got, truth)])
    exact = np.mean([g == t for g, t in zip(got, truth)])

    itm_model = BlipForImageTextRetrieval.from_pretrained(itm).eval()
    processor = BlipProcessor.from_pretrained(itm)
    rng = np.random.default_rng(1)
    others = [caps[(i + 1 + int(rng.integers(0, n - 1))) % n] for i in range(n)]
    probs = {}
    with torch.no_grad():
        for name, texts in (("true", caps), ("other", others)):
            inputs = processor(images=ims, text=texts, return_tensors="pt", padding=True)
            probs[name] = itm_model(**inputs).itm_score.softmax(-1)[:, 1].numpy()
    return {"colours": colours, "exact": exact, "accept_true": float(np.mean(probs["true"] > 0.5)),
            "reject_other": float(np.mean(probs["other"] < 0.5)),
            "margin": float(probs["true"].mean() - probs["other"].mean()),
            "ranked": float(np.mean(probs["true"] > probs["other"]))}


def test_training_saves_models_the_ops_load(tmp_path):
    """A few steps of both trainers: HF directories with the captions' small vocab, shared by the ITM model."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    recipe = {**BLIP_RECIPE, "pairs": 256, "cap_epochs": 1, "itm_epochs": 1}
    captioner, itm = train_blip_recipe(tmp_path, recipe)
    cap_model = BlipForConditionalGeneration.from_pretrained(captioner).eval()
    itm_model = BlipForImageTextRetrieval.from_pretrained(itm).eval()
    processor = BlipProcessor.from_pretrained(itm)
    tok = processor.tokenizer
    assert len(tok) == cap_model.config.text_config.vocab_size == itm_model.config.text_config.vocab_size < 200
    assert tok.get_vocab() == BlipProcessor.from_pretrained(captioner).tokenizer.get_vocab()
    assert (tok.pad_token_id, tok.sep_token_id, tok.bos_token_id) == (0, 102, len(tok) - 2)
    ims, caps = _clean_pairs(2, 64, seed=99)
    with torch.no_grad():
        out = cap_model.generate(**processor(images=ims, return_tensors="pt"), max_new_tokens=12)
        scores = itm_model(**processor(images=ims, text=caps, return_tensors="pt", padding=True)).itm_score
    assert len(processor.batch_decode(out, skip_special_tokens=True)) == 2
    assert scores.shape == (2, 2)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first user of `demo_models` trains them on an empty cache
def test_demo_recipe_quality(demo_models):
    """The demo recipe (about 35 s on 2 cores): ITM accepts true and rejects other images' captions.

    Measured for BLIP_RECIPE version 2: accept_true 0.97, reject_other 0.92, colours 0.85 on one machine,
    0.97, 0.85, 0.85 on another (same seeds, another CPU: float results differ, and training amplifies
    them); version 1, twice the training time: 0.97, 0.93, 0.91. The captioner names the right colours; which
    shape, a 2-layer ViT trained from scratch for this long mostly does not learn, so only colours are
    held to a bar here.
    """
    q = _quality(demo_models["blip-captioner"], demo_models["blip-itm"])
    assert q["accept_true"] >= 0.9 and q["reject_other"] >= 0.8, q
    assert q["colours"] >= 0.75, q


def test_a_demo_family_trained_in_a_child_process_that_fails_is_named(tmp_path):
    """`ensure_demo_models` trains families side by side in child processes: one that fails (here a
    family no recipe knows) fails the call by name."""
    from dataengine.testbed.synthweb.models import _train_in_processes

    roots = {"nosuch": tmp_path / "nosuch", "other": tmp_path / "other"}
    with pytest.raises(RuntimeError, match=r"training the demo nosuch models failed \(exit 1\)"):
        _train_in_processes(["nosuch", "other"], roots, force=False)


def test_a_family_says_it_is_ready_once_where_it_was_asked_for(tmp_path, caplog):
    """A family trained here says where it went; in a child process (`announce=False`) it says nothing,
    since its parent says it once for the console (both said it before)."""
    import logging

    from dataengine.testbed.synthweb.models import _train_family

    def train(out):
        out.mkdir()
        (out / "weights").write_text("w")

    with caplog.at_level(logging.INFO, logger="dataengine.progress"):
        _train_family(tmp_path / "lm-x", "lm", False, train, announce=False)
        _train_family(tmp_path / "lm-y", "lm", False, train)
        _train_family(tmp_path / "lm-y", "lm", False, train)  # cached: trained once, said once
    ready = [r.getMessage() for r in caplog.records if "models ready in" in r.getMessage()]
    assert ready == [f"demo lm models ready in {tmp_path / 'lm-y'} (0 s)"], ready
    assert (tmp_path / "lm-x" / "weights").read_text() == "w" and (tmp_path / "lm-x" / "recipe.json").exists()
