"""Decode, verify, resize and re-encode downloaded images, as fast as one core allows.

Every downloaded body goes through `process_image` once, so its cost bounds the download stage.
Pipeline, cheapest checks first:

1. **Header** with Pillow's lazy `Image.open` (reads markers/chunks only, never pixels): format from
   a whitelist, stored size, EXIF orientation. Anything unrecognised is `not_image`; a size over
   `max_pixels` is `too_many_pixels` before a single pixel is allocated (decompression bombs).
2. **Decode** with OpenCV, told to ignore EXIF orientation (we apply it ourselves, see 4):
   - JPEG/MPO: libjpeg-turbo DCT-domain scaling (`IMREAD_REDUCED_COLOR_{2,4,8}`), the largest
     reduction that still leaves both sides >= the resize target. OpenCV grey-fills a truncated
     JPEG without complaint, so we first check that an EOI marker follows the first scan.
   - PNG, WebP, BMP: `IMREAD_UNCHANGED`, then 16-bit -> 8-bit, grey -> BGR, alpha composited
     onto white (as img2dataset does). Animated WebP gives its first frame.
   - GIF (Pillow's decoder is ~5x faster than OpenCV's; first frame), TIFF and AVIF (OpenCV's
     orientation handling for them disagrees with Pillow's), and anything OpenCV fails on:
     Pillow, which is strict about truncation and knows every mode.
3. **Resize** in the stored orientation: INTER_AREA down, INTER_LANCZOS4 up (as img2dataset);
   ratios under 2 (every JPEG after DCT scaling) take a 2.5x faster near-equivalent of
   INTER_AREA, see `_resize`.
4. **Orient** the already small image (a flip/transpose of ~256 px costs microseconds), then
   centre-crop or pad per `resize_mode`.
5. **Encode** with `cv2.imencode`, so EXIF and every other metadata is dropped.

Why these paths: the measurements are in `bench/RESULTS.md` ("Decode paths", `bench/decode.py`).

Threads: OpenCV's own thread pool is set to 1 thread at import (`cv2.setNumThreads(1)`, process-
wide): callers parallelise across images with many threads/processes, and per-call parallelism on
top of that only oversubscribes the cores. `cv2.imdecode`, `cv2.resize` and `cv2.imencode` release
the GIL, so a thread pool over `process_image` scales.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

cv2.setNumThreads(1)

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
EncodeFormat = Literal["jpeg", "webp", "png"]
RejectReason = Literal["not_image", "decode_error", "too_many_pixels"]

#: Pillow format names we accept; Pillow can open more (EPS runs Ghostscript, PSD, ...) but a
#: web image dataset has no use for them and each is attack surface. "JPEG" also opens MPO.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Pillow decodes these: OpenCV's GIF decoder is ~5x slower than Pillow's, and OpenCV applies
# TIFF/AVIF orientation (tag, irot/imir) in ways that disagree with Pillow's (both are rare).
_PILLOW_DECODES = frozenset({"GIF", "TIFF", "AVIF"})
# Pillow reports a TIFF's size already oriented and rotates it while loading.
_ORIENTED_ON_LOAD = frozenset({"TIFF"})
# Magic numbers of accepted formats: a body that starts with one but whose header Pillow cannot
# parse is a broken image (`decode_error`), not a non-image (`not_image`).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255)
_MAX_SIDE = {"jpeg": 65_535, "webp": 16_383, "png": 2**31 - 1}  # encoder limits
_DEFAULT_PNG_LEVEL = 3  # zlib's speed/size sweet spot; PNG is lossless so "quality" has no meaning


@dataclass(frozen=True)
class ImageOptions:
    """How to resize and re-encode; semantics follow img2dataset's resizer.

    Attributes:
        image_size: target side in pixels.
        resize_mode: `keep_ratio` (smaller side -> image_size), `keep_ratio_largest` (larger side
            -> image_size), `center_crop` (keep_ratio then centre crop to a square), `border`
            (keep_ratio_largest then pad to a square with white), `no` (never resize).
        resize_only_if_bigger: never upscale; an image that needs no downscale is then left
            untouched (not cropped or padded either), as img2dataset does.
        encode_format: output format; the image is always re-encoded (EXIF stripped).
        encode_quality: JPEG/WebP quality 0-100. For PNG, 0-9 is used as the zlib level
            (img2dataset's convention), anything larger means level 3.
        max_pixels: decompression-bomb guard: the most pixels an image may have as served
            (read from the header, before decoding) or after resizing (a 2x5000 line upscaled
            by keep_ratio would be 256x640000). Pillow refuses images over 2x
            `PIL.Image.MAX_IMAGE_PIXELS` on its own; raise that too to allow more.

    Examples:
        >>> ImageOptions(image_size=384, resize_mode="center_crop", encode_format="webp").image_size
        384
    """

    image_size: int = 256
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: EncodeFormat = "jpeg"
    encode_quality: int = 95
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.resize_mode not in get_args(ResizeMode):
            raise ValueError(f"resize_mode must be one of {get_args(ResizeMode)}, got {self.resize_mode!r}")
        if self.encode_format not in get_args(EncodeFormat):
            raise ValueError(
                f"encode_format must be one of {get_args(EncodeFormat)}, got {self.encode_format!r}"
            )
        if not 0 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality must be in 0..100, got {self.encode_quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class ProcessedImage:
    """The re-encoded image; `original_*` are the true dimensions after EXIF orientation."""

    data: bytes
    format: str
    width: int
    height: int
    original_width: int
    original_height: int


class ImageRejected(Exception):
    """The body is not a usable image; `reason` is a stable code for routing and counting.

    Attributes:
        reason: "not_image" | "decode_error" | "too_many_pixels".
        detail: human-readable explanation.
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(reason, detail)  # args kept so the exception pickles (Ray workers)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def process_image(data: bytes, options: ImageOptions) -> ProcessedImage:
    """Decode, verify, resize and re-encode one downloaded body.

    Args:
        data: the body as served.
        options: resize and encode settings.

    Returns:
        The re-encoded image with its new and original dimensions.

    Raises:
        ImageRejected: the body is not an image, cannot be decoded, or has too many pixels.

    Examples:
        >>> out = process_image(jpeg_bytes, ImageOptions(image_size=256))  # doctest: +SKIP
        >>> out.format, min(out.width, out.height)  # doctest: +SKIP
        ('jpeg', 256)
    """
    fmt, (stored_w, stored_h), orientation, pil_image = _read_header(data)
    try:
        _check_pixels(stored_w, stored_h, options.max_pixels, "image")
        swap = orientation in (5, 6, 7, 8)
        orig_w, orig_h = (stored_h, stored_w) if swap else (stored_w, stored_h)
        target = _resize_target(orig_w, orig_h, options)
        # extreme aspect ratios upscale into huge outputs: refuse before allocating them
        out_w, out_h = _output_size(orig_w, orig_h, target, options)
        _check_pixels(out_w, out_h, options.max_pixels, "output")
        if max(out_w, out_h) > _MAX_SIDE[options.encode_format]:
            raise ImageRejected(
                "too_many_pixels", f"output {out_w}x{out_h} exceeds what {options.encode_format} can encode"
            )
        # the same target in the stored orientation: we resize before rotating
        need = (target[1], target[0]) if (target and swap) else target

        if fmt in _JPEG_FORMATS:
            bgr = _decode_jpeg(data, pil_image, stored_w, stored_h, need)
        elif fmt in _PILLOW_DECODES:
            bgr = _decode_pillow(pil_image)
        else:
            bgr = _decode_other(data, pil_image)
    finally:
        pil_image.close()

    if need is not None and (bgr.shape[1], bgr.shape[0]) != need:
        bgr = _resize(bgr, need)
    bgr = _apply_orientation(bgr, orientation)
    if target is not None:
        bgr = _crop_or_pad(bgr, options)

    return ProcessedImage(
        data=_encode(bgr, options),
        format=options.encode_format,
        width=bgr.shape[1],
        height=bgr.shape[0],
        original_width=orig_w,
        original_height=orig_h,
    )


def _read_header(data: bytes) -> tuple[str, tuple[int, int], int, Image.Image]:
    """Format, stored size, EXIF orientation and the lazily opened image, without decoding."""
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise ImageRejected("decode_error", "image signature but unreadable header") from None
        raise ImageRejected("not_image", f"unrecognised content starting {data[:16]!r}") from None
    except Exception as exc:  # a plugin choking on a malformed header
        raise ImageRejected("decode_error", f"bad header: {type(exc).__name__}: {exc}") from None
    try:
        # not im.getexif(): for a PNG without an eXIf chunk before IDAT it decodes every pixel
        # looking for one after; info["exif"] is what the header (JPEG APP1, PNG eXIf, WebP
        # EXIF, AVIF) already held
        exif = Image.Exif()
        exif.load(im.info.get("exif") or b"")
        orientation = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not cost us the image
        logger.debug("unreadable EXIF ignored", exc_info=True)
        orientation = 1
    if orientation not in range(1, 9) or im.format in _ORIENTED_ON_LOAD:
        orientation = 1
    return im.format or "", im.size, orientation, im


def _looks_like_image(data: bytes) -> bool:
    """Starts with the signature of an accepted format (BMP's two-letter "BM" is too weak)."""
    return (
        data.startswith(_MAGIC)
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        or data[4:12] in (b"ftypavif", b"ftypavis")
    )


def _resize_target(width: int, height: int, options: ImageOptions) -> tuple[int, int] | None:
    """(w, h) to resize the oriented image to before crop/pad, or None to leave it as is."""
    mode, size = options.resize_mode, options.image_size
    if mode == "no":
        return None
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    if options.resize_only_if_bigger and side <= size:
        return None
    scale = size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageRejected(
            "too_many_pixels", f"{what} {width}x{height} = {pixels} pixels > max_pixels {max_pixels}"
        )


def _output_size(
    width: int, height: int, target: tuple[int, int] | None, options: ImageOptions
) -> tuple[int, int]:
    """Final (w, h) after resize and crop/pad, known before decoding."""
    if target is None:
        return width, height
    size = options.image_size
    if options.resize_mode == "center_crop":
        return min(target[0], size), min(target[1], size)
    if options.resize_mode == "border":
        return max(target[0], size), max(target[1], size)
    return target


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """INTER_AREA down, INTER_LANCZOS4 up (img2dataset's choices), with a fast path for ratios < 2.

    OpenCV's INTER_AREA is fast only for integer ratios; its generic path costs ~2.5 ms for
    640x480 -> 341x256 on one core, as much as the JPEG decode. Every JPEG lands in that case
    after DCT scaling (ratio in [1, 2)), so there we upsample bilinearly to exactly twice the
    target and finish with the 2:1 INTER_AREA fast path: the area average of the bilinear
    reconstruction rather than of the blocky one. ~1 ms, within 0.1-0.5 grey levels (mean) of
    plain INTER_AREA. At ratios >= 2 that trick aliases, so those get plain INTER_AREA (tried and
    dropped: an integer box pre-reduction, which shifts and blurs measurably).
    """
    height, width = img.shape[:2]
    if width < size[0] or height < size[1]:
        return cv2.resize(img, size, interpolation=cv2.INTER_LANCZOS4)
    double = (2 * size[0], 2 * size[1])
    if width < double[0] and height < double[1]:
        img = cv2.resize(img, double, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _decode_jpeg(
    data: bytes, pil_image: Image.Image, width: int, height: int, need: tuple[int, int] | None
) -> np.ndarray:
    """Decode at the largest DCT reduction that still covers `need` (stored orientation)."""
    if not _jpeg_is_complete(data):
        raise ImageRejected("decode_error", "truncated JPEG: no EOI marker after the scan data")
    factor = 1
    if need is not None:
        for f in (8, 4, 2):
            if -(-width // f) >= need[0] and -(-height // f) >= need[1]:
                factor = f
                break
    flags = _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:
        logger.debug("OpenCV could not decode a %s JPEG; trying Pillow", pil_image.mode)
        if need is not None:
            pil_image.draft("RGB", need)
        return _decode_pillow(pil_image)
    return bgr


def _jpeg_is_complete(data: bytes) -> bool:
    """True when an EOI marker follows the first scan.

    libjpeg fills a cut-off JPEG with grey and only warns, so OpenCV returns it as valid. Walking
    the marker segments up to the first SOS skips EXIF thumbnails (which carry their own EOI);
    inside scan data 0xFF is always byte-stuffed, so the next FFD9 is the real EOI. Trailers
    after the EOI (motion photos, padding) are fine.
    """
    if data[-64:].rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
        return True  # the common case: no walk needed
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:  # junk between segments: resync on the next marker, like libjpeg
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return False
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return True
        elif 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # markers without a length
            pos += 2
        elif marker == 0xDA:
            seg_len = int.from_bytes(data[pos + 2 : pos + 4], "big")
            return data.find(b"\xff\xd9", pos + 2 + seg_len) >= 0
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _decode_other(data: bytes, pil_image: Image.Image) -> np.ndarray:
    """Full decode of a non-JPEG (first frame), normalised to 8-bit BGR on white."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        logger.debug("OpenCV could not decode a %s; trying Pillow", pil_image.format)
        return _decode_pillow(pil_image)
    img = _to_uint8(img)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return _composite_on_white(img)
    return img


def _decode_pillow(im: Image.Image) -> np.ndarray:
    """Pillow's decoder: slower, but strict about truncation and knows every mode."""
    try:
        im.seek(0)
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = _to_uint8(np.asarray(im))
            return cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
        if has_alpha:
            return _composite_on_white(cv2.cvtColor(np.asarray(im.convert("RGBA")), cv2.COLOR_RGBA2BGRA))
        return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except ImageRejected:
        raise
    except Exception as exc:
        detail = f"{im.format} decode failed: {type(exc).__name__}: {exc}"
        raise ImageRejected("decode_error", detail) from None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Bring 16-bit (and rarer float/int) samples to 8-bit; Pillow would clip instead of scale."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype.kind == "f":  # float TIFF/AVIF: assume 0..1
        return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    top = 65535 if img.max(initial=0) > 255 else 255  # 32-bit int greys: usually 16-bit data
    return (np.clip(img, 0, top) * (255 / top) + 0.5).astype(np.uint8)


def _composite_on_white(bgra: np.ndarray) -> np.ndarray:
    """Alpha-composite BGRA onto white: out = c*a + 255*(1-a), rounded."""
    alpha = np.ascontiguousarray(bgra[:, :, 3])
    bgr = cv2.cvtColor(bgra, cv2.COLOR_BGRA2BGR)
    if cv2.minMaxLoc(alpha)[0] == 255:  # opaque: nothing to blend
        return bgr
    alpha3 = cv2.cvtColor(alpha, cv2.COLOR_GRAY2BGR)
    return cv2.add(cv2.multiply(bgr, alpha3, scale=1 / 255), cv2.bitwise_not(alpha3))


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) the way `PIL.ImageOps.exif_transpose` does."""
    if orientation == 2:
        return cv2.flip(img, 1)
    if orientation == 3:
        return cv2.rotate(img, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(img, 0)
    if orientation == 5:
        return cv2.transpose(img)
    if orientation == 6:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(img), -1)
    if orientation == 8:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def _crop_or_pad(img: np.ndarray, options: ImageOptions) -> np.ndarray:
    """Centre crop or white-pad to a square for the modes that ask for it (img2dataset's offsets)."""
    size = options.image_size
    height, width = img.shape[:2]
    if options.resize_mode == "center_crop" and (height > size or width > size):
        top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
        return img[top : top + size, left : left + size]
    if options.resize_mode == "border" and (height < size or width < size):
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        top, left = pad_h // 2, pad_w // 2
        return cv2.copyMakeBorder(
            img, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=_WHITE
        )
    return img


def _encode(bgr: np.ndarray, options: ImageOptions) -> bytes:
    """Encode with OpenCV (its JPEG encoder beat Pillow's and simplejpeg's in our measurement)."""
    quality = options.encode_quality
    if options.encode_format == "jpeg":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif options.encode_format == "webp":
        ext, params = ".webp", [cv2.IMWRITE_WEBP_QUALITY, max(1, quality)]
    else:
        level = quality if quality <= 9 else _DEFAULT_PNG_LEVEL
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, level]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr), params)
    if not ok:  # should not happen for 8-bit BGR; surface it rather than write an empty image
        raise RuntimeError(f"cv2.imencode({ext}) failed for a {bgr.shape} image")
    return buf.tobytes()
