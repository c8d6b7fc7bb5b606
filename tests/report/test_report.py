"""verifier.report: reading each kind of input, the numbers behind the page (verdict counts,
cactus series, per-node widths), the page itself, and the ``verifier report`` command."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from report_support import ROOT, embedded_pngs, small_net
from verifier import BoundedModel, LpBall, margin_spec
from verifier.cli import main
from verifier.report import (ReportInputError, cactus_series, load, per_layer_widths,
                             read_results_csv, render_html, verdict_counts)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXAMPLE_ONNX = ROOT / "examples" / "data" / "lirpa_mnist_fc_3layer.onnx"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# -- reading -----------------------------------------------------------------------------------

def test_each_kind_of_file_is_recognised(files):
    kinds = {k: load(p).kind for k, p in files.items()}
    assert kinds == {"batch": "results", "vnncomp": "results", "verify": "results",
                     "train": "train", "lipschitz": "lipschitz"}


def test_results_csv_rows_are_typed(files):
    rows = read_results_csv(files["batch"])
    assert [r["status"] for r in rows] == ["unsat", "sat", "unknown", "timeout", "unsat"]
    assert rows[2]["time_s"] == 2.5 and isinstance(rows[0]["time_s"], float)


@pytest.mark.parametrize("text, message", [
    ("onnx,vnnlib,result\na,b,sat\n", "lacks the column(s) status, time_s"),
    ("status,time_s\nunsat,0.1\nproved,0.2\n", ":3: unknown status 'proved'"),
    ("status,time_s\nunsat,-1\n", ":2: time_s must be a number >= 0"),
    ("status,time_s\nunsat,nan\n", ":2: time_s must be a number >= 0"),
    ("status,time_s\nunsat,0.1,extra\n", ":2: 3 fields, the header has 2"),
    ("", "empty file"),
])
def test_bad_results_csv_is_a_clear_error(tmp_path, text, message):
    p = tmp_path / "r.csv"
    p.write_text(text)
    with pytest.raises(ReportInputError, match=None) as e:
        load(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_unknown_json_and_missing_file_are_clear_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ReportInputError, match="JSON of no known kind"):
        load(p)
    p.write_text("{not json")
    with pytest.raises(ReportInputError, match="neither a results .csv nor valid JSON"):
        load(p)
    with pytest.raises(ReportInputError, match="no such file"):
        load(tmp_path / "missing.csv")


# -- numbers -----------------------------------------------------------------------------------

def test_verdict_counts_and_wrong_verdicts(files):
    c = verdict_counts(read_results_csv(files["vnncomp"]))
    assert c == {"sat": 1, "unsat": 2, "unknown": 0, "timeout": 1, "error": 0, "wrong": 1,
                 "total": 4}
    assert verdict_counts(read_results_csv(files["batch"]))["wrong"] == 0


def test_cactus_series_are_sorted_solved_times_per_benchmark(files):
    series = dict(cactus_series([load(files["vnncomp"]), load(files["batch"])]))
    assert series == {"vnncomp.csv: acasxu (2/2)": [0.25, 0.5],
                      "vnncomp.csv: mnist_fc (1/2)": [3.0],
                      "batch.csv (3/5)": [0.019, 0.025, 1.25]}


def test_per_layer_widths_are_the_bounds_widths_and_crown_is_never_looser_than_ibp():
    model = BoundedModel(small_net(), input_shape=(1, 4, 4))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    spec = margin_spec(model(x).argmax(1), 3)
    ball = LpBall(x, 0.05, clip=(0, 1))
    pl = per_layer_widths(model, ball, spec)
    names = [n.name for n in model.graph]
    assert pl["nodes"] == [*names, "C·f (spec)"] and pl["ops"][-1] == "spec"
    assert set(pl["width"]) == {"ibp", "crown", "alpha-crown"}
    # recomputed another way: the widths of the result's own intervals
    res = model.bounds(ball, "crown", spec=spec)
    for i, name in enumerate(names):
        want = float((res[name].upper - res[name].lower).double().mean())
        assert pl["width"]["crown"][i] == pytest.approx(want, rel=1e-6)
    assert pl["width"]["crown"][-1] == pytest.approx(
        float((res.upper - res.lower).double().mean()), rel=1e-6)
    # the input width is that of the clipped ball; CROWN's bounds are intersected with IBP's
    want_in = float((ball.interval().upper - ball.interval().lower).double().mean())
    assert pl["width"]["ibp"][0] == pytest.approx(want_in, rel=1e-6)
    for w_ibp, w_crown in zip(pl["width"]["ibp"], pl["width"]["crown"]):
        assert w_crown <= w_ibp * (1 + 1e-5) + 1e-7
    assert all(t >= 0 for t in pl["time_s"].values())


# -- the page ----------------------------------------------------------------------------------

def test_page_has_tables_counts_and_every_plot(files, tmp_path):
    sources = [load(p) for p in files.values()]
    page = render_html(sources, title="T <&>")
    assert "<title>T &lt;&amp;&gt;</title>" in page
    # per-instance rows: 5 + 4 + 1, each with its status class; the wrong verdict is marked
    assert page.count('<tr class="status-') == 10
    assert 'class="status-sat wrong"' in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page
    pngs = embedded_pngs(page)
    assert set(pngs) == {"cactus plot", "certified accuracy vs eps", "certified accuracy vs radius"}
    for png in pngs.values():
        assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_bounds_json_with_per_layer_gives_the_width_plot(tmp_path, capsys):
    code, out, err = run_cli(capsys, "bounds", EXAMPLE_ONNX, "--input",
                             ROOT / "examples" / "data" / "mnist_sample.npy", "--eps", "0.02",
                             "--clip", "0", "1", "--label", "7", "--json", "--per-layer")
    assert code == 0, err
    d = json.loads(out)
    assert d["method"] == "crown" and list(d["per_layer"]["width"]) == ["ibp", "crown",
                                                                         "alpha-crown"]
    p = tmp_path / "b.json"
    p.write_text(out)
    page = render_html([load(p)])
    assert set(embedded_pngs(page)) == {"bound width per node"}
    assert "_3_gemm" in page and "<td>C·f (spec)</td>" in page


def test_bounds_json_without_per_layer_says_how_to_get_it(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "bounds", EXAMPLE_ONNX, "--input",
                           ROOT / "examples" / "data" / "mnist_sample.npy", "--eps", "0.02",
                           "--json")
    assert code == 0
    assert set(json.loads(out)) == {"lower", "upper", "verified", "proved_by", "time_s"}
    p = tmp_path / "b.json"
    p.write_text(out)
    page = render_html([load(p)])
    assert "--per-layer" in page and not embedded_pngs(page)


def test_without_matplotlib_the_page_keeps_its_tables(files, tmp_path, monkeypatch, capsys):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    out_html = tmp_path / "r.html"
    code, out, err = run_cli(capsys, "report", files["batch"], "--html", out_html)
    assert code == 0
    assert "matplotlib" in err and "tables only" in err
    page = out_html.read_text()
    assert page.count('<tr class="status-') == 5 and not embedded_pngs(page)
    assert "plots need matplotlib" in page


# -- the command -------------------------------------------------------------------------------

def test_report_command_writes_the_page_and_prints_a_summary(files, tmp_path, capsys):
    out_html = tmp_path / "report.html"
    code, out, err = run_cli(capsys, "report", files["vnncomp"], files["train"], "--html",
                             out_html)
    assert code == 0, err
    assert "vnncomp.csv: 4 instances: sat 1  unsat 2  timeout 1  wrong 1" in out
    assert "train.json: clean" in out and f"report: {out_html}" in out
    assert set(embedded_pngs(out_html.read_text())) == {"cactus plot",
                                                        "certified accuracy vs eps"}


def test_report_command_without_html_only_prints(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "report", files["lipschitz"], "--no-plots")
    assert code == 0 and out.startswith("lip.json: L ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["report", "nope.csv"], "nope.csv: no such file"),
    (["report"], "the following arguments are required: FILE"),
])
def test_report_command_errors_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.startswith("error: ")


def test_per_layer_needs_json(capsys):
    code, _, err = run_cli(capsys, "bounds", EXAMPLE_ONNX, "--input",
                           ROOT / "examples" / "data" / "mnist_sample.npy", "--eps", "0.02",
                           "--per-layer")
    assert code == 2 and "--per-layer needs --json" in err


def test_train_plot_holds_the_eps_grid_of_the_report(files):
    d = json.loads(open(files["train"]).read())
    assert d["certified_vs_eps"]["eps"] == [0.0, 0.01, 0.05]
    # certified accuracy at eps 0 by IBP can only count correctly classified samples
    assert d["certified_vs_eps"]["ibp"][0] <= d["clean_acc"] + 1e-12
    assert np.all(np.diff(d["certified_vs_eps"]["ibp"]) <= 1e-12)   # shrinks as eps grows


# -- training runs: a panel for each thing the run measured ------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-epoch digits run of ``verifier train`` (run_training), default eps grid."""
    from verifier.train import TrainConfig, run_training
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"in_dim": 64, "hidden": [16]},
                      epochs=2, warmup_epochs=1, ramp_epochs=1, test_subset=30,
                      eval_methods=["ibp"], eval_pgd_steps=2, output=str(out))
    run_training(cfg, progress=False)
    return out


def test_train_page_plots_the_eps_grid_and_the_training_curves_of_a_run(tiny_run, tmp_path,
                                                                       capsys):
    d = json.loads((tiny_run / "report.json").read_text())
    assert len(d["certified_vs_eps"]["eps"]) == 5 and len(d["history"]) == 2
    code, _, err = run_cli(capsys, "report", tiny_run / "report.json", "--html",
                           tmp_path / "r.html")
    assert code == 0, err
    pngs = embedded_pngs((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert set(pngs) == {"certified accuracy vs eps", "training curves"}
    for png in pngs.values():
        assert png.startswith(PNG_MAGIC) and len(png) > 5000


def _figure_of_plot_report(monkeypatch, report, history, tmp_path):
    """The matplotlib figure that ``plot_report`` saves as report.png."""
    from matplotlib.figure import Figure

    from verifier.train.evaluation import plot_report
    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k)))
    plot_report(report, history, tmp_path / "report.png")
    assert len(saved) == 1 and (tmp_path / "report.png").read_bytes().startswith(PNG_MAGIC)
    return saved[0]


def _panels(fig):
    """The figure's panels: its axes less the twins (a twin shares its panel's x axis)."""
    out = []
    for ax in fig.axes:
        if not any(ax.get_shared_x_axes().joined(ax, p) for p in out):
            out.append(ax)
    return out


def _plotted(ax) -> int:
    """Data points of the axes' lines and bars (reference lines of 2 equal x or y excluded)."""
    n = 0
    for line in ax.get_lines():
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if len(x) == 2 and (x[0] == x[1] or y[0] == y[1]):
            continue                                    # axhline / axvline
        n += int(np.isfinite(y).sum())
    return n + len(ax.patches)


def test_report_png_has_a_panel_for_each_measured_thing_and_no_empty_one(tiny_run, monkeypatch,
                                                                        tmp_path):
    d = json.loads((tiny_run / "report.json").read_text())
    history = d.pop("history")
    fig = _figure_of_plot_report(monkeypatch, d, history, tmp_path)
    assert [ax.get_title() for ax in _panels(fig)] == ["certified accuracy against eps",
                                                       "training curves"]
    assert all(_plotted(ax) > 0 for ax in fig.axes)
    # no grid measured: the training curves alone (and the eps axis twinned with them)
    no_grid = {**d, "certified_vs_eps": {"eps": [], "ibp": [], "crown-ibp": []}}
    fig = _figure_of_plot_report(monkeypatch, no_grid, history, tmp_path)
    assert [ax.get_title() for ax in _panels(fig)] == ["training curves"]
    assert len(fig.axes) == 2 and all(_plotted(ax) > 0 for ax in fig.axes)
    # neither: the final accuracies
    fig = _figure_of_plot_report(monkeypatch, no_grid, [], tmp_path)
    assert len(fig.axes) == 1 and _plotted(fig.axes[0]) == 2 + len(d["certified_acc"])


def test_train_page_without_history_or_grid_says_so_and_draws_nothing(files, tmp_path):
    d = json.loads(open(files["train"]).read())
    d["certified_vs_eps"] = {"eps": [], "ibp": [], "crown-ibp": []}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    page = render_html([load(p)])
    assert embedded_pngs(page) == {}
    assert "No certified-accuracy-vs-eps grid in this run" in page
    assert "No training history in this file" in page


def test_lipschitz_page_plots_its_training_curves(files, tmp_path):
    d = json.loads(open(files["lipschitz"]).read())
    assert d["history"] == []
    assert "training curves" not in embedded_pngs(render_html([load(files["lipschitz"])]))
    d["history"] = [{"epoch": 1, "loss": 1.2, "train_acc": 0.6},
                    {"epoch": 2, "loss": 0.8, "train_acc": 0.75}]
    p = tmp_path / "lip.json"
    p.write_text(json.dumps(d))
    assert set(embedded_pngs(render_html([load(p)]))) == {"certified accuracy vs radius",
                                                         "training curves"}


def test_bounds_table_says_which_bound_proved_each_sample(tmp_path):
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"lower": [[1.0], [0.5], [-1.0]], "upper": [[2.0], [1.0], [1.0]],
                             "verified": [True, True, False],
                             "proved_by": ["crown", "ibp", None], "time_s": 0.1}))
    page = render_html([load(p)], plots=False)
    cells = re.findall(r"<td>(yes[^<]*|no)</td>", page)
    assert cells == ["yes (crown)", "yes (ibp)", "no"]
