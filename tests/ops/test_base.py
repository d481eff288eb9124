"""The operator contract: an op's name is its config's `op` literal, registered once; `Op` is generic
over its config."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pytest

from dataengine.ops import base
from dataengine.ops.base import Op, OpConfig, get_op, register_op


class _EchoConfig(OpConfig):
    op: Literal["test_echo"] = "test_echo"
    word: str = "hi"


class _Echo(Op[_EchoConfig]):
    Config = _EchoConfig

    def process(self, batch: pa.Table) -> pa.Table:
        return pa.table({"echo": [self.config.word] * batch.num_rows})


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_the_name_is_the_configs_op_literal(registry):
    assert register_op(_Echo) is _Echo and _Echo.name == "test_echo" and get_op("test_echo") is _Echo
    assert register_op(_Echo) is _Echo  # the same class again: no error
    op = get_op("test_echo")(_EchoConfig(word="yo"))
    assert op.process(pa.table({"x": [1, 2]})).column("echo").to_pylist() == ["yo", "yo"]


def test_a_second_class_under_one_name_and_a_config_without_a_literal_are_refused(registry):
    register_op(_Echo)

    class Other(_Echo):
        pass

    with pytest.raises(ValueError, match="op 'test_echo' is registered twice"):
        register_op(Other)

    class LooseConfig(OpConfig):
        op: str = "loose"

    class Loose(Op[LooseConfig]):
        Config = LooseConfig

        def process(self, batch: pa.Table) -> pa.Table:
            return batch

    with pytest.raises(TypeError, match=r"Loose.Config.op must be Literal\['<op name>'\]"):
        register_op(Loose)
    with pytest.raises(KeyError, match="unknown op 'loose'"):
        get_op("loose")


def test_every_filters_score_names_its_own_config_fields_and_a_schema_column():
    """The report draws a filter's score from `Op.score` alone, so it must name real fields."""
    from dataengine.core.schemas import sample_schema
    from dataengine.ops import list_ops

    scored = {name: get_op(name) for name in list_ops() if get_op(name).score is not None}
    assert set(scored) == {"capfilt_filter", "clip_score_filter", "perplexity_filter"}
    for name, op in scored.items():
        fields = op.Config.model_fields
        assert op.score.threshold_field in fields, name
        assert op.score.fraction_field is None or op.score.fraction_field in fields, name
        assert op.score.column in sample_schema().names, name


def test_a_model_op_loads_once_and_keeps_where_its_weights_landed(registry):
    """`ModelOp`: an actor-pool op whose `load_model` runs once; device and dtype come from the weights."""
    import torch

    from dataengine.ops.base import ModelOp, ModelOpConfig

    class _TinyConfig(ModelOpConfig):
        op: Literal["test_tiny_model"] = "test_tiny_model"

    class _Tiny(ModelOp[_TinyConfig]):
        Config = _TinyConfig
        loads = 0

        def load_model(self, config: _TinyConfig) -> torch.nn.Module:
            type(self).loads += 1
            return torch.nn.Linear(2, 1).to(dtype=torch.float64)

        def process(self, batch: pa.Table) -> pa.Table:
            x = self.torch.tensor(batch.column("x").to_pylist(), dtype=self.dtype, device=self.device)
            return pa.table({"y": self.model(x[:, None].repeat(1, 2)).squeeze(1).tolist()})

    register_op(_Tiny)
    op = get_op("test_tiny_model")(_TinyConfig())
    assert op.stateful and _Tiny.loads == 1 and op.device.type == "cpu" and op.dtype == torch.float64
    assert op.process(pa.table({"x": [1.0, 2.0]})).num_rows == 2 and _Tiny.loads == 1
    assert all(get_op(n).stateful for n in ("blip_caption_mapper", "capfilt_filter", "clip_score_filter",
                                            "perplexity_filter"))


def test_a_model_stage_prepares_in_tasks_where_it_has_gpus_or_is_told_to():
    from dataengine.ops.base import INFER, PREPARE, Step, split_steps
    from dataengine.ops.caption_rules import CaptionRulesConfig
    from dataengine.ops.clip_score import ClipScoreConfig
    from dataengine.ops.dedup import DedupConfig

    def phases(config):
        return [s.phase for s in split_steps([Step(0, config)])]

    assert phases(ClipScoreConfig()) == [None]  # auto, no GPU: both halves in the actor (no hop on a CPU)
    assert phases(ClipScoreConfig(num_gpus=1)) == [PREPARE, INFER]
    assert phases(ClipScoreConfig(prepare_in="tasks")) == [PREPARE, INFER]
    assert phases(ClipScoreConfig(num_gpus=1, prepare_in="actor")) == [None]
    assert phases(CaptionRulesConfig()) == [None]  # no model: a task already
    assert phases(DedupConfig(descriptor="clip", prepare_in="tasks")) == [None]  # nothing to prepare


def test_prepare_then_infer_keeps_the_preparers_reasons_and_scatters_infers_columns():
    from dataengine.ops.base import prepare_then_infer

    class Halves:
        def infer(self, rows):
            assert rows.column("_prepared_x").to_pylist() == [10, 30]  # only the rows the preparer kept
            return pa.table({"score": pa.array([1.0, 3.0]), "reject_reason": pa.array([None, "low"], pa.string())})

    def prepare(batch):
        return pa.table({"_prepared_x": [10, None, 30], "reject_reason": pa.array([None, "broken", None], pa.string())})

    out = prepare_then_infer(Halves(), prepare, pa.table({"uid": ["a", "b", "c"]}))
    assert out.column("score").to_pylist() == [1.0, None, 3.0]
    assert out.column("reject_reason").to_pylist() == [None, "broken", "low"]
