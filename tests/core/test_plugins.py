"""Extension points (`dataengine.core.plugins`): the test bed's entry points are found; a registered model
source is registered (its resolution: tests/models); an unknown benchmark is a spec error naming
the registered ones; a registered report section is drawn, with web text escaped."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError

from dataengine.analysis.report import write_report
from dataengine.core import plugins
from dataengine.train.config import EvalSpec


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_added", {group: {} for group in plugins.GROUPS})


def test_the_test_beds_entry_points_are_installed():
    assert "synthweb-demo" in plugins.registered(plugins.MODEL_SOURCES)
    assert "synthweb" in plugins.registered(plugins.BENCHMARKS)
    assert isinstance(plugins.registered(plugins.REPORT_SECTIONS)["demo"], plugins.ReportSection)
    assert {"demo", "demo-models", "synthweb"} <= set(plugins.registered(plugins.COMMANDS))


def test_an_unknown_benchmark_names_the_registered_ones():
    assert EvalSpec(benchmark="synthweb").benchmark == "synthweb"
    with pytest.raises(ValidationError, match="no benchmark 'mmmu' is registered.*synthweb"):
        EvalSpec(benchmark="mmmu")


def test_a_registered_report_section_is_drawn_escaped(clean_registry, synthweb_run, tmp_path):
    run = shutil.copytree(synthweb_run[1].run_dir, tmp_path / "run")
    plugins.register(plugins.REPORT_SECTIONS, "zz-notes", plugins.ReportSection(
        title="Team notes", nav="Notes", template="<p>{{ section.note }} ({{ section.count | num }})</p>",
        facts=lambda run_dir: {"note": "<b>checked</b>", "count": 12345} if (run_dir / "run.json").is_file() else None))
    html = write_report(run).read_text()
    assert '<section id="zz-notes">' in html and '<a href="#zz-notes">Notes</a>' in html
    assert "<p>&lt;b&gt;checked&lt;/b&gt; (12,345)</p>" in html
    assert 'id="demo"' not in html  # the demo's section: only for a run with the demo's files
    (run / "demo_scores.json").write_text(json.dumps([{"stage": "download", "truth": "broken URLs", "precision": 1.0,
                                                       "recall": 0.5, "true_positives": 7}]))
    html = write_report(run).read_text()
    assert '<section id="demo">' in html and "Against the synthetic web&#39;s ground truth" in html
    assert "<td>download</td><td>broken URLs</td>" in html
