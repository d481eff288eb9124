"""Which device and dtype a model runs on: `auto` picks the GPU and bf16 where there is one.

The same op code runs on a CPU test box and a GPU node; only these two choices differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
def select_device(device: DeviceName = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; asking for `cuda` without one is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested, but no CUDA GPU is visible to this worker (set device: auto or cpu)")
    return torch.device(device)


def select_dtype(dtype: DtypeName, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPUs that support it (float16 on older ones) and float32 on the CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


