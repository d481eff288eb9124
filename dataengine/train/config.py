"""The `train:` section of a pipeline spec: which model to build, and how to train each stage.

Defaults are LLaVA-1.5's recipe (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"):
stage 1 (alignment) trains the projector alone at lr 1e-3 with a global batch of 256; stage 2
(instruction tuning) trains projector and LM at lr 2e-5 with a global batch of 128; both one epoch,
cosine schedule with 3% warmup, no weight decay, 2048 tokens. Every value can be overridden.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dataengine.core.fields import OPERATIONAL, decisive, payload_hash
from dataengine.core.plugins import BENCHMARKS, registered

Projector = Literal["linear", "mlp2x_gelu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """What to assemble: a vision tower and a causal LM joined by a projector, or an existing LLaVA."""

    vision: str | None = Field(default=None, description="CLIP/SigLIP vision tower: hub id (e.g. "
                               "openai/clip-vit-large-patch14-336), transformers dir, or an open_clip dir "
                               "(converted). Not with `init_from`.")
    lm: str | None = Field(default=None, description="Causal LM: hub id (e.g. lmsys/vicuna-7b-v1.5) or local dir.")
    init_from: str | None = Field(default=None, description="Start from an existing LLaVA checkpoint "
                                  "(e.g. llava-hf/llava-1.5-7b-hf or a checkpoint this trainer wrote).")
    projector: Projector = Field(default="mlp2x_gelu", description="LLaVA-1.5 uses mlp2x_gelu; LLaVA v1 linear.")
    vision_feature_layer: int = Field(default=-2, description="Hidden layer of the vision tower fed to the projector.")
    image_token: str = Field(default="<image>", min_length=1)
    chat_template: str | None = Field(default=None, description="Jinja chat template; default: LLaVA-1.5's "
                                      "`USER: <image>\\n... ASSISTANT: ...` format.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.init_from and (self.vision or self.lm):
            raise ValueError("model: give either init_from (an existing LLaVA) or vision + lm, not both")
        if not self.init_from and not (self.vision and self.lm):
            raise ValueError("model: vision and lm are both required unless init_from names a LLaVA checkpoint")
        return self


class LoraSpec(_Strict):
    """LoRA on the LM's linear layers (through `peft`); the projector is trained in full."""

    r: int = Field(default=128, gt=0)
    alpha: int = Field(default=256, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


def _optional_in_schema(schema: dict) -> None:
    """`lr` and `global_batch` left out of a stage fall back to that stage's defaults (see TrainSpec)."""
    schema.pop("required", None)


class StageSpec(_Strict):
    """Hyperparameters of one stage. `global_batch` = micro_batch x workers x accumulation steps."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_optional_in_schema)

    lr: float = Field(gt=0, description="Peak learning rate (default: 1e-3 in stage 1, 2e-5 in stage 2).")
    global_batch: int = Field(gt=0, description="Samples per optimizer step (default: 256 in stage 1, 128 in stage 2).")
    micro_batch: int = Field(default=16, gt=0, description="Samples per worker per forward pass.")
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_length: int = Field(default=2048, gt=0, description="Tokens per sample (image tokens included); "
                            "longer samples are skipped and counted, never truncated.")
    lora: LoraSpec | None = Field(default=None, description="Stage 2 only: LoRA instead of full LM training.")
    checkpoint_every: int = Field(default=500, gt=0, description="Optimizer steps between checkpoints.",
                                  json_schema_extra=OPERATIONAL)


def _stage1_defaults() -> StageSpec:
    return StageSpec(lr=1e-3, global_batch=256)


def _stage2_defaults() -> StageSpec:
    return StageSpec(lr=2e-5, global_batch=128)


class EvalSpec(_Strict):
    """Held-out split and benchmarks run after each stage."""

    heldout_fraction: float = Field(default=0.02, ge=0, lt=1, description="Rows (by uid hash) never trained on.")
    benchmark: str | None = Field(default=None, description="A registered benchmark (dataengine.core.plugins); "
                                  "synthweb: the test bed's VQA benchmark on fresh synthetic scenes (counts, "
                                  "colours, positions, POPE).")
    benchmark_size: int = Field(default=200, gt=0, description="Images in the benchmark.")

    @field_validator("benchmark")
    @classmethod
    def _known_benchmark(cls, name: str | None) -> str | None:
        if name is not None and name not in registered(BENCHMARKS):
            raise ValueError(f"no benchmark {name!r} is registered (registered: {', '.join(sorted(registered(BENCHMARKS))) or 'none'})")
        return name


class TrainSpec(_Strict):
    """A LLaVA-style two-stage training run on Ray Train, fed from the pipeline's kept rows."""

    model: ModelSpec
    data: str | None = Field(default=None, description="A training mixture's manifest (`dataengine mix`: "
                                                       "mixture.yaml) to train on instead of the run's kept rows.")
    stages: list[Literal[1, 2]] = Field(default=[1, 2], min_length=1)
    stage1: StageSpec = Field(default_factory=_stage1_defaults)
    stage2: StageSpec = Field(default_factory=_stage2_defaults)
    workers: int = Field(default=1, gt=0, json_schema_extra=OPERATIONAL)
    use_gpu: bool = Field(default=False, json_schema_extra=OPERATIONAL)
    cpus_per_worker: float | None = Field(
        default=None, gt=0, description="CPUs each training worker reserves (and PyTorch threads it uses). Default: "
        "the cluster's CPUs shared among the workers, one left for data loading when the data streams; an "
        "explicit value is scaled down (with a warning) when it would leave none.", json_schema_extra=OPERATIONAL)
    strategy: Literal["ddp", "fsdp"] = Field(default="ddp", description="fsdp needs use_gpu.",
                                             json_schema_extra=OPERATIONAL)
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, float32 on CPU.")
    group_by_length: bool = Field(default=True, description="Batch samples of similar length together "
                                  "(LLaVA-1.5's grouping by modality length).")
    max_failures: int = Field(default=2, ge=0, description="Worker failures survived by restarting from "
                              "the last checkpoint.", json_schema_extra=OPERATIONAL)
    max_samples: int | None = Field(default=None, gt=0, description="Train on at most this many rows (the "
                                    "first by uid hash): compare datasets at equal size.")
    cache_encoded_mb: int = Field(default=2048, ge=0, description="Keep the tokenized training set in Ray's "
                                  "object store when it is smaller than this, so later epochs skip the "
                                  "image decoding and tokenizing; larger sets are streamed every epoch.",
                                  json_schema_extra=OPERATIONAL)
    seed: int = 0
    stage2_init: str | None = Field(
        default=None, description="Stage 2 starts from this model directory (another run's train/stage1/final: "
        "LLaVA's pretrained projector) instead of this run's stage 1; `stages: [2]` then trains stage 2 alone.")
    stage2_seeds: list[int] = Field(
        default_factory=list, json_schema_extra=OPERATIONAL,  # which extra runs are made, not how one is trained
        description="Train stage 2 again from the same stage-1 model with each of these seeds (besides `seed`), "
        "into train/stage2-seed<N>, each evaluated: the spread over seeds is the training variance a "
        "comparison of two datasets has to beat.")
    eval: EvalSpec = EvalSpec()

    @field_validator("stage1", "stage2", mode="before")
    @classmethod
    def _over_stage_defaults(cls, value: object, info: ValidationInfo) -> object:
        """A stage given in part keeps that stage's LLaVA-1.5 lr and global batch."""
        if isinstance(value, dict):
            defaults = _stage1_defaults() if info.field_name == "stage1" else _stage2_defaults()
            return {"lr": defaults.lr, "global_batch": defaults.global_batch, **value}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("strategy: fsdp needs use_gpu: true (on CPU, use ddp)")
        if self.stage1.lora is not None:
            raise ValueError("stage1.lora: stage 1 trains only the projector; LoRA applies to stage 2")
        if sorted(set(self.stages)) != list(self.stages):
            raise ValueError("stages: list each of 1 and 2 at most once, in order")
        if self.seed in self.stage2_seeds or len(set(self.stage2_seeds)) != len(self.stage2_seeds):
            raise ValueError(f"stage2_seeds: {self.stage2_seeds} must be distinct and differ from seed ({self.seed})")
        return self

    def stage(self, n: int) -> StageSpec:
        return self.stage1 if n == 1 else self.stage2

    def train_hash(self, stage: int = 2) -> str:
        """Hash of everything that decides stage `stage`'s weights (workers, GPUs and checkpoint cadence not).
        Which stages a command runs decides no weights, and stage 1 does not depend on stage 2's settings:
        adding stage 2, or changing its learning rate, must not make a trained stage 1 refuse to resume."""
        fields = decisive(self)
        fields.pop("stages")
        if stage == 1:
            for name in ("stage2", "stage2_init"):
                fields.pop(name)
        return payload_hash(fields)

    def matches_train_hash(self, recorded: str, stage: int) -> bool:
        """Whether a trained stage's recorded hash is this section's: its stage hash, or the whole section's
        hash that results written before stage hashes existed record (a rerun of the same spec resumes)."""
        return recorded in (self.train_hash(stage), payload_hash(decisive(self)))
