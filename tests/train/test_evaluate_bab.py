"""``evaluate``'s complete method ``bab``: each sample that PGD holds and the incomplete methods
leave open is decided by branch and bound; its verdicts agree with an exact MILP of every
margin over the clipped ball, and it certifies samples that CROWN cannot."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel, LpBall, margin_spec
from verifier.train import from_dict, load_digits_split
from verifier.train.config import ConfigError
from verifier.train.data import Dataset
from verifier.train.evaluation import _complete, evaluate

from complete.test_lp_refine import _milp_min_under

EPS = 0.06


@pytest.fixture(scope="module")
def setup():
    full = load_digits_split("test")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 10))
    train = load_digits_split("train")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):          # a few seconds of plain training: most test digits right
        opt.zero_grad()
        nn.functional.cross_entropy(net(train.x), train.y).backward()
        opt.step()
    net.eval()
    ds = Dataset(full.x[:40], full.y[:40], 10, "digits[:40]")
    return net, ds


def _exact_robust(net, x, label, eps) -> bool:
    """Whether every margin ``f_label - f_j`` stays positive over the clipped ball (MILP)."""
    flat = nn.Sequential(*list(net)[1:])
    lo = (x.flatten() - eps).clamp(0, 1).double()
    hi = (x.flatten() + eps).clamp(0, 1).double()
    for j in range(10):
        if j != label:
            c = torch.zeros(1, 10, dtype=torch.float64)
            c[0, label], c[0, j] = 1.0, -1.0
            if _milp_min_under(flat, lo, hi, c, 0.0) <= 0:
                return False
    return True


def test_bab_verdicts_agree_with_the_exact_milp(setup):
    net, ds = setup
    bm = BoundedModel(net, input_shape=ds.input_shape)
    ball = LpBall(ds.x, EPS, clip=(0.0, 1.0))
    crown = bm.bounds(ball, "crown", spec=margin_spec(ds.y, 10)).verified
    rep = evaluate(net, ds, EPS, methods=("ibp", "crown", "bab"), pgd_steps=20, batch=16,
                   bab_timeout=20, eps_grid=())
    decided = {"unsat": 0, "sat": 0}
    for i in (~crown).nonzero().flatten().tolist():
        exact = _exact_robust(net, ds.x[i], int(ds.y[i]), EPS)
        status = _complete(bm, ds.x[i], int(ds.y[i]), EPS, 10, 20)
        assert status in ("unsat", "sat"), status       # small enough to decide in time
        assert (status == "unsat") == exact, (i, status, exact)
        decided[status] += 1
    # a test that exercises the complete method: CROWN leaves robust samples that BaB proves
    assert decided["unsat"] >= 2, decided
    n = len(ds)
    assert rep["certified_acc"]["ibp+crown"] == int(crown.sum()) / n
    assert rep["certified_acc"]["ibp+crown+bab"] == (int(crown.sum()) + decided["unsat"]) / n
    # bab runs only on what PGD holds: its verdicts cover those samples, no more
    assert sum(rep["bab_verdicts"].values()) <= int((~crown).sum())
    assert rep["bab_verdicts"].get("unsat", 0) == decided["unsat"]
    assert rep["violations"] == 0


def test_bab_budget_and_config(setup):
    net, ds = setup
    rep = evaluate(net, ds, EPS, methods=("ibp", "bab"), pgd_steps=5, batch=40, eps_grid=(),
                   budget_s=1e-9)
    # over its budget from the start: nothing decided, every handed sample counted as skipped
    assert rep["bab_verdicts"] == {}
    assert rep["budget_skipped"].get("bab", 0) > 0
    assert rep["certified_acc"]["ibp+bab"] == rep["certified_acc"]["ibp"]
    with pytest.raises(ValueError, match="bab_timeout"):
        evaluate(net, ds, EPS, methods=("bab",), bab_timeout=0)
    cfg = from_dict({"eval_methods": ["ibp", "bab"], "eval_bab_timeout_s": 5})
    assert cfg.eval_bab_timeout_s == 5.0
    with pytest.raises(ConfigError, match="eval_bab_timeout_s"):
        from_dict({"eval_bab_timeout_s": -1})


def test_pgd_restarts_only_lower_pgd_accuracy_and_never_below_the_exact(setup):
    net, ds = setup
    one = evaluate(net, ds, EPS, methods=("ibp",), pgd_steps=10, batch=40, eps_grid=())
    more = evaluate(net, ds, EPS, methods=("ibp",), pgd_steps=10, batch=40, eps_grid=(),
                    pgd_restarts=6)
    assert more["pgd_restarts"] == 6 and one["pgd_restarts"] == 1
    with torch.no_grad():
        right = (net(ds.x).argmax(1) == ds.y).nonzero().flatten().tolist()
    exact = sum(_exact_robust(net, ds.x[i], int(ds.y[i]), EPS) for i in right)
    # random starts only add attacks; no attack breaks a sample that is robust (MILP)
    assert exact / len(ds) <= more["pgd_acc"] <= one["pgd_acc"]
    assert more["violations"] == 0
    # the same verdicts as attacking every sample from the centre, then (where that failed) with
    # a run of 6 restarts whose first starts at the centre again: that run is not repeated
    from verifier.attack import pgd
    C = margin_spec(ds.y, 10)
    with torch.no_grad():
        ok = net(ds.x).argmax(1) == ds.y
    first = pgd(net, LpBall(ds.x, EPS, clip=(0.0, 1.0)), -C, steps=10, restarts=1, seed=0)
    held = (ok & (first.value < 0).all(1)).nonzero().flatten()
    again = pgd(net, LpBall(ds.x[held], EPS, clip=(0.0, 1.0)), -C[held], steps=10, restarts=6,
                seed=1)
    assert int((again.value < 0).all(1).sum()) / len(ds) == more["pgd_acc"]
    with pytest.raises(ValueError, match="pgd_restarts"):
        evaluate(net, ds, EPS, methods=("ibp",), pgd_restarts=0)
    with pytest.raises(ConfigError, match="eval_pgd_restarts"):
        from_dict({"eval_pgd_restarts": 0})
