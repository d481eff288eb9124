"""Scenes of coloured shapes and their true captions.

A scene is the ground truth behind one synthetic web image: which shapes, what colour, how big, where.
Because every image is drawn from a scene, captions, counts, colours and positions are known exactly,
so filters can be scored for precision/recall and a trained model can be asked questions with answers.
Coordinates are normalised to [0, 1] so a scene is independent of the pixel size it is rendered at.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

#: shape kinds; every plural is kind + "s"
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")

#: object colours, chosen far apart in RGB so a colour question has one answer
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (245, 215, 30),
    "orange": (255, 127, 14),
    "purple": (128, 50, 170),
    "pink": (247, 120, 190),
    "cyan": (23, 200, 215),
}

#: backgrounds: greys and muted tones, none close to an object colour
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 238),
    "light grey": (200, 200, 200),
    "dark grey": (70, 70, 72),
    "black": (22, 22, 24),
    "beige": (225, 210, 180),
    "brown": (110, 80, 55),
}

#: size word -> range of the shape's side as a fraction of the image's shorter side
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.12, 0.17),
    "medium": (0.22, 0.29),
    "large": (0.36, 0.44),
}

_COLS = ("left", "center", "right")
_ROWS = ("top", "middle", "bottom")
#: position words, one per cell of a 3x3 grid
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

_NUMBERS = {2: "two", 3: "three", 4: "four"}
_MAX_OBJECTS = 4
_MAX_OVERLAP = 0.15  # intersection / smaller box area allowed between two objects
_PLACE_TRIES = 25

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, and where, both as words and as a normalised box [x1, y1, x2, y2]."""

    kind: str
    colour: str
    size: str
    position: str
    box: Box

    def as_dict(self) -> dict[str, object]:
        """Row form used by the truth table."""
        return {
            "kind": self.kind,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "box": list(self.box),
        }


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order on a background; `texture` in [0, 1] scales the background gradient."""

    objects: tuple[SceneObject, ...]
    background: str
    texture: float = 0.0


def position_word(cx: float, cy: float) -> str:
    """The 3x3 grid cell of a normalised point, as words ("top left", "center", "bottom")."""
    col = _COLS[min(2, int(cx * 3))]
    row = _ROWS[min(2, int(cy * 3))]
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


def _overlap(a: Box, b: Box) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _place(rng: np.random.Generator, aspect: float, taken: list[Box]) -> tuple[str, Box] | None:
    """Pick a size and a free grid cell; None when nothing fits after a few tries."""
    for _ in range(_PLACE_TRIES):
        size = str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size]
        side = float(rng.uniform(lo, hi))
        # side is relative to the shorter image side; convert to per-axis half extents
        hx = side * min(1.0, 1.0 / aspect) / 2
        hy = side * min(1.0, aspect) / 2
        cell = int(rng.integers(0, 9))
        col, row = cell % 3, cell // 3
        cx = (col + float(rng.uniform(0.3, 0.7))) / 3
        cy = (row + float(rng.uniform(0.3, 0.7))) / 3
        cx = min(max(cx, hx + 0.01), 0.99 - hx)
        cy = min(max(cy, hy + 0.01), 0.99 - hy)
        box = (cx - hx, cy - hy, cx + hx, cy + hy)
        if all(_overlap(box, t) <= _MAX_OVERLAP for t in taken):
            return size, box
    return None


def generate_scene(rng: np.random.Generator, aspect: float = 1.0) -> Scene:
    """Draw a scene of 1-4 shapes for an image of width/height `aspect`.

    Repeated kind+colour pairs are made likely on purpose, so captions contain counts ("three red stars").

    Examples:
        >>> scene = generate_scene(np.random.default_rng(0), aspect=4 / 3)
        >>> 1 <= len(scene.objects) <= 4
        True
    """
    n = int(rng.integers(1, _MAX_OBJECTS + 1))
    kinds, colours = list(KINDS), list(COLOURS)
    objects: list[SceneObject] = []
    for _ in range(n):
        if objects and rng.random() < 0.35:
            prev = objects[int(rng.integers(0, len(objects)))]
            kind, colour = prev.kind, prev.colour
        else:
            kind, colour = str(rng.choice(kinds)), str(rng.choice(colours))
        placed = _place(rng, aspect, [o.box for o in objects])
        if placed is None:
            continue
        size, box = placed
        box = tuple(round(v, 4) for v in box)  # type: ignore[assignment]
        pos = position_word((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        objects.append(SceneObject(kind, colour, size, pos, box))
    background = str(rng.choice(list(BACKGROUNDS)))
    texture = float(rng.uniform(0.0, 1.0)) if rng.random() < 0.6 else 0.0
    return Scene(tuple(objects), background, texture)


def _reposition(obj: SceneObject, box: Box) -> SceneObject:
    box = tuple(round(min(max(v, 0.0), 1.0), 4) for v in box)  # type: ignore[assignment]
    pos = position_word((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return replace(obj, box=box, position=pos)


def flip_scene(scene: Scene) -> Scene:
    """The scene mirrored left-right, as for a horizontally flipped image."""
    objs = tuple(_reposition(o, (1 - o.box[2], o.box[1], 1 - o.box[0], o.box[3])) for o in scene.objects)
    return replace(scene, objects=objs)


def crop_scene(scene: Scene, crop: Box, min_visible: float = 0.5) -> Scene:
    """The scene seen through a normalised crop window; objects mostly cut away are dropped."""
    x1, y1, x2, y2 = crop
    w, h = x2 - x1, y2 - y1
    objs = []
    for o in scene.objects:
        bx1, by1 = max(o.box[0], x1), max(o.box[1], y1)
        bx2, by2 = min(o.box[2], x2), min(o.box[3], y2)
        area = (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])
        if bx2 <= bx1 or by2 <= by1 or (bx2 - bx1) * (by2 - by1) < min_visible * area:
            continue
        objs.append(_reposition(o, ((bx1 - x1) / w, (by1 - y1) / h, (bx2 - x1) / w, (by2 - y1) / h)))
    return replace(scene, objects=tuple(objs))


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _groups(scene: Scene) -> list[tuple[str, str, list[SceneObject]]]:
    """Objects grouped by (kind, colour), in order of first appearance."""
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault((o.kind, o.colour), []).append(o)
    return [(k, c, objs) for (k, c), objs in groups.items()]


def _count_list(scene: Scene) -> str:
    parts = []
    for kind, colour, objs in _groups(scene):
        if len(objs) == 1:
            parts.append(_with_article(f"{colour} {kind}"))
        else:
            parts.append(f"{_NUMBERS[len(objs)]} {colour} {kind}s")
    return _join(parts)


def _detail_list(scene: Scene) -> str:
    return _join(
        [_with_article(f"{o.size} {o.colour} {o.kind}") + " " + _position_phrase(o.position) for o in scene.objects]
    )


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A true caption for `scene`, from one of a few templates picked by `rng`.

    Same kind and colour are merged into a count; sizes and positions are only named when each shape
    appears once and there are at most two, so a caption never has to name which of two red stars is big.

    Examples:
        >>> obj = SceneObject("star", "green", "large", "left", (0.05, 0.3, 0.3, 0.7))
        >>> caption_scene(Scene((obj,), "white"), np.random.default_rng(1))  # doctest: +SKIP
        'a large green star on the left'
    """
    if not scene.objects:
        return f"a plain {scene.background} background"
    counts = _count_list(scene)
    templates = [counts, f"a photo of {counts}", f"{counts} on a {scene.background} background"]
    if len(scene.objects) <= 2 and all(len(objs) == 1 for _, _, objs in _groups(scene)):
        templates += [_detail_list(scene)] * 3
    return templates[int(rng.integers(0, len(templates)))]
