"""Fixtures of the report tests: input files in the formats our commands write, made by the
commands' own code where that is quick (evaluate, evaluate_lipschitz, run_instance)."""
from __future__ import annotations

import json

import pytest

from report_support import BATCH_CSV, VNNCOMP, VNNCOMP_CSV, digits_like, small_net


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Paths of one file of each kind."""
    d = tmp_path_factory.mktemp("report_inputs")
    out = {}
    (d / "batch.csv").write_text(BATCH_CSV)
    (d / "vnncomp.csv").write_text(VNNCOMP_CSV)
    out["batch"], out["vnncomp"] = str(d / "batch.csv"), str(d / "vnncomp.csv")

    # verifier verify --json on a shipped sat instance
    from verifier.cli.verify import run_instance
    r = run_instance(str(VNNCOMP / "onnx" / "test_sat.onnx"),
                     str(VNNCOMP / "vnnlib" / "test_prop.vnnlib"), 30.0)
    (d / "verify.json").write_text(json.dumps(r["verdict"].to_json()))
    out["verify"] = str(d / "verify.json")

    # verifier train's report.json, by its own evaluate()
    from verifier.train.evaluation import evaluate
    ds = digits_like()
    rep = evaluate(small_net(), ds, 0.02, methods=("ibp", "crown"), eps_grid=[0.0, 0.01, 0.05],
                   pgd_steps=3)
    rep.update(dataset=ds.name, train_time_s=1.0, eval_time_s=0.5)
    (d / "train.json").write_text(json.dumps({**rep, "history": []}))
    out["train"] = str(d / "train.json")

    # verifier train --lipschitz's report.json, by its own evaluate_lipschitz()
    from verifier.lipschitz.train import evaluate_lipschitz
    lip = evaluate_lipschitz(small_net(), ds, radii=(0.1, 0.5), crown=True)
    lip.update(constraint="spectral_hard_cap", optimizer="muon", w_max=1.0, epochs=1,
               dataset=ds.name, train_time_s=1.0, history=[])
    (d / "lip.json").write_text(json.dumps(lip))
    out["lipschitz"] = str(d / "lip.json")
    return out
