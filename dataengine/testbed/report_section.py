"""The demo's section of the run report: each filter scored against the synthetic web's truth, and the
curated-vs-unfiltered training table (a `dataengine.core.plugins.REPORT_SECTIONS` entry point)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataengine.core.plugins import ReportSection
from dataengine.testbed.demo import CAPFILT_FILE, SCORES_FILE, TRAINING_FILE


def demo_checks(run_dir: Path) -> dict[str, Any] | None:
    """The demo's own files, when this run is a demo; None otherwise."""
    found = {key: json.loads((run_dir / name).read_text()) for key, name in
             (("scores", SCORES_FILE), ("capfilt", CAPFILT_FILE), ("training", TRAINING_FILE))
             if (run_dir / name).is_file()}
    return found or None


TEMPLATE = """\
  {% if section.get("scores") %}
  <table>
    <tr><th>stage</th><th>catches</th><th class="n">precision</th><th class="n">recall</th><th class="n">true positives</th></tr>
    {% for s in section.scores %}<tr><td>{{ s.stage }}</td><td>{{ s.truth }}</td><td class="n">{{ s.precision | num }}</td><td class="n">{{ s.recall | num }}</td><td class="n">{{ s.true_positives | num }}</td></tr>{% endfor %}
  </table>
  {% endif %}
  {% if section.get("training") %}
  <h3>Curated vs unfiltered training</h3>
  <table>
    <tr><th>model</th>{% for key, label in benchmark_metrics %}<th class="n">{{ label }}</th>{% endfor %}<th class="n">POPE F1</th><th class="n">caption ppl</th></tr>
    {% for name, b in section.training.models.items() %}
    <tr><td>{{ name }}</td>{% for key, label in benchmark_metrics %}<td class="n">{{ b.get(key) | num }}</td>{% endfor %}
        <td class="n">{{ (b.get("pope") or {}).get("f1") | num }}</td><td class="n">{{ b.get("caption_perplexity") | num }}</td></tr>
    {% endfor %}
  </table>
  {% set c = section.training.get("stage2_comparison") %}
  {% if c %}<p>Stage 2, VQA exact match over seeds: curated {{ c.curated.mean | num }} vs unfiltered {{ c.unfiltered.mean | num }},
  difference {{ c.difference | num }} &plusmn; {{ c.interval | num }} (95%, training variance and benchmark sampling):
  curated data {{ c.verdict }}.</p>{% endif %}
  {% endif %}
"""

SECTION = ReportSection(title="Against the synthetic web's ground truth", nav="Ground truth",
                        facts=demo_checks, template=TEMPLATE)
