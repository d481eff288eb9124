"""Render a run's report facts into one self-contained HTML page (inline CSS, SVG, data-URI images).

No script and nothing fetched: the file can be mailed, attached to a ticket or opened offline.
Everything from the data (captions, URLs, reasons: web text, untrusted) is escaped by Jinja's
autoescape.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from dataengine.analysis.report import svg
from dataengine.analysis.report.facts import KEPT, REJECTED_HERE, REJECTED_LATER, gather
from dataengine.core.atomic import write_text_atomic
from dataengine.core.layout import REPORT_FILE

TEMPLATE = "report.html.j2"
BENCHMARK_METRICS = (("exact_match", "VQA exact match"), ("colour_accuracy", "colour"), ("count_accuracy", "count"),
                     ("position_accuracy", "position"), ("exists_accuracy", "exists"))


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["j2", "html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, digits=3: "–" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.{digits}g}")
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    return env


def _charts(facts: dict[str, Any]) -> dict[str, Any]:
    """The SVG of every score histogram and training curve."""
    scores = [svg.histogram(p["edges"], {k: p["counts"][k] for k in (KEPT, REJECTED_HERE, REJECTED_LATER)},
                            p["label"], threshold=p["threshold"], threshold_label=p["rule"], log_x=p["log_scale"])
              for p in facts["scores"]]
    curves = []
    for stage in facts["training"]:
        steps = [s["step"] for s in stage["curve"]]
        curves.append({"loss": svg.line_chart({"training loss": (steps, [s["loss"] for s in stage["curve"]])},
                                              "optimizer step", "loss"),
                       "lr": svg.line_chart({"learning rate": (steps, [s.get("lr", 0.0) for s in stage["curve"]])},
                                            "optimizer step", "learning rate")})
    return {"scores": scores, "curves": curves}


def _sections(env: Environment, facts: dict[str, Any]) -> list[dict[str, Any]]:
    """Each plugin section rendered with the page's environment (autoescape, filters)."""
    return [{"id": s["id"], "title": s["section"].title, "nav": s["section"].nav,
             "html": Markup(env.from_string(s["section"].template).render(section=s["facts"],
                                                                            benchmark_metrics=BENCHMARK_METRICS))}
            for s in facts["sections"]]


def render(facts: dict[str, Any]) -> str:
    """The page for already gathered facts."""
    generated = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    env = _environment()
    return env.get_template(TEMPLATE).render(facts=facts, charts=_charts(facts), generated=generated,
                                             benchmark_metrics=BENCHMARK_METRICS, sections=_sections(env, facts))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `RUN/report.html` (or `out`) for a run directory and return its path."""
    run_dir = Path(run_dir)
    path = Path(out) if out else run_dir / REPORT_FILE
    write_text_atomic(path, render(gather(run_dir)))
    return path
