"""Fixtures of the CLI tests: the tiny model with its input files, and a runner that calls
``verifier.cli.main`` in-process."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli_support import make_mlp, onnx_forward
from verifier.cli import main


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny MLP and a batch of 4 inputs (plus labels = its predictions)."""
    d = tmp_path_factory.mktemp("tiny")
    model = make_mlp(d / "mlp.onnx")
    x = np.random.default_rng(1).uniform(0, 1, (4, 1, 2, 2)).astype(np.float32)
    np.save(d / "x4.npy", x)
    np.save(d / "x1.npy", x[:1])
    y = onnx_forward(model, x).argmax(1).astype(np.int64)
    np.save(d / "y4.npy", y)
    return {"dir": d, "model": str(model), "x": x, "y": y,
            "x4": str(d / "x4.npy"), "x1": str(d / "x1.npy"), "y4": str(d / "y4.npy")}


class Run:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    @property
    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """``cli("bounds", ...)`` -> Run(code, stdout, stderr), in-process."""
    def run(*argv) -> Run:
        import torch
        threads = torch.get_num_threads()
        try:
            code = main([str(a) for a in argv])
        finally:
            torch.set_num_threads(threads)
        cap = capsys.readouterr()
        return Run(code, cap.out, cap.err)
    return run
