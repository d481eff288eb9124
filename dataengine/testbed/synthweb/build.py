"""Build a synthetic web on disk: served files plus a truth table of what every URL really is.

Every item is a pure function of (seed, index): its scene, size, noise labels and pixels come from
per-item random streams, so item i is the same whether 10 or 10,000 items are built, and a build can
be checked, extended or compared across runs. Noise that refers to other items (a mismatched caption,
a near-duplicate's source) only looks at the other item's cheap first draws, never at its pixels.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import time
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.core import columns as C
from dataengine.testbed.synthweb.render import DUP_TRANSFORMS, decode_image, encode_jpeg, render_scene, transform_image
from dataengine.testbed.synthweb.scenes import Scene, caption_scene, crop_scene, flip_scene, generate_scene

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
RECIPE_FILE = "recipe.json"
TRUTH_FILE = "truth.parquet"
URLS_FILE = "urls.parquet"
FILES_DIR = "files"

#: url kind -> first path segment on the synthetic web
ROUTES: dict[str, str] = {
    "ok": "img",
    "redirect": "redirect",
    "flaky": "flaky",
    "http_404": "missing",
    "slow": "slow",
    "truncated": "truncated",
    "not_image": "notimage",
    "oversized": "oversized",
    "opt_out": "optout",
}
#: url kinds a correct downloader must reject, with the reason code it should give
EXPECTED_REASON: dict[str, str] = {
    "http_404": "http_404",
    "slow": "timeout",
    "truncated": "decode_error",
    "not_image": "not_image",
    "oversized": "too_large",
    "opt_out": "opt_out",
}
_CAPTION_NOISE = ("mismatched", "gibberish", "boilerplate")
_URL_NOISE = ("http_404", "slow", "truncated", "not_image", "oversized", "opt_out", "redirect", "flaky")
_DUP_SOURCE_KINDS = ("ok", "redirect", "flaky")  # a near-duplicate's source must itself be downloadable
_STORED_DIRS = ("img", "truncated", "notimage")  # the static subset; other routes are behaviour
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9))  # width : height of the web's images
_TRUNCATE_AT = (0.55, 0.65)
_PICK_TRIES = 20
_POOL_MIN_MEGAPIXELS = 40.0  # below this a process pool costs more to start than it saves

# truth table columns (synthweb only; the pipeline's own columns live in dataengine.core.columns)
ID = "id"
PATH = "path"
TRUE_CAPTION = "true_caption"
CAPTION_NOISE = "caption_noise"
IMAGE_NOISE = "image_noise"
DUPLICATE_OF = "duplicate_of"
DUP_TRANSFORM = "dup_transform"
URL_KIND = "url_kind"
BROKEN = "broken"
EXPECTED_REASON_COL = "expected_reason"
OBJECTS = "objects"
BACKGROUND = "background"

_OBJECT_TYPE = pa.struct(
    [
        ("kind", pa.string()),
        ("colour", pa.string()),
        ("size", pa.string()),
        ("position", pa.string()),
        ("box", pa.list_(pa.float32())),
    ]
)
TRUTH_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (PATH, pa.string()),
        (C.CAPTION, pa.string()),
        (TRUE_CAPTION, pa.string()),
        (CAPTION_NOISE, pa.string()),
        (IMAGE_NOISE, pa.string()),
        (DUPLICATE_OF, pa.string()),
        (DUP_TRANSFORM, pa.string()),
        (URL_KIND, pa.string()),
        (BROKEN, pa.bool_()),
        (EXPECTED_REASON_COL, pa.string()),
        (C.WIDTH, pa.int32()),
        (C.HEIGHT, pa.int32()),
        (OBJECTS, pa.list_(_OBJECT_TYPE)),
        (BACKGROUND, pa.string()),
    ]
)

_BOILERPLATE = (
    "IMG_{n4}.JPG",
    "DSC{n5}.jpg",
    "click here to download",
    "stock photo {n5}",
    "image",
    "untitled-{n3}.jpeg",
    "Photo by user{n4}",
    "download free hd wallpaper",
    "thumbnail",
    "screenshot {n4}",
)


@dataclass(frozen=True)
class NoiseMix:
    """Fractions of items given each kind of noise; caption, image and URL noise are drawn independently.

    Examples:
        >>> NoiseMix().mismatched
        0.08
        >>> NoiseMix.clean().http_404
        0.0
    """

    # caption noise (exclusive with each other)
    mismatched: float = 0.08
    gibberish: float = 0.04
    boilerplate: float = 0.04
    # image noise
    near_duplicate: float = 0.06
    # URL kinds (exclusive with each other); redirect and flaky are not broken
    http_404: float = 0.03
    slow: float = 0.01
    truncated: float = 0.02
    not_image: float = 0.02
    oversized: float = 0.01
    opt_out: float = 0.02
    redirect: float = 0.03
    flaky: float = 0.02

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"NoiseMix.{f.name}={v} is not a fraction in [0, 1]")
        for group in (_CAPTION_NOISE, _URL_NOISE):
            total = sum(getattr(self, k) for k in group)
            if total > 1.0 + 1e-9:
                raise ValueError(f"NoiseMix fractions {group} sum to {total:.3f} > 1")

    @classmethod
    def clean(cls) -> NoiseMix:
        """No noise at all: every URL works and every caption is true."""
        return cls(**{f.name: 0.0 for f in fields(cls)})


@dataclass(frozen=True)
class _Look:
    """How an image looks: a scene at a size, drawn with the texture stream of item `index`."""

    index: int
    scene: Scene
    width: int
    height: int
    quality: int


@dataclass(frozen=True)
class _Plan:
    """Everything needed to write one item, decided cheaply before any pixels are drawn."""

    seed: int
    index: int
    id: str
    look: _Look  # what the served image shows (the source's look for a near-duplicate)
    scene: Scene  # what the served image shows, after any near-duplicate transform
    width: int
    height: int
    url_kind: str
    caption: str
    true_caption: str
    caption_noise: str
    duplicate_of: int | None
    dup_transform: str | None
    dup_size: tuple[int, int] | None
    dup_crop: tuple[int, int, int, int] | None
    dup_quality: int | None
    truncate_at: float

    @property
    def path(self) -> str:
        return f"/{ROUTES[self.url_kind]}/{self.id}.jpg"


def item_id(index: int) -> str:
    """The id of item `index`: "sw-000042"."""
    return f"sw-{index:06d}"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # one stream per purpose, so e.g. changing how captions are drawn never moves the pixels
    return np.random.default_rng([seed, index, stream])


_LOOK, _NOISE, _TEXTURE, _CAPTION = range(4)


def _look(seed: int, index: int, sizes: tuple[int, ...], weights: np.ndarray) -> _Look:
    rng = _rng(seed, index, _LOOK)
    long_side = int(sizes[int(rng.choice(len(sizes), p=weights))])
    a, b = ASPECTS[int(rng.integers(0, len(ASPECTS)))]
    if a >= b:
        width, height = long_side, max(8, round(long_side * b / a))
    else:
        width, height = max(8, round(long_side * a / b)), long_side
    scene = generate_scene(rng, aspect=width / height)
    return _Look(index, scene, width, height, int(rng.integers(80, 96)))


def _true_caption(seed: int, index: int, scene: Scene) -> str:
    return caption_scene(scene, _rng(seed, index, _CAPTION))


def _pick(u: float, mix: NoiseMix, names: tuple[str, ...], default: str) -> str:
    acc = 0.0
    for name in names:
        acc += getattr(mix, name)
        if u < acc:
            return name
    return default


def _first_draws(seed: int, index: int, mix: NoiseMix) -> tuple[np.random.Generator, str, bool, str]:
    """(noise rng, caption noise, wants near-duplicate, url kind): the draws other items may look at."""
    rng = _rng(seed, index, _NOISE)
    caption_noise = _pick(float(rng.random()), mix, _CAPTION_NOISE, "none")
    wants_dup = bool(rng.random() < mix.near_duplicate)
    url_kind = _pick(float(rng.random()), mix, _URL_NOISE, "ok")
    return rng, caption_noise, wants_dup, url_kind


def gibberish_caption(rng: np.random.Generator) -> str:
    """Random lowercase words or random characters, as the synthetic web's gibberish captions are."""
    if rng.random() < 0.5:
        letters = string.ascii_lowercase
        words = ["".join(rng.choice(list(letters), size=int(rng.integers(2, 10)))) for _ in range(rng.integers(2, 8))]
        return " ".join(words)
    chars = string.ascii_letters + string.digits + "#$%&*+-_/.!?~"
    return "".join(rng.choice(list(chars), size=int(rng.integers(6, 30))))


def _boilerplate(rng: np.random.Generator) -> str:
    template = _BOILERPLATE[int(rng.integers(0, len(_BOILERPLATE)))]
    return template.format(
        n3=int(rng.integers(0, 1000)), n4=f"{int(rng.integers(0, 10000)):04d}", n5=f"{int(rng.integers(0, 100000)):05d}"
    )


def _plan(seed: int, index: int, sizes: tuple[int, ...], weights: np.ndarray, mix: NoiseMix) -> _Plan:
    rng, caption_noise, wants_dup, url_kind = _first_draws(seed, index, mix)
    look = _look(seed, index, sizes, weights)
    scene, width, height = look.scene, look.width, look.height
    dup_of = dup_transform = dup_size = dup_crop = dup_quality = None

    if wants_dup and index > 0:
        for _ in range(_PICK_TRIES):
            j = int(rng.integers(0, index))
            _, _, j_dup, j_kind = _first_draws(seed, j, mix)
            if not j_dup and j_kind in _DUP_SOURCE_KINDS:
                dup_of = j
                break
    if dup_of is not None:
        look = _look(seed, dup_of, sizes, weights)
        w, h = look.width, look.height
        dup_transform = str(DUP_TRANSFORMS[int(rng.integers(0, len(DUP_TRANSFORMS)))])
        dup_quality = int(rng.integers(20, 41)) if dup_transform == "reencode" else int(rng.integers(70, 91))
        scene, width, height = look.scene, w, h
        if dup_transform == "resize":
            s = float(rng.uniform(0.5, 0.8))
            width, height = max(8, round(w * s)), max(8, round(h * s))
            dup_size = (width, height)
        elif dup_transform == "crop":
            f = float(rng.uniform(0.86, 0.93))
            width, height = round(w * f), round(h * f)
            x0, y0 = int(rng.integers(0, w - width + 1)), int(rng.integers(0, h - height + 1))
            dup_crop = (x0, y0, x0 + width, y0 + height)
            scene = crop_scene(scene, (x0 / w, y0 / h, (x0 + width) / w, (y0 + height) / h))
        elif dup_transform == "flip":
            scene = flip_scene(scene)

    true_caption = _true_caption(seed, index, scene)
    caption = true_caption
    if caption_noise == "mismatched":
        caption_noise = "none"
        span = index if index >= 16 else 64
        for _ in range(_PICK_TRIES):
            j = int(rng.integers(0, span))
            if j == index or _first_draws(seed, j, mix)[2]:
                continue  # a would-be near-duplicate's true caption is not its own scene's
            other = _true_caption(seed, j, _look(seed, j, sizes, weights).scene)
            if other != true_caption:
                caption, caption_noise = other, "mismatched"
                break
    elif caption_noise == "gibberish":
        caption = gibberish_caption(rng)
    elif caption_noise == "boilerplate":
        caption = _boilerplate(rng)

    return _Plan(
        seed=seed,
        index=index,
        id=item_id(index),
        look=look,
        scene=scene,
        width=width,
        height=height,
        url_kind=url_kind,
        caption=caption,
        true_caption=true_caption,
        caption_noise=caption_noise,
        duplicate_of=dup_of,
        dup_transform=dup_transform,
        dup_size=dup_size,
        dup_crop=dup_crop,
        dup_quality=dup_quality,
        truncate_at=float(rng.uniform(*_TRUNCATE_AT)),
    )


def _not_image_body(plan: _Plan) -> bytes:
    """An HTML page, as a CDN error or a gallery page served where an image was expected."""
    rows = "\n".join(f'<li><a href="/gallery/{plan.id}/{k}">related image {k}</a></li>' for k in range(40))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Image unavailable</title></head>\n"
        f"<body><h1>This image is no longer available</h1><p>Item {plan.id} was moved.</p>\n"
        f"<ul>\n{rows}\n</ul></body></html>\n"
    ).encode()


def _image_bytes(plan: _Plan) -> bytes:
    look = plan.look
    img = render_scene(look.scene, look.width, look.height, _rng(plan.seed, look.index, _TEXTURE))
    data = encode_jpeg(img, look.quality)
    if plan.dup_transform is None:
        return data
    # a web copy is derived from the published JPEG, not from clean pixels
    copy = transform_image(decode_image(data), plan.dup_transform, size=plan.dup_size, crop=plan.dup_crop)
    assert plan.dup_quality is not None
    return encode_jpeg(copy, plan.dup_quality)


def _write_item(args: tuple[_Plan, str]) -> int:
    """Write one item's served file(s); returns bytes written."""
    plan, files_dir = args
    name = f"{plan.id}.jpg"
    if plan.url_kind in ("http_404", "oversized"):
        return 0  # nothing stored: a 404 has no body, an oversized body is generated by the server
    if plan.url_kind == "not_image":
        data = _not_image_body(plan)
    else:
        data = _image_bytes(plan)
        if plan.url_kind == "truncated":
            data = data[: int(len(data) * plan.truncate_at)]
    # routes that end in the real image share its static file; the server decides the behaviour
    sub = ROUTES[plan.url_kind] if plan.url_kind in ("truncated", "not_image") else "img"
    out = Path(files_dir) / sub / name
    out.write_bytes(data)
    return len(data)


def _truth_table(plans: list[_Plan]) -> pa.Table:
    rows: dict[str, list[object]] = {f.name: [] for f in TRUTH_SCHEMA}
    for p in plans:
        reason = EXPECTED_REASON.get(p.url_kind)
        rows[ID].append(p.id)
        rows[PATH].append(p.path)
        rows[C.CAPTION].append(p.caption)
        rows[TRUE_CAPTION].append(p.true_caption)
        rows[CAPTION_NOISE].append(p.caption_noise)
        rows[IMAGE_NOISE].append("none" if p.duplicate_of is None else "near_duplicate")
        rows[DUPLICATE_OF].append(None if p.duplicate_of is None else item_id(p.duplicate_of))
        rows[DUP_TRANSFORM].append(p.dup_transform)
        rows[URL_KIND].append(p.url_kind)
        rows[BROKEN].append(reason is not None)
        rows[EXPECTED_REASON_COL].append(reason)
        rows[C.WIDTH].append(p.width)
        rows[C.HEIGHT].append(p.height)
        rows[OBJECTS].append([o.as_dict() for o in p.scene.objects])
        rows[BACKGROUND].append(p.scene.background)
    return pa.table(rows, schema=TRUTH_SCHEMA)


def _recipe(n: int, seed: int, sizes: tuple[int, ...], weights: tuple[float, ...], noise: NoiseMix) -> dict:
    return {
        "version": RECIPE_VERSION,
        "n": n,
        "seed": seed,
        "sizes": list(sizes),
        "size_weights": list(weights),
        "noise": asdict(noise),
    }


def _is_built(out_dir: Path, recipe: dict) -> bool:
    try:
        stored = json.loads((out_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stored == recipe and (out_dir / TRUTH_FILE).is_file() and (out_dir / FILES_DIR).is_dir()


def build_synthweb(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    sizes: tuple[int, ...] = (640, 1024, 2048),
    size_weights: tuple[float, ...] = (0.5, 0.3, 0.2),
    noise: NoiseMix = NoiseMix(),
    workers: int | None = None,
) -> Path:
    """Write `n` items to `out_dir/files/` and their truth to `out_dir/truth.parquet`; cached by recipe.

    A build whose recipe (n, seed, sizes, weights, noise) matches `out_dir/recipe.json` is reused as is.
    The recipe is written last, so an interrupted build is redone rather than trusted.

    Args:
        out_dir: build directory; only `files/`, `truth.parquet`, `urls.parquet` and `recipe.json`
            in it are ever replaced.
        n: number of items.
        seed: master seed; item i depends only on (seed, i).
        sizes: long-side pixel sizes to draw from; the aspect ratio is drawn per item.
        size_weights: probabilities of `sizes`.
        noise: fractions of each kind of noise.
        workers: rendering processes; default up to 2 for large builds, in-process for small ones.

    Returns:
        `out_dir` as a Path.

    Examples:
        >>> root = build_synthweb("/tmp/sw", n=100, seed=0, sizes=(256,), size_weights=(1.0,))  # doctest: +SKIP
        >>> write_url_list(root, "http://127.0.0.1:8000")  # doctest: +SKIP
    """
    out = Path(out_dir)
    sizes, size_weights = tuple(int(s) for s in sizes), tuple(float(w) for w in size_weights)
    if len(sizes) != len(size_weights) or not sizes or min(sizes) < 8:
        raise ValueError(f"sizes {sizes} and size_weights {size_weights} must be equally long, sizes >= 8")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    recipe = _recipe(n, seed, sizes, size_weights, noise)
    if _is_built(out, recipe):
        log.info("synthweb at %s already built for this recipe; reusing it", out)
        return out

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).unlink(missing_ok=True)
    weights = np.asarray(size_weights, dtype=np.float64)
    weights = weights / weights.sum()
    plans = [_plan(seed, i, sizes, weights, noise) for i in range(n)]
    t_plan = time.perf_counter() - t0

    tmp = out / f"{FILES_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in _STORED_DIRS:
        (tmp / sub).mkdir(parents=True)
    tasks = [(p, str(tmp)) for p in plans]
    megapixels = n * float(np.dot(weights, np.square(sizes))) * 0.75 / 1e6
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if megapixels >= _POOL_MIN_MEGAPIXELS else 1
    if workers > 1:
        # spawn, not fork: callers may hold threads (a running server, Ray) that fork would copy mid-lock
        with get_context("spawn").Pool(workers) as pool:
            total = sum(pool.imap_unordered(_write_item, tasks, chunksize=8))
    else:
        total = sum(map(_write_item, tasks))

    shutil.rmtree(out / FILES_DIR, ignore_errors=True)
    tmp.rename(out / FILES_DIR)
    pq.write_table(_truth_table(plans), out / f"{TRUTH_FILE}.partial")
    os.replace(out / f"{TRUTH_FILE}.partial", out / TRUTH_FILE)
    (out / URLS_FILE).unlink(missing_ok=True)  # its captions came from the previous truth
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
    log.info(
        "built synthweb n=%d seed=%d at %s: %.1f MB in %.1fs (plan %.2fs, %d workers)",
        n, seed, out, total / 1e6, time.perf_counter() - t0, t_plan, workers,
    )  # fmt: skip
    return out


def boxes_json(objects: list[dict] | None) -> str:
    """A scene's objects as the input's `boxes` JSON (what an annotated dataset such as COCO provides)."""
    return json.dumps([{"label": o["kind"], "box": [round(float(v), 4) for v in o["box"]],
                        "attributes": {"colour": o["colour"], "size": o["size"]}} for o in objects or []])


def write_url_list(out_dir: str | os.PathLike[str], base_url: str) -> Path:
    """Write `out_dir/urls.parquet` (`url`, `caption` as served, `id`, `boxes`): the input a downloader gets.

    Examples:
        >>> write_url_list("/tmp/sw", "http://127.0.0.1:8000")  # doctest: +SKIP
        PosixPath('/tmp/sw/urls.parquet')
    """
    out = Path(out_dir)
    truth = pq.read_table(out / TRUTH_FILE, columns=[ID, PATH, C.CAPTION, OBJECTS])
    base = base_url.rstrip("/")
    urls = pa.array([base + p for p in truth.column(PATH).to_pylist()], pa.string())
    boxes = pa.array([boxes_json(objects) for objects in truth.column(OBJECTS).to_pylist()], pa.string())
    table = pa.table({C.URL: urls, C.CAPTION: truth.column(C.CAPTION), ID: truth.column(ID), C.BOXES: boxes})
    path = out / URLS_FILE
    pq.write_table(table, path)
    return path
