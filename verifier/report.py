"""Reports of the files that the other commands write (the library behind ``verifier report``,
whose command line is ``verifier.cli.report``): one self-contained HTML page and a text summary.
Each input file is recognised by its content:

* a **results CSV** (``verifier batch --out``: ``onnx,vnnlib,status,time_s,method,reason``;
  ``benchmarks/vnncomp.py --out``: ``benchmark,onnx,vnnlib,status,expected,time_s,method``; any
  CSV whose header names ``status`` and ``time_s``): a per-instance table, the verdict counts
  (and wrong verdicts where an ``expected`` column says sat/unsat), and a cactus plot over all
  results files, one line each (the field's convention: instances solved, sat or unsat, on x;
  the time of the k-th fastest on a log y axis);
* the JSON of ``verifier verify --json``: a results table of one instance;
* the JSON of ``verifier bounds --json``: the bounds per sample; with ``--per-layer`` also the
  mean bound width of every node for IBP, CROWN and alpha-CROWN, in a table and a plot;
* the ``report.json`` of ``verifier train``: clean, PGD and certified accuracy, certified
  accuracy against eps (plot, when the run measured a grid) and the training curves (plot, from
  the file's history); of ``verifier train --lipschitz``: the certified Lipschitz constant per
  layer, certified accuracy against the L2 radius (plot) and the training curves (plot).

A plot is drawn only of what the file holds: no empty panels.

Plots are PNGs drawn by matplotlib and embedded in the page as base64 ``data:`` URLs, so the page
is one file. Without matplotlib the page keeps its tables and says why the plots are missing.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VerifierError

STATUSES = ("sat", "unsat", "unknown", "timeout", "error")
SOLVED = ("sat", "unsat")
PER_LAYER_METHODS = ("ibp", "crown", "alpha-crown")


class ReportInputError(VerifierError):
    """An input file of ``verifier report`` is missing, unreadable or of no known kind."""


@dataclass
class Source:
    """One input file, read: ``kind`` is "results", "bounds", "train" or "lipschitz"."""
    path: str
    kind: str
    data: object
    notes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return Path(self.path).name


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------

def read_results_csv(path) -> list[dict]:
    """Rows of a results CSV as dicts (every column kept as text, ``status`` lower-cased and
    checked, ``time_s`` a float >= 0). Errors name the file and line."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if r and "".join(r).strip()]
    if not rows:
        raise ReportInputError(f"{path}: empty file")
    head = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("status", "time_s") if c not in head]
    if missing:
        raise ReportInputError(
            f"{path}: not a results CSV: its header {','.join(rows[0])!r} lacks the column(s) "
            f"{', '.join(missing)} (the header that 'verifier batch --out' writes is "
            "onnx,vnnlib,status,time_s,method,reason)")
    out = []
    for i, r in enumerate(rows[1:], 2):
        if len(r) != len(head):
            raise ReportInputError(f"{path}:{i}: {len(r)} fields, the header has {len(head)}")
        d = {h: v.strip() for h, v in zip(head, r)}
        d["status"] = d["status"].lower()
        if d["status"] not in STATUSES:
            raise ReportInputError(f"{path}:{i}: unknown status {d['status']!r} (expected one of "
                                   f"{', '.join(STATUSES)})")
        try:
            t = float(d["time_s"])
        except ValueError:
            t = float("nan")
        if not (math.isfinite(t) and t >= 0):
            raise ReportInputError(f"{path}:{i}: time_s must be a number >= 0, got "
                                   f"{d['time_s']!r}")
        d["time_s"] = t
        out.append(d)
    return out


def load(path) -> Source:
    """Read one input file and tell its kind from its content (see the module doc)."""
    path = str(path)
    p = Path(path)
    if not p.is_file():
        raise ReportInputError(f"{path}: no such file")
    if p.suffix.lower() == ".csv":
        return Source(path, "results", read_results_csv(path))
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{path}: neither a results .csv nor valid JSON ({e})") from None
    if isinstance(d, dict) and "certified_vs_eps" in d and "certified_acc" in d:
        return Source(path, "train", d)
    if isinstance(d, dict) and "lipschitz" in d and "certified_acc" in d:
        return Source(path, "lipschitz", d)
    if isinstance(d, dict) and {"lower", "upper", "verified"} <= set(d):
        return Source(path, "bounds", d)
    if isinstance(d, dict) and {"status", "time_s"} <= set(d):
        if d["status"] not in STATUSES:
            raise ReportInputError(f"{path}: unknown status {d['status']!r}")
        row = {"status": d["status"], "time_s": float(d["time_s"]),
               "method": d.get("method") or "", "reason": d.get("reason", "")}
        return Source(path, "results", [row])
    raise ReportInputError(
        f"{path}: JSON of no known kind: expected the output of 'verifier bounds --json', "
        "'verifier verify --json', or the report.json of 'verifier train'")


# ------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------

def verdict_counts(rows) -> dict:
    """Instances per status (every status present, 0 when none), ``wrong`` (sat/unsat against
    a different sat/unsat in the ``expected`` column) and ``total``."""
    c = {s: 0 for s in STATUSES}
    wrong = 0
    for r in rows:
        c[r["status"]] += 1
        e = (r.get("expected") or "").lower()
        if e in SOLVED and r["status"] in SOLVED and e != r["status"]:
            wrong += 1
    c["wrong"] = wrong
    c["total"] = len(rows)
    return c


def short_names(paths) -> list[str]:
    """The file names of ``paths``, each with as many parent folders as it takes to tell it
    apart from the others (``a/results.csv``, ``b/results.csv``: two runs of one tool)."""
    parts = [Path(p).parts for p in paths]
    out = []
    for i, pi in enumerate(parts):
        k = 1
        while k < len(pi) and any(pj != pi and pj[-k:] == pi[-k:]
                                  for j, pj in enumerate(parts) if j != i):
            k += 1
        out.append("/".join(pi[-k:]))
    return out


def cactus_series(sources) -> list[tuple[str, list[float]]]:
    """(label, sorted times of the solved instances) per results file, and per benchmark when a
    file holds several benchmarks; labels are the file names (with parent folders where two
    files share a name). Point k of a series: k + 1 instances solved within t_k."""
    out = []
    results = [s for s in sources if s.kind == "results"]
    for s, name in zip(results, short_names([s.path for s in results])):
        groups: dict[str, list[dict]] = {}
        for r in s.data:
            groups.setdefault(r.get("benchmark", ""), []).append(r)
        for bench, rows in groups.items():
            label = name if len(groups) == 1 else f"{name}: {bench}"
            out.append((f"{label} ({sum(r['status'] in SOLVED for r in rows)}/{len(rows)})",
                        sorted(r["time_s"] for r in rows if r["status"] in SOLVED)))
    return out


def per_layer_widths(model, perturbation, spec=None, methods=PER_LAYER_METHODS) -> dict:
    """The mean width ``upper - lower`` (over the batch and the node's elements) of every node's
    bounds, for each method: ``{"nodes", "ops", "width": {method: [...]}, "time_s": {...}}``,
    nodes in graph order, then ``"C·f (spec)"`` when a spec is given. A width that is not finite
    is ``None`` (JSON has no infinity)."""
    nodes = [n for n in model.graph]
    out = {"nodes": [n.name for n in nodes], "ops": [n.op for n in nodes], "width": {},
           "time_s": {}}
    if spec is not None:
        out["nodes"].append("C·f (spec)")
        out["ops"].append("spec")

    def mean_width(lo, up):
        w = float((up - lo).double().mean())
        return w if math.isfinite(w) else None

    for m in methods:
        res = model.bounds(perturbation, method=m, spec=spec)
        ws = [mean_width(res.nodes[n.name].lower, res.nodes[n.name].upper)
              if n.name in res.nodes else None for n in nodes]
        if spec is not None:
            ws.append(mean_width(res.lower, res.upper))
        out["width"][m] = ws
        out["time_s"][m] = res.time_s
    return out


# ------------------------------------------------------------------------------------------
# plots (matplotlib, imported on use)
# ------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


NO_MATPLOTLIB = "plots need matplotlib, which is not installed (pip install matplotlib)"


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# one (marker, linestyle, markersize, linewidth) per line, in drawing order: each later line is
# thinner with smaller markers and drawn on top, so a line that coincides with an earlier one
# stays visible inside it (and the earlier one around it)
LINE_STYLES = [("o", "-", 9, 2.6), ("s", "--", 6.5, 1.9), ("^", ":", 4.5, 1.5),
               ("D", "-.", 3.5, 1.2), ("v", (0, (5, 1, 1, 1)), 3, 1.0),
               ("x", (0, (1, 2)), 3, 0.9)]


def _style(i: int) -> dict:
    marker, ls, ms, lw = LINE_STYLES[i % len(LINE_STYLES)]
    return {"marker": marker, "linestyle": ls, "markersize": ms, "linewidth": lw,
            "zorder": 2 + i, "color": f"C{i % 10}"}


def cactus_figure(series, plt):
    """The cactus plot of ``cactus_series``, the field's convention: point k of a line is
    (k, the k-th smallest solve time), instances solved on x and time per instance on a log y
    axis, one line per series, so a line further right and lower solves more, faster. Times of
    0 are drawn at the smallest time shown (log scale). -> the matplotlib Figure."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    pos = [t for _, times in series for t in times if t > 0]
    floor = min(pos) if pos else 1e-3
    for i, (label, times) in enumerate(series):
        ax.plot(list(range(1, len(times) + 1)), [max(t, floor) for t in times], label=label,
                **_style(i))
    ax.set_yscale("log")
    n_max = max((len(t) for _, t in series), default=0)
    ax.set_xlim(0, n_max + 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("instances solved (sat or unsat)")
    ax.set_ylabel("time per instance (s, log)")
    ax.set_title("cactus plot: k-th fastest solved instance")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_cactus(series, plt) -> bytes:
    return _png(cactus_figure(series, plt), plt)


# horizontal offset between the methods' lines of the per-node width plot, in nodes
WIDTH_OFFSET = 0.08


def layer_widths_figure(per_layer: dict, plt):
    """Mean bound width per node (log y), one line per method with its own marker, line style,
    size and a small horizontal offset, so that methods with equal widths (CROWN-IBP and IBP on
    every intermediate node, say) all stay visible. -> the matplotlib Figure."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(per_layer["nodes"])), 4))
    xs = list(range(len(per_layer["nodes"])))
    ms = list(per_layer["width"])
    for i, m in enumerate(ms):
        dx = (i - (len(ms) - 1) / 2) * WIDTH_OFFSET
        pts = [(x + dx, w) for x, w in zip(xs, per_layer["width"][m]) if w is not None and w > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **_style(i))
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(per_layer["nodes"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean bound width (upper - lower)")
    ax.set_title("bound width per node")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_layer_widths(per_layer: dict, plt) -> bytes:
    return _png(layer_widths_figure(per_layer, plt), plt)


def has_eps_grid(d: dict) -> bool:
    """Whether a training report measured certified accuracy at a grid of radii."""
    return bool((d.get("certified_vs_eps") or {}).get("eps"))


# per-epoch values of a training history drawn as curves: key -> label (``acc``: verifier train,
# ``train_acc``: verifier train --lipschitz; ``cert``: samples of the batch certified by the
# training bounds, absent in natural training)
CURVES = {"acc": "train clean accuracy", "train_acc": "train clean accuracy",
          "cert": "train certified (batch bounds)"}


def has_curves(history) -> bool:
    """Whether a training history holds a curve to draw (``CURVES``)."""
    return any(k in h for h in history or [] for k in CURVES)


def draw_certified_vs_eps(ax, d: dict) -> None:
    """Certified accuracy against eps (the grid), the final certified accuracies at eps (stars)
    and the clean accuracy (dashed) of a training report ``d``."""
    grid = d["certified_vs_eps"]
    for m, acc in grid.items():
        if m != "eps":
            ax.plot(grid["eps"], acc, marker="o", label=f"certified ({m})")
    for m, acc in d["certified_acc"].items():
        ax.plot([d["eps"]], [acc], marker="*", markersize=11, ls="none",
                label=f"certified ({m}) at eps {d['eps']:g}")
    ax.axhline(d["clean_acc"], color="grey", ls="--", label="clean accuracy")
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("certified accuracy against eps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def draw_training_curves(ax, history: list) -> None:
    """The history's accuracy curves (``CURVES``) per epoch, and the training eps on a second
    y axis when it was ever above 0."""
    ep = [h["epoch"] for h in history]
    seen = set()
    for key, label in CURVES.items():
        if label not in seen and any(key in h for h in history):
            seen.add(label)
            ax.plot(ep, [h.get(key, float("nan")) for h in history], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (mean over the epoch's batches)")
    ax.set_ylim(0, 1.02)
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    eps = [h.get("eps", 0.0) for h in history]
    if any(e > 0 for e in eps):
        twin = ax.twinx()
        twin.plot(ep, eps, color="grey", ls=":", label="training eps (end of epoch)")
        twin.set_ylabel("eps")
        twin.set_ylim(0, 1.05 * max(eps))
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="lower right")


def draw_accuracies(ax, d: dict) -> None:
    """Bars of the final clean, PGD and certified accuracies (what every report measured)."""
    names = ["clean", "PGD", *d["certified_acc"]]
    vals = [d["clean_acc"], d.get("pgd_acc", float("nan")), *d["certified_acc"].values()]
    ax.bar(range(len(names)), vals, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"accuracy at eps {d['eps']:g}")
    ax.grid(alpha=0.3, axis="y")


def train_figure(d: dict, history, plt):
    """The figure of a training run (``report.png``): one panel per thing the run measured,
    the certified accuracy against eps (with a grid) and the training curves (with a history);
    bars of the final accuracies when it measured neither. -> the matplotlib figure."""
    panels = []
    if has_eps_grid(d):
        panels.append(lambda ax: draw_certified_vs_eps(ax, d))
    if has_curves(history):
        panels.append(lambda ax: draw_training_curves(ax, history))
    if not panels:
        panels.append(lambda ax: draw_accuracies(ax, d))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax)
    return fig


def plot_train(d: dict, plt) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    draw_certified_vs_eps(ax, d)
    return _png(fig, plt)


def plot_train_curves(history: list, plt) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    draw_training_curves(ax, history)
    return _png(fig, plt)


def plot_lipschitz(d: dict, plt) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, name in (("certified_acc", "Lipschitz margin"), ("crown_certified_acc", "CROWN L2")):
        acc = d.get(key) or {}
        rs = sorted(acc, key=float)
        ax.plot([0.0, *map(float, rs)], [d["clean_acc"], *(acc[r] for r in rs)], marker="o",
                label=f"certified ({name})")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"certified accuracy against radius (L = {d['lipschitz']:.4g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, plt)


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.status-unsat td.status { background: #cfe8cf; }
tr.status-sat td.status { background: #f6d6a8; }
tr.status-unknown td.status, tr.status-timeout td.status { background: #e4e4e4; }
tr.status-error td.status, tr.wrong td { background: #f4b6b6; }
img.plot { display: block; margin: 0.8em 0; border: 1px solid #ddd; max-width: 100%; }
p.note { color: #555; font-style: italic; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt=".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _table(head, rows, cls="", row_classes=None, num_cols=()) -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes else ""
        cells = []
        for j, (h, v) in enumerate(zip(head, r)):
            c = "num" if j in num_cols else ("status" if h == "status" else "")
            cells.append(f'<td class="{c}">{_e(v)}</td>' if c else f"<td>{_e(v)}</td>")
        out.append(f"<tr{rc}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="note">({_e(alt)}: {NO_MATPLOTLIB})</p>'
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _results_html(s: Source) -> str:
    c = verdict_counts(s.data)
    keys = [*STATUSES, "total"] + (["wrong"] if any("expected" in r for r in s.data) else [])
    parts = ["<h3>Verdict counts</h3>",
             _table(keys, [[c[k] for k in keys]], "counts", num_cols=range(len(keys)))]
    cols = [k for k in ("benchmark", "onnx", "vnnlib", "status", "expected", "time_s", "method",
                        "reason") if any(k in r for r in s.data)]
    rows, classes = [], []
    for r in s.data:
        rows.append([f"{r[k]:.3f}" if k == "time_s" else r.get(k, "") for k in cols])
        e = (r.get("expected") or "").lower()
        wrong = e in SOLVED and r["status"] in SOLVED and e != r["status"]
        classes.append(f"status-{r['status']}" + (" wrong" if wrong else ""))
    parts += [f"<h3>Instances ({len(rows)})</h3>",
              _table(cols, rows, "instances", classes, num_cols=[cols.index("time_s")])]
    return "".join(parts)


def _bounds_html(s: Source, plt) -> str:
    d = s.data
    n = len(d["lower"])
    ver = d["verified"] or [None] * n
    by = d.get("proved_by") or [None] * n
    flat = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    word = lambda v, b: "-" if v is None else (("yes" + (f" ({b})" if b else "")) if v else "no")  # noqa: E731
    rows = [[i, _num(min(flat(lo))), _num(max(flat(up))), word(v, b)]
            for i, (lo, up, v, b) in enumerate(zip(d["lower"], d["upper"], ver, by))]
    what = "margin" if d["verified"] is not None else "output"
    parts = [f"<p>{n} sample(s); bounds of the {what}s"
             + (f" by {_e(d['method'])}" if d.get("method") else "")
             + f"; {_num(d.get('time_s'))} s bounding.</p>",
             _table(["sample", f"smallest lower bound ({what})", f"largest upper bound ({what})",
                     "verified"], rows, "samples", num_cols=[0, 1, 2])]
    pl = d.get("per_layer")
    if not pl:
        parts.append('<p class="note">No per-layer widths in this file: run <code>verifier '
                     'bounds ... --json --per-layer</code> for the IBP / CROWN / alpha-CROWN '
                     'comparison per node.</p>')
        return "".join(parts)
    ms = list(pl["width"])
    rows = [[name, op, *(_num(pl["width"][m][i]) for m in ms)]
            for i, (name, op) in enumerate(zip(pl["nodes"], pl["ops"]))]
    rows.append(["time (s)", "", *(_num(pl["time_s"].get(m)) for m in ms)])
    parts += ["<h3>Mean bound width per node</h3>",
              _img(None if plt is None else plot_layer_widths(pl, plt), "bound width per node"),
              _table(["node", "op", *ms], rows, "layers", num_cols=range(2, 2 + len(ms)))]
    return "".join(parts)


def _train_html(s: Source, plt) -> str:
    d = s.data
    rows = [["clean accuracy", _num(d["clean_acc"])],
            [f"PGD accuracy ({d.get('pgd_steps', '?')} steps)", _num(d.get("pgd_acc"))]]
    rows += [[f"certified accuracy, {m} (eps {d['eps']:g})", _num(v)]
             for m, v in d["certified_acc"].items()]
    rows += [[k.replace("_", " "), _num(d[k])] for k in ("n", "train_time_s", "eval_time_s")
             if k in d]
    parts = [f"<p>{_e(d.get('dataset', ''))}, trained and evaluated at eps {d['eps']:g}.</p>",
             _table(["quantity", "value"], rows, "train", num_cols=[1])]
    if has_eps_grid(d):
        parts.append(_img(None if plt is None else plot_train(d, plt), "certified accuracy vs eps"))
    else:
        parts.append('<p class="note">No certified-accuracy-vs-eps grid in this run (verifier '
                     'train --eval-eps, or the config key eval_eps).</p>')
    parts.append(_curves_html(d.get("history"), plt))
    return "".join(parts)


def _curves_html(history, plt) -> str:
    if not has_curves(history):
        return '<p class="note">No training history in this file.</p>'
    return _img(None if plt is None else plot_train_curves(history, plt), "training curves")


def _lipschitz_html(s: Source, plt) -> str:
    d = s.data
    crown = d.get("crown_certified_acc") or {}
    rows = [[r, _num(v), _num(crown.get(r))] for r, v in sorted(d["certified_acc"].items(),
                                                                 key=lambda kv: float(kv[0]))]
    parts = [f"<p>Certified L2 Lipschitz constant L = {_num(d['lipschitz'], '.6g')}; clean "
             f"accuracy {_num(d['clean_acc'])}"
             + (f"; {_e(d.get('optimizer'))} + {_e(d.get('constraint'))}, w_max "
                f"{_e(d.get('w_max'))}" if d.get("constraint") else "") + ".</p>",
             _table(["L2 radius", "certified (margin > sqrt(2) L r)", "certified (CROWN L2)"],
                    rows, "radii", num_cols=[1, 2]),
             _img(None if plt is None else plot_lipschitz(d, plt), "certified accuracy vs radius")]
    if has_curves(d.get("history")):
        parts.append(_curves_html(d["history"], plt))
    if d.get("layers"):
        parts.append(_table(["layer", "op", "constant", "cumulative", "how"],
                            [[l.get("name"), l.get("op"), _num(l.get("constant")),
                              _num(l.get("cumulative")), l.get("how", "")] for l in d["layers"]],
                            "lipschitz-layers", num_cols=[2, 3]))
    return "".join(parts)


def render_html(sources, title: str = "verifier report", plots: bool = True) -> str:
    """The whole page, as text. ``plots=False`` (or no matplotlib) leaves the plots out."""
    plt = pyplot() if plots else None
    body = [f"<h1>{_e(title)}</h1>"]
    if plots and plt is None:
        body.append(f'<p class="note">{NO_MATPLOTLIB}.</p>')
    series = cactus_series(sources)
    if series and plots:
        body += ["<h2>Instances solved against time</h2>",
                 _img(None if plt is None else plot_cactus(series, plt), "cactus plot")]
    render = {"results": lambda s: _results_html(s), "bounds": lambda s: _bounds_html(s, plt),
              "train": lambda s: _train_html(s, plt), "lipschitz": lambda s: _lipschitz_html(s, plt)}
    for s in sources:
        kind = {"results": "verification results", "bounds": "bounds", "train": "certified training",
                "lipschitz": "Lipschitz training"}[s.kind]
        body.append(f'<section class="source {s.kind}"><h2>{_e(s.label)} ({kind})</h2>'
                    f'<p class="note">{_e(s.path)}</p>{render[s.kind](s)}</section>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def summary(sources) -> str:
    """A few lines of text per input file (what ``verifier report`` prints)."""
    lines = []
    for s in sources:
        d = s.data
        if s.kind == "results":
            c = verdict_counts(d)
            counts = "  ".join(f"{k} {c[k]}" for k in (*STATUSES, "wrong") if c[k])
            lines.append(f"{s.label}: {c['total']} instances: {counts or 'none'}")
        elif s.kind == "bounds":
            v = d["verified"]
            ver = "" if v is None else f", {sum(v)} verified"
            lines.append(f"{s.label}: bounds of {len(d['lower'])} sample(s){ver}"
                         + (", per-layer widths" if d.get("per_layer") else ""))
        elif s.kind == "train":
            cert = ", ".join(f"{m} {v:.4f}" for m, v in d["certified_acc"].items())
            lines.append(f"{s.label}: clean {d['clean_acc']:.4f}, certified at eps "
                         f"{d['eps']:g}: {cert}")
        else:
            cert = ", ".join(f"r={r}: {v:.4f}" for r, v in d["certified_acc"].items())
            lines.append(f"{s.label}: L {d['lipschitz']:.6g}, clean {d['clean_acc']:.4f}, "
                         f"certified {cert}")
    return "\n".join(lines)


def write_report(paths, html_path=None, title: str = "verifier report", plots: bool = True):
    """Read ``paths``, write the page to ``html_path`` (when given); -> (sources, summary)."""
    sources = [load(p) for p in paths]
    if html_path is not None:
        Path(html_path).write_text(render_html(sources, title, plots), encoding="utf-8")
    return sources, summary(sources)
