"""``evaluate``'s time budget: a method past its budget is skipped on the later batches, the
skipped samples are reported, and certified accuracy stays a lower bound of the full one."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel, LpBall, margin_spec
from verifier.train import from_dict, load_digits_split
from verifier.train.config import ConfigError
from verifier.train.evaluation import evaluate


@pytest.fixture(scope="module")
def setup():
    ds = load_digits_split("test")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    # a least-squares readout on random features: most test digits right, some certifiable
    with torch.no_grad():
        h = torch.relu(net[1](ds.x.flatten(1)))
        h1 = torch.cat([h, torch.ones(len(h), 1)], 1)
        W = torch.linalg.lstsq(h1, torch.eye(10)[ds.y] * 10).solution
        net[3].weight.copy_(W[:-1].t())
        net[3].bias.copy_(W[-1])
    return net, ds


def test_a_method_over_budget_is_skipped_and_counted(setup):
    net, ds = setup
    eps = 0.002
    full = evaluate(net, ds, eps, methods=("ibp", "crown"), pgd_steps=0, batch=50)
    capped = evaluate(net, ds, eps, methods=("ibp", "crown"), pgd_steps=0, batch=50, budget_s=1e-9)
    bm = BoundedModel(net, input_shape=ds.input_shape)
    ball = LpBall(ds.x, eps, clip=(0.0, 1.0))
    ibp = bm.bounds(ball, "ibp", spec=margin_spec(ds.y, 10)).verified
    crown = bm.bounds(ball, "crown", spec=margin_spec(ds.y, 10)).verified
    n = len(ds)
    assert full["certified_acc"]["ibp"] == capped["certified_acc"]["ibp"] == int(ibp.sum()) / n
    assert full["certified_acc"]["ibp+crown"] == int((ibp | crown).sum()) / n
    assert full["budget_skipped"] == {}
    # the first batch runs CROWN (it has used nothing yet); every later batch skips it
    first = ibp[:50] | crown[:50]
    assert capped["certified_acc"]["ibp+crown"] == (int(first.sum()) + int(ibp[50:].sum())) / n
    assert capped["budget_skipped"]["crown"] == int((~ibp[50:]).sum()) > 0
    assert capped["certified_acc"]["ibp+crown"] < full["certified_acc"]["ibp+crown"]


def test_bad_budgets_are_clear_errors(setup):
    net, ds = setup
    with pytest.raises(ValueError, match="budget_s"):
        evaluate(net, ds, 0.01, methods=("ibp",), pgd_steps=0, budget_s=0)
    with pytest.raises(ConfigError, match="eval_budget_s"):
        from_dict({"dataset": "digits", "eval_budget_s": -1})
    assert from_dict({"dataset": "digits", "eval_budget_s": 30}).eval_budget_s == 30.0
