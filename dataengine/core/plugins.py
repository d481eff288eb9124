"""Extension points: model sources, evaluation benchmarks, report sections and CLI commands.

The engine names what it can be extended with; packages above it (the test bed in `dataengine.testbed`,
or a team's own package) say what they add under Python entry points (`[project.entry-points]` in their
pyproject), so the engine finds them without importing them. `register` adds one at run time (tests).

Groups and what an entry point names:
- `dataengine.model_sources`: `prefix -> resolve(reference) -> local path` for `prefix:name` references;
- `dataengine.benchmarks`: `name -> run(model, processor, n_images) -> dict` for `eval.benchmark: name`;
- `dataengine.report_sections`: `name -> ReportSection` drawn at the end of a run's report;
- `dataengine.commands`: `name -> add(subparsers)` adding a subcommand to the `dataengine` CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_SOURCES = "dataengine.model_sources"
BENCHMARKS = "dataengine.benchmarks"
REPORT_SECTIONS = "dataengine.report_sections"
COMMANDS = "dataengine.commands"
GROUPS = (MODEL_SOURCES, BENCHMARKS, REPORT_SECTIONS, COMMANDS)

_added: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
_loaded: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class ReportSection:
    """A section of the run report: `facts(run_dir)` returns what to show (None: nothing for this run),
    `template` is a Jinja template (autoescaped, the report's filters) that sees it as `section`; `nav`
    is its link in the page's navigation bar."""

    title: str
    nav: str
    facts: Callable[[Path], dict[str, Any] | None]
    template: str


def register(group: str, name: str, obj: Any) -> None:
    """Add `obj` under `name` in `group` for this process (an installed entry point of the name loses)."""
    if group not in _added:
        raise ValueError(f"unknown plugin group {group!r} (groups: {', '.join(GROUPS)})")
    _added[group][name] = obj


def registered(group: str) -> dict[str, Any]:
    """Every plugin of `group`: installed entry points (loaded once), then `register`ed ones."""
    if group not in _loaded:
        found: dict[str, Any] = {}
        for ep in entry_points(group=group):
            try:
                found[ep.name] = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not take the engine down
                log.warning("plugin %s:%s (%s) failed to load: %s", group, ep.name, ep.value, e)
        _loaded[group] = found
    return _loaded[group] | _added[group]
