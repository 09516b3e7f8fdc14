"""Accuracy sweeps: measured error per dtype, chunk sizes, length, value family, mask, softcap and window.

``sweep`` runs a grid of cells (``plan``) and returns a report; ``write`` puts it in a directory:
``report.json`` (schema ``SCHEMA_VERSION``, every raw figure, no timings), ``timings.json``,
``report.md`` (for a PR comment), three PNG plots and ``index.html``. ``gate`` compares a report
with a committed baseline. One idea per module: ``plan`` (settings, cells, ids, seeds),
``figures`` (a cell's figures, from the fuzz checks' own comparison), ``runner`` (resume, workers,
Dask), ``gate``, ``tables`` (markdown and HTML), ``plots``.

Recipe (CI)::

    attnverify report --target chunked-torch --out reports/chunked-torch          # on main, commit it
    attnverify report --target chunked-torch --out /tmp/pr \\
        --baseline reports/chunked-torch/report.json --max-regression 2           # in the PR job
"""

from __future__ import annotations

from pathlib import Path

from verify.accuracy.figures import inputs_digest, ulp_distance
from verify.accuracy.gate import DEFAULT_MAX_REGRESSION, FLOOR, gate, regression_lines, verdict
from verify.accuracy.plan import (
    SCHEMA_VERSION,
    Settings,
    cell_id,
    cell_key,
    data_seed,
    parse_softcap,
    parse_window,
    plan,
    softcap_label,
    window_label,
)
from verify.accuracy.plots import plot
from verify.accuracy.runner import progress_printer, report_json, sweep, timings_json, write_text
from verify.accuracy.tables import PLOTS, tables, to_html, to_markdown

__all__ = [
    "DEFAULT_MAX_REGRESSION",
    "FLOOR",
    "PLOTS",
    "SCHEMA_VERSION",
    "Settings",
    "cell_id",
    "cell_key",
    "data_seed",
    "gate",
    "inputs_digest",
    "parse_softcap",
    "parse_window",
    "plan",
    "progress_printer",
    "regression_lines",
    "softcap_label",
    "sweep",
    "tables",
    "to_html",
    "to_markdown",
    "ulp_distance",
    "verdict",
    "window_label",
    "write",
]


def write(report: dict, out: Path, image_base: str | None = None, timings: bool = True) -> None:
    """report.json, report.md, the PNGs, index.html and (``timings``) timings.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", report_json(report))
    if timings:
        write_text(out / "timings.json", timings_json(report))
    (out / "report.md").write_text(to_markdown(report, image_base))
    plot(report, out)
    (out / "index.html").write_text(to_html(report))
