"""Model references: a registered source resolves on the driver to a plain path; a model that is not
there is a `ModelNotFound` naming what was looked for and where; our cache follows DATAENGINE_CACHE."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataengine.core import plugins
from dataengine.models.sources import ModelNotFound, cache_dir, from_local_or_hub, resolve_model_ref, resolve_model_refs
from dataengine.ops.perplexity import PerplexityConfig


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_added", {group: {} for group in plugins.GROUPS})


def test_a_registered_model_source_resolves_on_the_driver(clean_registry, tmp_path):
    (tmp_path / "lm").mkdir()
    plugins.register(plugins.MODEL_SOURCES, "team", lambda ref: tmp_path / ref.removeprefix("team:"))
    assert resolve_model_ref("team:lm") == str(tmp_path / "lm")
    assert resolve_model_ref("hf-hub:org/model") == "hf-hub:org/model"  # open_clip's prefix, not a source
    assert resolve_model_ref("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    config = PerplexityConfig(model="team:lm", max_ppl=50)
    resolved = resolve_model_refs(config)  # what the runner ships to workers
    assert resolved.model == str(tmp_path / "lm") and resolved.max_ppl == 50 and config.model == "team:lm"




def test_a_directory_without_config_json_is_named(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotFound, match=r"weights exists but holds no config.json"):
        from_local_or_hub(str(tmp_path / "weights"), lambda source, local: None, "causal LM")


def test_offline_lookups_try_the_cache_only_and_say_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def load(source: str, local_only: bool):
        calls.append((source, local_only))
        raise OSError("not in the cache")

    with pytest.raises(ModelNotFound) as e:
        from_local_or_hub("org/missing-model", load, "causal LM")
    assert calls == [("org/missing-model", True)]  # never the hub
    message = str(e.value)
    assert "'org/missing-model'" in message and str(tmp_path / "hub") in message and "HF_HUB_OFFLINE is set" in message


def test_online_lookups_try_the_cache_then_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def load(source: str, local_only: bool):
        calls.append(local_only)
        if local_only:
            raise OSError("not cached")
        return "model"

    assert from_local_or_hub("org/model", load, "tokenizer") == "model" and calls == [True, False]


def test_our_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATAENGINE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DATAENGINE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "dataengine"
