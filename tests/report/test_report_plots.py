"""The report's plots, read through matplotlib's Figure and Axes objects (not pixels): the cactus
plot in the field's convention (instances solved on x, time per instance on a log y axis, one
line per results file), and the per-node width plot where every method stays visible even
where two methods' widths coincide."""
from __future__ import annotations

import pytest

from verifier.report import (cactus_figure, cactus_series, layer_widths_figure, load, pyplot,
                             render_html, short_names)

plt = pyplot()
pytestmark = pytest.mark.skipif(plt is None, reason="matplotlib is not installed")

TOOL_A = "status,time_s\nunsat,2.0\nsat,0.5\ntimeout,60\nunsat,0.01\n"
TOOL_B = "status,time_s\nunsat,30\nunknown,1\nunsat,0.0\n"


@pytest.fixture
def two_runs(tmp_path):
    """The same results file name from two runs (two tools, two folders)."""
    paths = []
    for run, text in (("tool_a", TOOL_A), ("tool_b", TOOL_B)):
        (tmp_path / run).mkdir()
        p = tmp_path / run / "results.csv"
        p.write_text(text)
        paths.append(p)
    return paths


def test_cactus_has_instances_solved_on_x_and_log_time_on_y(two_runs):
    series = cactus_series([load(p) for p in two_runs])
    fig = cactus_figure(series, plt)
    ax = fig.axes[0]
    try:
        lines = ax.get_lines()
        assert len(lines) == 2                                   # one line per results file
        a, b = lines
        # tool_a solved 3 of 4: the k-th fastest at x = k
        assert list(a.get_xdata()) == [1, 2, 3]
        assert list(a.get_ydata()) == [0.01, 0.5, 2.0]
        # tool_b solved 2 of 3, one in 0.0 s: drawn at the smallest time shown (log axis)
        assert list(b.get_xdata()) == [1, 2]
        assert list(b.get_ydata()) == [0.01, 30.0]
        assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"
        assert "solved" in ax.get_xlabel() and "time" in ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["tool_a/results.csv (3/4)", "tool_b/results.csv (2/3)"]
        assert a.get_marker() != b.get_marker() and a.get_color() != b.get_color()
    finally:
        plt.close(fig)


def test_short_names_add_parent_folders_only_where_names_collide():
    assert short_names(["x/a.csv", "y/b.csv"]) == ["a.csv", "b.csv"]
    assert short_names(["r/1/out.csv", "r/2/out.csv", "z.csv"]) == ["1/out.csv", "2/out.csv",
                                                                     "z.csv"]


def test_page_with_two_results_files_has_one_cactus_plot(two_runs):
    page = render_html([load(p) for p in two_runs])
    assert page.count('alt="cactus plot"') == 1


def _per_layer():
    # CROWN-IBP's intermediate widths are IBP's, and on the spec row CROWN's is alpha-CROWN's:
    # two pairs of coinciding lines
    return {"nodes": ["input", "fc1", "relu1", "fc2", "C·f (spec)"],
            "ops": ["input", "linear", "relu", "linear", "spec"],
            "width": {"ibp": [0.2, 3.0, 1.5, 8.0, 12.0],
                      "crown-ibp": [0.2, 3.0, 1.5, 8.0, 6.0],
                      "crown": [0.2, 2.0, 1.0, 4.0, 5.0],
                      "alpha-crown": [0.2, 2.0, 1.0, 3.0, 5.0]},
            "time_s": {}}


def test_every_method_of_the_width_plot_stays_visible_where_lines_coincide():
    pl = _per_layer()
    fig = layer_widths_figure(pl, plt)
    ax = fig.axes[0]
    try:
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == list(pl["width"])   # one line per method
        assert all(ln.get_visible() and (ln.get_alpha() is None or ln.get_alpha() > 0)
                   for ln in lines)
        styles = [(ln.get_marker(), str(ln.get_linestyle())) for ln in lines]
        assert len({s[0] for s in styles}) == len(lines)               # distinct markers
        assert len({s[1] for s in styles}) == len(lines)               # distinct line styles
        # each line is drawn above the previous ones with smaller markers and a thinner line,
        # so where two coincide the one below still shows around the one on top
        z = [ln.get_zorder() for ln in lines]
        size = [ln.get_markersize() for ln in lines]
        width = [ln.get_linewidth() for ln in lines]
        assert z == sorted(z) and len(set(z)) == len(z)
        assert all(s1 > s2 for s1, s2 in zip(size, size[1:]))
        assert all(w1 > w2 for w1, w2 in zip(width, width[1:]))
        # and they are offset sideways: no two lines share a point even where widths are equal
        pts = [set(zip(ln.get_xdata(), ln.get_ydata())) for ln in lines]
        for i in range(len(pts)):
            for j in range(i + 1, len(pts)):
                assert not pts[i] & pts[j]
        # the offsets stay small: each point is within 0.25 node of its node
        for ln in lines:
            assert all(abs(x - round(x)) <= 0.25 for x in ln.get_xdata())
            assert list(ln.get_ydata()) == pl["width"][ln.get_label()]
        assert ax.get_yscale() == "log"
    finally:
        plt.close(fig)
