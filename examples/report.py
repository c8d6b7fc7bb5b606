"""An HTML report of the three kinds of runs, as a newcomer makes them: a VNN-COMP benchmark
folder (results table, verdict counts, cactus plot), the bounds of one MNIST digit (bound width
per node under IBP, CROWN and alpha-CROWN), and a short certified-training run (certified
accuracy against eps). Each step is the ``verifier`` command itself, called in-process.

    python examples/report.py [OUT_DIR]

The same on a shell:

    verifier batch tests/data/vnncomp_test/instances.csv --out results.csv
    verifier bounds examples/data/lirpa_mnist_fc_3layer.onnx --input examples/data/mnist_sample.npy \\
        --eps 0.02 --clip 0 1 --label 7 --json --per-layer > bounds.json
    verifier train --config digits.yaml --output run
    verifier report results.csv bounds.json run/report.json --html report.html

Open OUT_DIR/report.html in a browser (by default OUT_DIR is a new temporary folder).
"""
from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from verifier.cli import main as verifier

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

TRAIN_CONFIG = """\
dataset: digits
model: mlp
model_kwargs: {in_dim: 64, hidden: [64]}
method: ibp
eps: 0.1
epochs: 6
warmup_epochs: 1
ramp_epochs: 4
batch_size: 64
lr: 0.002
test_subset: 100
eval_methods: [ibp, crown]
eval_eps: [0.0, 0.025, 0.05, 0.075, 0.1, 0.15]
"""


def run(*argv, stdout=None) -> None:
    """``verifier ARGV``; its stdout to the file ``stdout`` (like ``> file``) or to ours."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = verifier([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"verifier {argv[0]} failed with exit status {code}")
    if stdout is None:
        print(buf.getvalue(), end="")
    else:
        Path(stdout).write_text(buf.getvalue())


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="verifier_report_"))
    out.mkdir(parents=True, exist_ok=True)
    data = ROOT / "examples" / "data"

    print("== verifier batch (the VNN-COMP `test` benchmark)")
    run("batch", ROOT / "tests" / "data" / "vnncomp_test" / "instances.csv",
        "--out", out / "results.csv")

    print("== verifier bounds --json --per-layer (one MNIST digit)")
    run("bounds", data / "lirpa_mnist_fc_3layer.onnx", "--input", data / "mnist_sample.npy",
        "--eps", 0.02, "--clip", 0, 1, "--label", 7, "--json", "--per-layer",
        stdout=out / "bounds.json")

    print("== verifier train (IBP on the 8x8 digits, 6 epochs)")
    (out / "digits.yaml").write_text(TRAIN_CONFIG)
    shutil.rmtree(out / "run", ignore_errors=True)      # this script's own run of a previous call
    run("train", "--config", out / "digits.yaml", "--output", out / "run", "--no-progress")

    print("== verifier report")
    run("report", out / "results.csv", out / "bounds.json", out / "run" / "report.json",
        "--html", out / "report.html", "--title", "verifier: a first report")


if __name__ == "__main__":
    main()
