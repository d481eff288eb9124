"""The run report: one self-contained HTML page per run (`dataengine report RUN` → `RUN/report.html`).

`facts` reads what to show from the run directory, `svg` draws the charts, `page` renders the page.
"""

from dataengine.analysis.report.page import REPORT_FILE, write_report

__all__ = ["REPORT_FILE", "write_report"]
