"""Device and dtype choice: `auto` follows the hardware; asking for a GPU that is not there is an error."""

from __future__ import annotations

import pytest
import torch

from dataengine.models.devices import select_device, select_dtype


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without a GPU")
def test_cuda_without_a_gpu_says_what_to_set():
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible.*set device: auto or cpu"):
        select_device("cuda")


def test_dtypes():
    cpu = torch.device("cpu")
    assert select_dtype("auto", cpu) == torch.float32  # bf16 matmuls on a CPU are slow and inexact
    assert select_dtype("bfloat16", cpu) == torch.bfloat16 and select_dtype("float16", cpu) == torch.float16
