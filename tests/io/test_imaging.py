"""Tests for `dataengine.io.imaging`: every input oddity the web serves, built in memory."""

from __future__ import annotations

import io
import pickle
import resource
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from dataengine.io.imaging import ImageOptions, ImageRejected, ProcessedImage, process_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
NO_RESIZE = ImageOptions(resize_mode="no", encode_format="png")


# ---------------------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def decode_rgb(processed: ProcessedImage) -> np.ndarray:
    """Our output as an RGB array, decoded by Pillow (an independent decoder)."""
    with Image.open(io.BytesIO(processed.data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def close(pixel: np.ndarray, expected: tuple[int, ...], tol: int = 12) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(expected)) <= tol))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def zero_grey_png(width: int, height: int, rows_per_block: int = 250) -> bytes:
    """A valid 8-bit greyscale PNG of zeros, built by hand without ever holding the raw pixels.

    Each block of rows is deflated once and repeated: after Z_FULL_FLUSH a deflate stream never
    refers back, so identical blocks compress to identical bytes.
    """
    assert height % rows_per_block == 0
    block = b"\x00" * ((width + 1) * rows_per_block)  # filter byte 0 + samples, per row
    comp = zlib.compressobj(9)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows_per_block):
        adler = zlib.adler32(block, adler)
    # final empty fixed-Huffman block, then the zlib trailer
    stream = first + again * (height // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", stream)
        + png_chunk(b"IEND", b"")
    )


def rgb16_png(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one) from an HxWx3 uint16 array."""
    height, width, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width), yy * 255 // max(1, height), np.full_like(xx, 90)], -1)
    return (base + rng.integers(-10, 10, base.shape)).clip(0, 255).astype(np.uint8)


def with_corner(width: int, height: int, corner: int = 16) -> np.ndarray:
    """Grey image with a red block in the top-left corner."""
    arr = np.full((height, width, 3), 128, np.uint8)
    arr[:corner, :corner] = RED
    return arr


def with_orientation(arr: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), fmt, quality=95, exif=exif.tobytes())


def red_corner(rgb: np.ndarray) -> str:
    """Which corner of an image holds the red block."""
    h, w = rgb.shape[:2]
    corners = {"tl": rgb[1, 1], "tr": rgb[1, w - 2], "bl": rgb[h - 2, 1], "br": rgb[h - 2, w - 2]}
    found = [name for name, px in corners.items() if close(px, RED, 40)]
    assert len(found) == 1, corners
    return found[0]


# ------------------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "AVIF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(orientation: int, fmt: str) -> None:
    data = with_orientation(with_corner(80, 40), orientation, fmt)
    out = process_image(data, ImageOptions(resize_mode="no"))
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = decode_rgb(out)
    assert got.shape == expected.shape
    assert (out.original_width, out.original_height) == (expected.shape[1], expected.shape[0])
    assert red_corner(got) == red_corner(expected)


def test_orientation_6_swaps_dimensions_and_rotates_clockwise() -> None:
    data = with_orientation(with_corner(80, 40), 6)
    out = process_image(data, ImageOptions(resize_mode="no"))
    assert (out.width, out.height, out.original_width, out.original_height) == (40, 80, 40, 80)
    assert red_corner(decode_rgb(out)) == "tr"  # stored top-left, turned 90 degrees clockwise


def test_orientation_with_reduced_decode() -> None:
    # 1600x800 stored, displayed 800x1600: keep_ratio 100 -> 100x200, decoded at 1/8 scale
    arr = with_corner(1600, 800, corner=160)
    out = process_image(with_orientation(arr, 6), ImageOptions(image_size=100))
    assert (out.original_width, out.original_height) == (800, 1600)
    assert (out.width, out.height) == (100, 200)
    assert red_corner(decode_rgb(out)) == "tr"


def test_reduced_decode_picks_largest_reduction_that_covers_target(monkeypatch) -> None:
    flags: list[int] = []
    real = cv2.imdecode

    def spy(buf, flag):
        flags.append(flag)
        return real(buf, flag)

    monkeypatch.setattr(cv2, "imdecode", spy)
    options = ImageOptions(image_size=256)
    big = encode(Image.fromarray(photo_like(2048, 1536)), "JPEG", quality=90)
    small = encode(Image.fromarray(photo_like(640, 480)), "JPEG", quality=90)
    out_big, out_small = process_image(big, options), process_image(small, options)
    ignore = cv2.IMREAD_IGNORE_ORIENTATION
    # 2048x1536 -> 341x256: /4 gives 512x384 (enough), /8 gives 256x192 (not)
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4 | ignore, cv2.IMREAD_COLOR | ignore]
    assert (out_big.width, out_big.height) == (341, 256)
    assert (out_small.width, out_small.height) == (341, 256)


# ------------------------------------------------------------------------------ colour and modes


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "AVIF"])
def test_pure_red_stays_red(fmt: str) -> None:
    data = encode(Image.new("RGB", (64, 48), RED), fmt)
    for encode_format in ("jpeg", "webp", "png"):
        out = process_image(data, ImageOptions(image_size=32, encode_format=encode_format))
        assert close(decode_rgb(out)[10, 10], RED), (fmt, encode_format)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("RGB", (64, 48), RED).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    out = process_image(data, NO_RESIZE)
    assert close(decode_rgb(out)[10, 10], RED)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_greyscale_becomes_rgb(fmt: str) -> None:
    arr = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 64x32 horizontal ramp
    out = process_image(encode(Image.fromarray(arr, "L"), fmt), NO_RESIZE)
    got = decode_rgb(out)
    assert got.shape == (32, 64, 3)
    assert np.abs(got[:, :, 0].astype(int) - arr).max() <= 4
    assert np.array_equal(got[:, :, 0], got[:, :, 2])


def test_16bit_greyscale_png_scales_not_clips() -> None:
    arr = np.full((20, 30), 0x8000, np.uint16)
    arr[:, :10] = 0xFFFF
    out = process_image(encode(Image.fromarray(arr), "PNG"), NO_RESIZE)
    got = decode_rgb(out)
    assert close(got[5, 5], WHITE, 1) and close(got[5, 20], (128, 128, 128), 1)


def test_16bit_rgb_png() -> None:
    arr = np.zeros((20, 30, 3), np.uint16)
    arr[:, :, 0] = 0xFFFF  # red
    arr[:, 15:, 2] = 0x8000  # right half: red + half blue
    out = process_image(rgb16_png(arr), NO_RESIZE)
    got = decode_rgb(out)
    assert (out.width, out.height) == (30, 20)
    assert close(got[5, 5], RED, 1) and close(got[5, 20], (255, 0, 128), 1)


def test_palette_png_with_transparency_composites_on_white() -> None:
    im = Image.new("P", (20, 10), 0)
    im.putpalette([*GREEN, *RED] + [0] * 762)
    im.paste(1, (10, 0, 20, 10))  # right half: opaque red; left half: index 0, transparent
    out = process_image(encode(im, "PNG", transparency=0), NO_RESIZE)
    got = decode_rgb(out)
    assert close(got[5, 2], WHITE, 0) and close(got[5, 15], RED, 0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_composites_on_white(fmt: str) -> None:
    arr = np.zeros((10, 30, 4), np.uint8)
    arr[:, :, :3] = RED
    arr[:, 10:20, 3] = 128  # half-transparent red
    arr[:, 20:, 3] = 255  # opaque red; first third fully transparent
    out = process_image(encode(Image.fromarray(arr, "RGBA"), fmt, lossless=True), NO_RESIZE)
    got = decode_rgb(out)
    assert close(got[5, 5], WHITE, 1)
    assert close(got[5, 15], (255, 127, 127), 2)
    assert close(got[5, 25], RED, 1)


def test_la_png() -> None:
    im = Image.new("LA", (10, 10), (0, 0))  # black, fully transparent
    im.paste((0, 255), (5, 0, 10, 10))  # right half: opaque black
    got = decode_rgb(process_image(encode(im, "PNG"), NO_RESIZE))
    assert close(got[5, 2], WHITE, 0) and close(got[5, 7], (0, 0, 0), 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_gives_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3
    out = process_image(data, NO_RESIZE)
    assert (out.width, out.height) == (40, 30)
    assert close(decode_rgb(out)[15, 20], RED)


def test_gif_transparency_composites_on_white() -> None:
    im = Image.new("P", (20, 10), 0)
    im.putpalette([*GREEN, *BLUE] + [0] * 762)
    im.paste(1, (10, 0, 20, 10))
    got = decode_rgb(process_image(encode(im, "GIF", transparency=0), NO_RESIZE))
    assert close(got[5, 2], WHITE, 0) and close(got[5, 15], BLUE, 0)


def test_webp_input() -> None:
    arr = photo_like(300, 200)
    out = process_image(encode(Image.fromarray(arr), "WEBP", quality=90), ImageOptions(image_size=100))
    assert (out.original_width, out.original_height, out.width, out.height) == (300, 200, 150, 100)
    assert np.abs(decode_rgb(out).astype(int).mean((0, 1)) - arr.mean((0, 1))).max() < 6


# --------------------------------------------------------------------------------------- rejects


def rejected(data: bytes, options: ImageOptions = ImageOptions()) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        process_image(data, options)
    return info.value


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_decode_error(progressive: bool) -> None:
    data = encode(Image.fromarray(photo_like(400, 300)), "JPEG", quality=90, progressive=progressive)
    assert process_image(data, ImageOptions()).width > 0
    assert rejected(data[: len(data) * 2 // 3]).reason == "decode_error"


def test_truncated_jpeg_with_eoi_in_a_header_segment_is_decode_error() -> None:
    # an FFD9 inside a segment before the scan (as in an EXIF thumbnail) must not count as EOI
    data = encode(Image.fromarray(photo_like(400, 300)), "JPEG", quality=90)
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 6) + b"x\xff\xd9yz!"
    data = data[:2] + comment + data[2:]
    assert process_image(data, ImageOptions()).width > 0
    assert rejected(data[: len(data) * 2 // 3]).reason == "decode_error"


def test_jpeg_with_trailer_after_eoi_is_fine() -> None:
    data = encode(Image.fromarray(photo_like(400, 300)), "JPEG", quality=90)
    out = process_image(data + b"\x00\x00ftypmp42" + bytes(range(256)) * 20, ImageOptions(image_size=100))
    assert (out.width, out.height) == (133, 100)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_truncated_other_formats_are_decode_error(fmt: str) -> None:
    data = encode(Image.fromarray(photo_like(200, 150)), fmt)
    assert rejected(data[: len(data) * 2 // 3]).reason == "decode_error"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>",
        b'{"error": "rate limited"}',
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    ],
    ids=["empty", "html", "json", "random"],
)
def test_not_an_image(data: bytes) -> None:
    err = rejected(data)
    assert err.reason == "not_image" and err.detail


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff" + b"\x00" * 50,
        b"\x89PNG\r\n\x1a\n" + b"garbage" * 10,
        b"GIF89a" + b"\xff" * 3,
        b"RIFF\x20\x00\x00\x00WEBPVP8 " + b"\x00" * 20,
    ],
    ids=["jpeg", "png", "gif", "webp"],
)
def test_image_signature_with_garbage_is_decode_error(data: bytes) -> None:
    assert rejected(data).reason == "decode_error"


def test_bomb_helper_builds_a_valid_png() -> None:
    with Image.open(io.BytesIO(zero_grey_png(16000, 500))) as im:
        im.load()
        assert im.size == (16000, 500) and im.getextrema() == (0, 0)


def test_png_decompression_bomb_rejected_from_header() -> None:
    data = zero_grey_png(16000, 16000)  # 256 Mpx, a few hundred KiB on the wire
    assert len(data) < 2_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    err = rejected(data)
    elapsed = time.perf_counter() - start
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert err.reason == "too_many_pixels"
    assert elapsed < 0.5
    assert rss_growth_mib < 50


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_is_ours_not_only_pillows() -> None:
    # over our max_pixels but under Pillow's own hard limit (2x its MAX_IMAGE_PIXELS)
    assert rejected(zero_grey_png(10000, 10000)).reason == "too_many_pixels"
    small = encode(Image.new("RGB", (100, 100)), "PNG")
    assert rejected(small, ImageOptions(max_pixels=9_999)).reason == "too_many_pixels"
    assert process_image(small, ImageOptions(max_pixels=65_536)).width == 256  # 256x256 output


def test_extreme_aspect_ratio_upscale_is_refused_before_allocating() -> None:
    line = encode(Image.new("L", (2, 5000), 0), "PNG")  # keep_ratio: 256x640000 = 164 Mpx
    start = time.perf_counter()
    assert rejected(line).reason == "too_many_pixels"
    assert time.perf_counter() - start < 0.1
    # the same line fits when only the larger side is bounded
    out = process_image(line, ImageOptions(resize_mode="keep_ratio_largest"))
    assert (out.width, out.height) == (1, 256)
    # and a JPEG cannot be taller than 65535 even when the pixel budget allows it
    tall = encode(Image.new("L", (4, 1100), 0), "PNG")  # keep_ratio: 256x70400 = 18 Mpx
    err = rejected(tall)
    assert err.reason == "too_many_pixels" and "jpeg can encode" in err.detail


def test_rejection_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageRejected("decode_error", "cut short")))
    assert (err.reason, err.detail, str(err)) == ("decode_error", "cut short", "decode_error: cut short")


# ---------------------------------------------------------------------------------- resize modes


@pytest.mark.parametrize(
    ("mode", "only_if_bigger", "src", "expected"),
    [
        ("keep_ratio", False, (400, 300), (133, 100)),
        ("keep_ratio_largest", False, (400, 300), (100, 75)),
        ("center_crop", False, (400, 300), (100, 100)),
        ("border", False, (400, 300), (100, 100)),
        ("no", False, (400, 300), (400, 300)),
        # upscale
        ("keep_ratio", False, (40, 30), (133, 100)),
        ("keep_ratio_largest", False, (40, 30), (100, 75)),
        ("center_crop", False, (40, 30), (100, 100)),
        ("border", False, (40, 30), (100, 100)),
        # only if bigger: small images untouched (no crop, no pad), as img2dataset
        ("keep_ratio", True, (40, 30), (40, 30)),
        ("keep_ratio_largest", True, (40, 30), (40, 30)),
        ("center_crop", True, (40, 30), (40, 30)),
        ("border", True, (40, 30), (40, 30)),
        ("no", True, (40, 30), (40, 30)),
        # only if bigger, decided on the side the mode resizes by
        ("keep_ratio", True, (150, 80), (150, 80)),
        ("keep_ratio_largest", True, (150, 80), (100, 53)),
        ("center_crop", True, (150, 80), (150, 80)),
        ("border", True, (150, 80), (100, 100)),
        ("keep_ratio", True, (400, 300), (133, 100)),
        # portrait
        ("keep_ratio", False, (300, 400), (100, 133)),
        ("center_crop", False, (300, 400), (100, 100)),
    ],
)
def test_resize_mode_dimensions(mode, only_if_bigger, src, expected) -> None:
    data = encode(Image.fromarray(photo_like(*src)), "PNG")
    options = ImageOptions(image_size=100, resize_mode=mode, resize_only_if_bigger=only_if_bigger)
    out = process_image(data, options)
    assert (out.width, out.height) == expected
    assert (out.original_width, out.original_height) == src
    assert decode_rgb(out).shape[:2] == (expected[1], expected[0])


@pytest.mark.parametrize("src", [(1024, 768), (1000, 700), (640, 480), (400, 300), (300, 290)])
def test_downscale_matches_plain_inter_area(src) -> None:
    # ratios >= 2 are one INTER_AREA; under 2 the fast path must stay within a grey level of it
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (src[1] // 8, src[0] // 8, 3), dtype=np.uint8)
    arr = cv2.resize(coarse, src, interpolation=cv2.INTER_CUBIC)  # smooth, photo-like content
    options = ImageOptions(image_size=200, encode_format="png")
    out = process_image(encode(Image.fromarray(arr), "PNG"), options)
    reference = cv2.resize(arr, (out.width, out.height), interpolation=cv2.INTER_AREA)
    diff = np.abs(decode_rgb(out).astype(int) - reference)
    if min(src) >= 400:
        assert not diff.any()
    else:
        assert diff.mean() < 1.0, diff.mean()


def test_border_pads_with_white_and_center_crop_keeps_the_centre() -> None:
    arr = np.zeros((100, 400, 3), np.uint8)
    arr[:, 150:250] = BLUE  # a centred blue square
    data = encode(Image.fromarray(arr), "PNG")
    border = ImageOptions(image_size=200, resize_mode="border", encode_format="png")
    bordered = decode_rgb(process_image(data, border))
    assert bordered.shape == (200, 200, 3)
    assert close(bordered[10, 100], WHITE, 0) and close(bordered[190, 100], WHITE, 0)  # pad rows
    assert close(bordered[100, 100], BLUE, 0)
    crop = ImageOptions(image_size=100, resize_mode="center_crop", encode_format="png")
    cropped = decode_rgb(process_image(data, crop))
    assert cropped.shape == (100, 100, 3) and close(cropped[50, 50], BLUE, 0)


# ---------------------------------------------------------------------------------------- encode


@pytest.mark.parametrize(
    ("encode_format", "pillow_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")]
)
def test_encode_formats_round_trip(encode_format: str, pillow_format: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    data = encode(Image.fromarray(photo_like(120, 90)), "JPEG", quality=95, exif=exif.tobytes())
    out = process_image(data, ImageOptions(resize_mode="no", encode_format=encode_format))
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(im.convert("RGB")).astype(int)
    assert out.format == encode_format
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.format == pillow_format and im.size == (120, 90)
        assert not im.getexif()  # metadata stripped
        got = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(got - expected).mean() < 3


def test_png_output_is_lossless() -> None:
    arr = photo_like(64, 48)
    out = process_image(encode(Image.fromarray(arr), "PNG"), NO_RESIZE)
    assert np.array_equal(decode_rgb(out), arr)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"resize_mode": "stretch"},
        {"encode_format": "gif"},
        {"encode_quality": 101},
        {"max_pixels": 0},
    ],
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        ImageOptions(**kwargs)
