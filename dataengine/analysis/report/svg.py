"""Inline SVG charts for the run report: a stacked histogram with a threshold line, and line charts.

Hand-written because the report must be one self-contained file with no script: a plotting library
would mean either megabytes of JavaScript inlined (Vega, Plotly) or a heavy dependency for three
small charts (matplotlib). Every text that reaches the SVG goes through `escape`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 60, 14, 14, 40
PALETTE = ("#2f855a", "#c53030", "#a0aec0", "#2b6cb0", "#d69e2e", "#805ad5")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float, log_scale: bool = False) -> str:
    """Short tick text: 0.003, 2.5, 10k, 1.2M (sci notation only below 1e-4)."""
    if log_scale:
        value = 10 ** value
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e3:
        return f"{value / 1e3:.3g}k"
    if value != 0 and magnitude < 1e-4:
        return f"{value:.0e}"
    return f"{value:.3g}"


class _Frame:
    """A plot area with linear x/y scales and the axes drawn."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.parts: list[str] = []

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return LEFT + (value - self.x0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return HEIGHT - BOTTOM - (value - self.y0) / span * (HEIGHT - TOP - BOTTOM)

    def axes(self, x_label: str, y_label: str, log_x: bool = False) -> None:
        bottom, left = HEIGHT - BOTTOM, LEFT
        self.parts.append(f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" class="axis"/>')
        self.parts.append(f'<line x1="{left}" y1="{TOP}" x2="{left}" y2="{bottom}" class="axis"/>')
        x_ticks = nice_ticks(self.x0, self.x1)
        if log_x and self.x1 - self.x0 >= 1:  # whole powers of ten, not 3.16 and 31.6; at most ~8 of them
            first, last = math.ceil(self.x0), math.floor(self.x1)
            step = max(1, math.ceil((last - first + 1) / 8))
            x_ticks = [float(e) for e in range(first, last + 1, step)]
        for tick in x_ticks:
            x = self.x(tick)
            self.parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" class="axis"/>'
                              f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{escape(_label(tick, log_x))}</text>')
        for tick in nice_ticks(self.y0, self.y1, 4):
            y = self.y(tick)
            self.parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>'
                              f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_label(tick))}</text>')
        self.parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle" '
                          f'class="title">{escape(x_label)}</text>')
        self.parts.append(f'<text x="12" y="{(TOP + HEIGHT - BOTTOM) / 2:.0f}" text-anchor="middle" class="title" '
                          f'transform="rotate(-90 12 {(TOP + HEIGHT - BOTTOM) / 2:.0f})">{escape(y_label)}</text>')

    def svg(self, title: str, legend: Sequence[tuple[str, str]]) -> Markup:
        items = "".join(f'<span class="key"><i style="background:{color}"></i>{escape(name)}</span>'
                        for name, color in legend)
        body = "".join(self.parts)
        return Markup(f'<figure class="chart"><svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
                      f'role="img" aria-label="{escape(title)}">{body}</svg>'
                      f'<figcaption>{items}</figcaption></figure>')


def histogram(edges: Sequence[float], counts: dict[str, Sequence[int]], x_label: str, *, threshold: float | None = None,
              threshold_label: str = "", log_x: bool = False) -> Markup:
    """Bars stacked by outcome (in `counts` order) over shared bin `edges`; a dashed line at `threshold`."""
    names = list(counts)
    totals = [sum(counts[n][i] for n in names) for i in range(len(edges) - 1)]
    frame = _Frame((edges[0], edges[-1]), (0, max([1, *totals]) * 1.08))
    for i in range(len(edges) - 1):
        base = 0
        for k, name in enumerate(names):
            n = counts[name][i]
            if not n:
                continue
            x, w = frame.x(edges[i]), max(frame.x(edges[i + 1]) - frame.x(edges[i]) - 1, 1)
            y_top, y_bottom = frame.y(base + n), frame.y(base)
            frame.parts.append(f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{w:.1f}" height="{y_bottom - y_top:.1f}" '
                               f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(name)}: {n}</title></rect>')
            base += n
    frame.axes(x_label, "rows", log_x)
    if threshold is not None:
        x = frame.x(threshold)
        right_half = x > (LEFT + WIDTH - RIGHT) / 2  # the label goes where the chart has room for it
        frame.parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" class="threshold"/>'
                           f'<text x="{x - 4 if right_half else x + 4:.1f}" y="{TOP + 10}" class="threshold-label" '
                           f'text-anchor="{"end" if right_half else "start"}">{escape(threshold_label)}</text>')
    return frame.svg(x_label, [(n, PALETTE[k % len(PALETTE)]) for k, n in enumerate(names)])


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], x_label: str, y_label: str) -> Markup:
    """One polyline per series (x values, y values) on shared axes."""
    xs = [x for values, _ in series.values() for x in values]
    ys = [y for _, values in series.values() for y in values if math.isfinite(y)]
    if not xs or not ys:
        return Markup("")
    low, high = min(ys), max(ys)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 0.5  # a constant series (a fixed lr) sits mid-chart
    frame = _Frame((min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1), (max(0.0, low - pad), high + pad))
    frame.axes(x_label, y_label)
    for k, (name, (x_values, y_values)) in enumerate(series.items()):
        color = PALETTE[(k + 3) % len(PALETTE)]
        points = [(frame.x(x), frame.y(y)) for x, y in zip(x_values, y_values) if math.isfinite(y)]
        frame.parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}" fill="none" '
                           f'stroke="{color}" stroke-width="1.6"><title>{escape(name)}</title></polyline>')
        if len(points) <= 3:  # a line of one point is invisible: mark the points
            frame.parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in points)
    return frame.svg(y_label, [(n, PALETTE[(k + 3) % len(PALETTE)]) for k, n in enumerate(series)])
