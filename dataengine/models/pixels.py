"""Arrays a model stage's CPU half hands its model half: images as uint8 pixels at the model's input
size, captions as token ids, in Arrow columns the actor turns into tensors without a Python loop.

Pixels cross as HWC uint8 (a quarter of float32's bytes) in a fixed-size-list column; the actor scales
and normalises them on the device (`to_model_input`), in float32 as torchvision's ToTensor + Normalize
do, so the model sees the same numbers as when one process preprocessed with PIL.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch


def pixels_column(images: Sequence[np.ndarray | None], height: int, width: int) -> pa.FixedSizeListArray:
    """One row per image (HxWx3 uint8, already at the model's size); None rows are null."""
    n = len(images)
    data = np.zeros((n, height, width, 3), dtype=np.uint8)
    valid = np.zeros(n, dtype=bool)
    for i, image in enumerate(images):
        if image is not None:
            if image.shape != (height, width, 3):
                raise ValueError(f"image {i} is {image.shape}, expected {(height, width, 3)}")
            data[i] = image
            valid[i] = True
    return pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), height * width * 3, mask=pa.array(~valid))


def pixels_array(column: pa.Array | pa.ChunkedArray, height: int, width: int) -> np.ndarray:
    """n x H x W x 3 uint8 from a pixels column (every row set): zero-copy for one chunk."""
    values = _fixed_values(column, np.uint8)
    return values.reshape(-1, height, width, 3)


def tokens_column(ids: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """n x L token ids (fixed length: the tokenizer padded them) as int32 rows; rows not `valid` are null."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), ids.shape[1], mask=mask)


def tokens_array(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    array = _one_chunk(column)
    return _fixed_values(array, np.int32).reshape(-1, array.type.list_size)


def ragged_tokens(ids: Sequence[Sequence[int] | None]) -> pa.ListArray:
    """Token ids of different lengths (no padding: the actor pads to its batch's longest)."""
    return pa.array(ids, pa.list_(pa.int32()))


def padded(column: pa.Array | pa.ChunkedArray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): a ragged token column padded on the right to its longest row, with numpy only."""
    array = _one_chunk(column)
    offsets = array.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = array.values.to_numpy()[offsets[0]:offsets[-1]]
    width = int(lengths.max()) if len(lengths) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((len(lengths), width), pad, dtype=np.int64)
    ids[mask] = values
    return ids, mask.astype(np.int64)


def to_model_input(pixels: np.ndarray, device: torch.device, dtype: torch.dtype, mean: Sequence[float],
                   std: Sequence[float], scale: float | None = 255.0) -> torch.Tensor:
    """uint8 NHWC on the host -> normalised NCHW on `device` in `dtype`: divided by `scale`, then
    normalised, in float32 on the device, as ToTensor + Normalize do on the host (`scale=None`: mean and
    std already hold the scale, as transformers' image processors fuse them)."""
    import torch

    x = host_tensor(pixels).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if scale is not None:
        x = x.div(scale)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.sub(mean_t).div(std_t).to(dtype)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an array read from Arrow, without a copy. Arrow's buffers are read-only; the tensor
    is only read (moved to the device or converted, which copies), so torch's warning does not apply."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def vectors_column(vectors: np.ndarray) -> pa.Array:
    """n x d float32 as a `list<float>` column (the schemas' embedding type), built from the buffer."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return fixed.cast(pa.list_(pa.float32()))


def _one_chunk(column: pa.Array | pa.ChunkedArray) -> Any:
    """The column as one array: its only chunk as is (combining copies, and a batch of pixels is megabytes)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _fixed_values(column: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    array = _one_chunk(column)
    if array.null_count:
        raise ValueError("a prepared column has null rows: the rows the preparer rejected must not reach the model")
    size = array.type.list_size
    values = array.values.to_numpy(zero_copy_only=False)
    return values[array.offset * size:(array.offset + len(array)) * size].astype(dtype, copy=False)
