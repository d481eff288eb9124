"""Operators, one per module, registered by name on import."""

from dataengine.ops import (  # noqa: F401  (each registers its op)
    blip_caption,
    capfilt,
    caption_rules,
    clip_score,
    dedup,
    download,
    export,
    llava_synthesis,
    metaclip_balance,
    object_detector,
    perplexity,
    vlm_caption,
)
from dataengine.ops.base import Op, OpConfig, apply_stage, get_op, list_ops, register_op, stage_name

__all__ = ["Op", "OpConfig", "apply_stage", "get_op", "list_ops", "register_op", "stage_name"]
