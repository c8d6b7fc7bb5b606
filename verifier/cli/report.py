"""``verifier report``: its arguments and its command; the reading, the numbers and the page are
the library module ``verifier.report``."""
from __future__ import annotations

import sys

from ..report import NO_MATPLOTLIB, load, pyplot, render_html, summary
from .util import CliError, output_file, save_output

REPORT_DESCRIPTION = """\
Summarize result files in one self-contained HTML page (plots embedded as PNG) and print a short
summary. Each FILE is recognised by its content: a results CSV (verifier batch --out,
benchmarks/vnncomp.py --out: per-instance table, verdict counts, cactus plot over all the
results files), the JSON of verifier verify --json, the JSON of verifier bounds --json (with
--per-layer: per-node bound widths of IBP, CROWN and alpha-CROWN), or the report.json of
verifier train (certified accuracy vs eps, training curves) or verifier train --lipschitz
(vs L2 radius, training curves); a plot is drawn only of what the file holds. Plots need
matplotlib; without it the page has its tables only."""

REPORT_EPILOG = """\
examples:
  verifier batch tests/data/vnncomp_test/instances.csv --out results.csv
  verifier report results.csv --html report.html
  verifier bounds model.onnx --input x.npy --eps 0.03 --label 7 --json --per-layer > b.json
  verifier report b.json runs/digits/report.json --html report.html"""


def report_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="results .csv, or .json from verifier bounds/verify/train")
    p.add_argument("--html", metavar="OUT.html", type=output_file, help="write the HTML page there")
    p.add_argument("--title", default="verifier report", help="the page's title")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")


def cmd_report(a) -> int:
    if a.html is not None and not a.no_plots and pyplot() is None:
        print(f"note: {NO_MATPLOTLIB}; the page has its tables only", file=sys.stderr)
    sources = [load(p) for p in a.files]
    print(summary(sources))
    if a.html is not None:
        page = render_html(sources, a.title, not a.no_plots)

        def write(path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        _, problem = save_output(a.html, write, "the page")
        if problem is not None:
            raise CliError(problem)
        print(f"report: {a.html}")
    return 0
