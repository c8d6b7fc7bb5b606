"""The HTML report as a browser shows it: headless Chromium (Debian's ``chromium`` package) loads
the page, decodes every embedded plot, and renders a non-blank screenshot (kept under the test's
tmp_path). Skipped when no Chromium is installed (``apt-get install -y chromium``); the
``CHROMIUM`` environment variable names another binary."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from verifier.report import load, render_html

pytestmark = pytest.mark.browser


def _chromium() -> str | None:
    names = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    for n in names:
        if n and shutil.which(n):
            return shutil.which(n)
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install -y chromium)")

# appended to a copy of the page: after load, record what the browser made of each <img>
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.plot")];
  document.body.setAttribute("data-decoded",
    imgs.map(i => i.alt + "=" + i.naturalWidth + "x" + i.naturalHeight).join(";"));
  document.body.setAttribute("data-rows",
    String(document.querySelectorAll("table.instances tbody tr").length));
});
</script></body>"""


def _run(args, tmp_path, timeout=90):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def page(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    p = d / "report.html"
    p.write_text(render_html([load(files["vnncomp"]), load(files["batch"]), load(files["train"]),
                              load(files["lipschitz"])]), encoding="utf-8")
    return p


@needs_chromium
def test_chromium_decodes_every_plot_and_shows_the_table(page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE),
                     encoding="utf-8")
    r = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    decoded = dict(re.findall(r"([^;=\"]+)=(\d+x\d+)", re.search(
        r'data-decoded="([^"]*)"', dom).group(1)))
    assert set(decoded) == {"cactus plot", "certified accuracy vs eps",
                            "certified accuracy vs radius"}
    for alt, size in decoded.items():
        w, h = map(int, size.split("x"))
        assert w >= 300 and h >= 200, f"{alt}: the browser decoded {size}"
    assert re.search(r'data-rows="(\d+)"', dom).group(1) == "9"      # 4 + 5 instances
    assert "onnx/e.onnx" in dom and "acasxu" in dom


@needs_chromium
def test_screenshot_of_the_report_is_not_blank(page, tmp_path):
    shot = tmp_path / "report.png"
    r = _run(["--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000
    from matplotlib.image import imread
    img = imread(str(shot))                                   # [H, W, 3 or 4], floats in [0, 1]
    assert img.shape[:2] == (1600, 1200)
    rgb = img[..., :3]
    ink = (rgb < 0.9).any(axis=-1).mean()                    # share of non-white pixels
    colors = len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02, f"only {ink:.1%} of the screenshot is not white"
    assert colors > 50, f"only {colors} colours: the plots did not render"
    # the cactus plot is at the top: its area holds the plot's coloured line (matplotlib's C0)
    top = (rgb[:800] * 255).astype(int)
    blue = ((abs(top[..., 0] - 31) < 30) & (abs(top[..., 1] - 119) < 30)
            & (abs(top[..., 2] - 180) < 30)).sum()
    assert blue > 100, "no plot line in the top of the page"
