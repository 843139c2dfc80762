"""Reports over run folders: accuracy tables with deltas and published numbers, SVG plots, and an
example gallery, as one self-contained HTML file plus a short Markdown summary.

    from capvqa.report import build_report, write_run_reports
    build_report(["runs/a", "runs/b"], html_path="report.html", markdown_path="report.md")
    write_run_reports("runs/a")  # -> (runs/a/report.html, runs/a/report.md)

Modules, by idea: :mod:`~capvqa.report.runs` (loading run folders), :mod:`~capvqa.report.summary`
(pure tables and deltas), :mod:`~capvqa.report.published` (the papers' numbers and when they apply),
:mod:`~capvqa.report.gallery` (which examples to show), :mod:`~capvqa.report.svg` and
:mod:`~capvqa.report.plots` (charts), :mod:`~capvqa.report.thumbnails` (images and relevance heatmaps),
:mod:`~capvqa.report.stage_views`, :mod:`~capvqa.report.html_report`, :mod:`~capvqa.report.markdown_report`
(rendering) and :mod:`~capvqa.report.build` (putting it together). Importing loads no model.
"""

from capvqa.report.build import build_report, collect_report, write_run_reports

__all__ = ["build_report", "collect_report", "write_run_reports"]
