"""Cropped copies: found by colour histogram, confirmed by aligning one image inside the other.

A crop keeps most of an image's pixels but moves every one of them in the frame, so a global code
(pHash, a colour layout) changes wholesale, while its colour histogram barely moves. The candidates are
each image's nearest neighbours by histogram (L1 within `radius`); each candidate pair is then
verified by geometry: one image, scaled to `min_side`-100% of the other's width (mirrored or not), is
slid over the other (template matching), and at the best position the two must agree pixel for pixel
(median colour difference), in what they show (the foreground masks, pixels far from each image's
border colour, overlap by IoU) and in the colours of what they show. The foreground test matters on
flat images: a one-object scene fits inside a busier one of the same background colour almost
perfectly if the background is compared too.

The images are 96-px thumbnails (long side, PNG), stored with each row; each of a pair's four placements
(either image inside the other, mirrored or not) is searched on 32-px versions, and the cheapest is
searched again at 96 px near where it landed, and judged there. At 64 px a busy scene's crop and two
one-object scenes that differ in shape (a circle and a square) overlapped on every measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

THUMB_SIDE = 96
_COARSE_SIDE = 32
_COARSE_STEP = 2  # px between the widths tried at _COARSE_SIDE; the full-size search covers those between
_HIST_LEVELS = 4  # per channel: 64 bins
_FOREGROUND = 40.0  # RGB distance from the border colour at which a pixel is foreground


@dataclass(frozen=True)
class CropRule:
    """When a pair aligned at its best position is a copy; defaults measured on the synthetic web (bench/
    copy_detection.py, n = 1,000 and 2,000, every candidate pair at the op's defaults): copies (crops
    86-93%, resizes, mirrors, JPEG q20-90) align with median difference <= 5, foreground IoU >= 0.911 and
    foreground gap <= 7.0; distinct pairs within the first two bounds have foreground gaps >= 9.2."""

    min_side: float = 0.8
    max_coarse_cost: float = 1000.0  # 32-px placements costlier than this are not refined (copies: <= 344; distinct: median 2,100)
    max_median: float = 5.5
    min_iou: float = 0.88
    max_foreground_gap: float = 8.5


def thumbnail(rgb: np.ndarray) -> bytes:
    """The image at THUMB_SIDE px on its long side, as PNG (lossless: the verification compares pixels)."""
    h, w = rgb.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    size = (max(4, round(w * scale)), max(4, round(h * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(small, dtype=np.uint8), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a {size[0]}x{size[1]} thumbnail as PNG")
    return png.tobytes()


def read_thumbnail(data: bytes) -> np.ndarray:
    """The float32 RGB pixels of a `thumbnail`."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a dedup thumbnail (PNG bytes expected)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)


def histogram(thumb: np.ndarray) -> np.ndarray:
    """Normalised RGB histogram, `_HIST_LEVELS` levels per channel."""
    q = np.minimum(thumb.astype(np.int32) * _HIST_LEVELS // 256, _HIST_LEVELS - 1)
    idx = (q[..., 0] * _HIST_LEVELS + q[..., 1]) * _HIST_LEVELS + q[..., 2]
    counts = np.bincount(idx.ravel(), minlength=_HIST_LEVELS**3).astype(np.float32)
    return counts / counts.sum()


class _View:
    """One image prepared for alignment: pixels (uint8: a view is held for every row of a candidate pair),
    border colour and foreground mask, at one size."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = np.ascontiguousarray(np.clip(np.rint(pixels), 0, 255), dtype=np.uint8)
        p = self.pixels
        self.border = np.median(np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]]), axis=0).astype(np.float32)
        self.mask = _foreground(p, self.border)

    def mirrored(self) -> "_View":
        return _View(self.pixels[:, ::-1])

    def resized(self, side: int) -> "_View":
        h, w = self.pixels.shape[:2]
        scale = side / max(h, w)
        return _View(cv2.resize(self.pixels, (max(4, round(w * scale)), max(4, round(h * scale))),
                                interpolation=cv2.INTER_AREA))


def _foreground(pixels: np.ndarray, border: np.ndarray) -> np.ndarray:
    return np.sqrt(((pixels.astype(np.float32) - border) ** 2).sum(axis=-1)) > _FOREGROUND


@dataclass(frozen=True)
class Placement:
    """Where `small`, scaled to `width` px wide, fits best inside `big`: its top-left corner `at` (in
    `big`'s pixels) and the mean squared difference there (`cost`)."""

    cost: float
    width: int
    at: tuple[int, int]
    template: np.ndarray


@dataclass(frozen=True)
class Agreement:
    """How well two placed images agree: median colour difference, foreground IoU, and the colour
    difference over the foreground (see `agreement`)."""

    median: float
    iou: float
    foreground_gap: float


def place(big: _View, small: _View, widths: range, near: tuple[int, int] | None = None,
          margin: int = 3) -> Placement | None:
    """The best placement of `small` inside `big` (least squared difference over `widths`, anywhere, or
    within `margin` px of `near`)."""
    height, width = big.pixels.shape[:2]
    best = None
    for w in widths:
        h = round(w * small.pixels.shape[0] / small.pixels.shape[1])
        if not (4 <= h <= height and 4 <= w <= width):
            continue
        template = cv2.resize(small.pixels, (w, h), interpolation=cv2.INTER_AREA).reshape(h, w, -1)
        x0 = y0 = 0
        region = big.pixels
        if near is not None:
            x0, y0 = max(0, min(near[0] - margin, width - w)), max(0, min(near[1] - margin, height - h))
            region = big.pixels[y0:min(height, y0 + h + 2 * margin), x0:min(width, x0 + w + 2 * margin)]
        value, _, at, _ = cv2.minMaxLoc(cv2.matchTemplate(region, template, cv2.TM_SQDIFF))
        if best is None or value / (w * h) < best.cost:
            best = Placement(value / (w * h), w, (at[0] + x0, at[1] + y0), template)
    return best


def agreement(big: _View, small: _View, placed: Placement) -> Agreement:
    """Pixel, foreground and foreground-colour agreement of `small` placed inside `big`. The foreground
    colour gap is the 90th percentile over the foreground (either image's) less its one-pixel rim, where
    a crop's resampling blurs the edges: one recoloured object among several shows there, and a median
    would hide it."""
    (x, y), template = placed.at, placed.template
    h, w = template.shape[:2]
    diff = np.abs(big.pixels[y:y + h, x:x + w].astype(np.float32) - template).max(axis=-1)
    window = big.mask[y:y + h, x:x + w]
    shown = _foreground(template, small.border)
    union = window | shown
    count = int(union.sum())
    iou = float((window & shown).sum() / count) if count else 1.0
    inner = cv2.erode(union.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    inner = inner if inner.any() else union
    gap = float(np.percentile(diff[inner], 90)) if count else 0.0
    return Agreement(float(np.median(diff)), iou, gap)


def _widths(view: _View, min_side: float, step: int = 1) -> range:
    """Widths from `min_side` of `view`'s to all of it, `step` px apart, the full width included."""
    width = view.pixels.shape[1]
    return range(width, int(np.ceil(width * min_side)) - 1, -step)


def _passes(found: Agreement, rule: CropRule) -> bool:
    return found.median <= rule.max_median and found.iou >= rule.min_iou and found.foreground_gap <= rule.max_foreground_gap


class Prepared:
    """A thumbnail's views, made once per image rather than once per pair: full size and `_COARSE_SIDE`,
    each as is and mirrored."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.fine = _View(pixels)
        self.fine_mirror = self.fine.mirrored()
        self.coarse = self.fine.resized(_COARSE_SIDE)
        self.coarse_mirror = self.coarse.mirrored()


def is_copy(a: Prepared | np.ndarray, b: Prepared | np.ndarray, rule: CropRule = CropRule()) -> bool:
    """Whether one thumbnail is a crop (scaled, maybe mirrored) of the other, or the same image.

    Each of the four placements (a inside b, b inside a, each mirrored or not) is searched on 32-px
    versions; the cheapest is refined at full size near where it landed, and judged there."""
    first = a if isinstance(a, Prepared) else Prepared(a)
    second = b if isinstance(b, Prepared) else Prepared(b)
    placements = [((first.coarse, second.coarse), (first.fine, second.fine)),
                  ((second.coarse, first.coarse), (second.fine, first.fine)),
                  ((first.coarse, second.coarse_mirror), (first.fine, second.fine_mirror)),
                  ((second.coarse_mirror, first.coarse), (second.fine_mirror, first.fine))]
    found = [(rough, k) for k, ((big, small), _) in enumerate(placements)
             if (rough := place(big, small, _widths(big, rule.min_side, step=_COARSE_STEP))) is not None]
    if not found:
        return False
    rough, k = min(found, key=lambda f: (f[0].cost, f[1]))
    if rough.cost > rule.max_coarse_cost:
        return False
    (coarse_big, _), (big, small) = placements[k]
    ratio = big.pixels.shape[1] / coarse_big.pixels.shape[1]
    centre = round(rough.width * ratio)
    near = (round(rough.at[0] * ratio), round(rough.at[1] * ratio))
    spread = int(np.ceil(ratio * _COARSE_STEP / 2))  # the widths the coarse step skipped, either side
    refined = place(big, small, range(centre - spread, centre + spread + 1), near, margin=spread + 1)
    return refined is not None and _passes(agreement(big, small, refined), rule)


def _nearest(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Ids (queries x k, -1 where there are fewer) of each query histogram's `k` nearest `base` histograms,
    searched exactly by inner product of square roots (the Bhattacharyya coefficient, a matrix product for
    FAISS), not by L1, which has no fast exact search."""
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(np.sqrt(base), dtype=np.float32))
    return index.search(np.ascontiguousarray(np.sqrt(queries), dtype=np.float32), min(len(base), k))[1]


def candidate_pairs(hists: np.ndarray, radius: float, neighbours: int) -> np.ndarray:
    """Pairs (i < j) where j is among i's `neighbours` nearest histograms (or i among j's, `_nearest`) and
    the two are within `radius` in L1."""
    n = len(hists)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    ids = _nearest(hists, hists, neighbours + 1)
    rows, cols = np.repeat(np.arange(n), ids.shape[1]), ids.ravel()
    keep = (cols >= 0) & (cols != rows)
    rows, cols = rows[keep], cols[keep]
    near = np.abs(hists[rows] - hists[cols]).sum(axis=1) <= radius
    pairs = np.sort(np.stack([rows[near], cols[near]], axis=1), axis=1)
    return np.unique(pairs, axis=0).astype(np.int64) if len(pairs) else np.zeros((0, 2), dtype=np.int64)


def crops_of_references(thumbs: list[bytes | None], references: list[bytes], rule: CropRule = CropRule(),
                        radius: float = 0.2, neighbours: int = 8) -> dict[int, int]:
    """Row -> reference for rows of `thumbs` that are a crop of (or contain) one of `references` (all
    `thumbnail` bytes): each row's `neighbours` nearest references by histogram (one search for all rows)
    within `radius`, verified. Rows without a thumbnail (None) are skipped."""
    rows = [i for i, t in enumerate(thumbs) if t is not None]
    if not rows or not references:
        return {}
    ref_pixels = [read_thumbnail(t) for t in references]
    ref_hists = np.stack([histogram(p) for p in ref_pixels])
    row_hists = np.stack([histogram(read_thumbnail(thumbs[i])) for i in rows])  # type: ignore[arg-type]
    nearest = _nearest(row_hists, ref_hists, neighbours)
    found: dict[int, int] = {}
    ref_views: dict[int, Prepared] = {}
    for i, hist, ids in zip(rows, row_hists, nearest):
        near = [int(r) for r in ids if r >= 0 and np.abs(hist - ref_hists[r]).sum() <= radius]
        if not near:
            continue
        view = Prepared(read_thumbnail(thumbs[i]))  # type: ignore[arg-type]
        for r in near:
            if r not in ref_views:
                ref_views[r] = Prepared(ref_pixels[r])
            if is_copy(view, ref_views[r], rule):
                found[i] = r
                break
    return found


def crop_pairs(thumbs: list[bytes | None], rule: CropRule = CropRule(), radius: float = 0.2, neighbours: int = 8,
               known: np.ndarray | None = None) -> np.ndarray:
    """Pairs (i < j) of `thumbs` (`thumbnail` bytes; None: no image, never paired) where one is a crop of
    the other; pairs in `known` (already found by another descriptor) are not verified again and not returned.

    Memory: the histograms, then a row's views (about 50 KB) only from its first candidate pair to its
    last."""
    rows = np.array([i for i, t in enumerate(thumbs) if t is not None], dtype=np.int64)
    hists = np.stack([histogram(read_thumbnail(thumbs[i])) for i in rows]) if len(rows) else \
        np.zeros((0, _HIST_LEVELS**3), np.float32)
    candidates = rows[candidate_pairs(hists, radius, neighbours)]
    if known is not None and len(known) and len(candidates):
        seen = {(int(i), int(j)) for i, j in known}
        candidates = np.array([p for p in candidates.tolist() if tuple(p) not in seen], dtype=np.int64).reshape(-1, 2)
    last_use = {int(row): k for k, pair in enumerate(candidates.tolist()) for row in pair}
    views: dict[int, Prepared] = {}
    hits = []
    for k, (i, j) in enumerate(candidates.tolist()):
        for row in (i, j):
            if row not in views:
                views[row] = Prepared(read_thumbnail(thumbs[row]))  # type: ignore[arg-type]
        if is_copy(views[i], views[j], rule):
            hits.append((i, j))
        for row in (i, j):
            if last_use[row] == k:
                del views[row]
    return np.array(hits, dtype=np.int64).reshape(-1, 2)
