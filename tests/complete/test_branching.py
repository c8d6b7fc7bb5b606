"""Branching of ReLU-split branch and bound: the filtered-smart-branching estimates are sound
bounds of the children they estimate (checked on sampled and PGD points of each child), the
chosen neuron is always an unstable, unsplit one, and the choice is never worse by its own
estimate than the BaBSR-like score's; unsat verdicts with each branching agree with an exact
MILP (``test_relu_bab.test_unsat_agrees_with_milp``)."""
import pytest
import torch

from verifier import BoundedModel
from verifier.complete.branching import (child_estimates, choose, fsb, most_open_row, scores,
                                         shortlist, top_neuron, worse_child)
from verifier.complete.relu_bab import ReluPrepared

from test_relu_bab import _matching, _net, _pgd_points, _pre_activations, _random_splits


def _problem(seed, hidden=(12, 12, 12), n_in=6, n=16, branching="fsb"):
    net = _net(seed, hidden=hidden, n_in=n_in)
    bm = BoundedModel(net, input_shape=(n_in,))
    lo, hi = -torch.ones(n_in), torch.ones(n_in)
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([0.0])],
                     branching=branching)
    d_lo, d_up, sg = _random_splits(P, net, n, seed)
    res = P.bound(d_lo, d_up, sg, first_split=0, iterations=10)
    return net, P, res, sg


def _points(net, lo, hi, seed, n=30_000):
    g = torch.Generator().manual_seed(seed)
    x = lo + torch.rand(n, lo.shape[0], generator=g) * (hi - lo)
    x = torch.cat([x, _pgd_points(net, x[:200], lo, hi)])
    with torch.no_grad():
        return _pre_activations(net, x)


@pytest.mark.parametrize("seed", range(3))
def test_child_estimates_hold_on_each_childs_points(seed):
    net, P, res, sg = _problem(seed)
    n = res["margin"].shape[0]
    row = most_open_row(P, res["margin"])
    babsr, gap = scores(P, res, sg, row)
    idx, valid = shortlist(P, (babsr, gap), (3, 2))
    est = child_estimates(P, res, sg, row, idx, valid)              # [n, k, 2]
    pre, y = _points(net, P.lower, P.upper, seed)
    in_domain = _matching(pre, sg, P.relus)                         # [n, points]
    flat = torch.cat([z for z in pre], 1)                           # [points, all neurons]
    checked = 0
    for b in range(n):
        for c in range(idx.shape[1]):
            if not valid[b, c]:
                continue
            z = flat[:, idx[b, c]]
            for side, ok in ((0, z >= 0), (1, z <= 0)):
                pts = (in_domain[b] & ok).nonzero().flatten()
                if pts.numel() == 0:
                    continue
                checked += 1
                true_min = float(y[pts, 0].min())
                assert float(est[b, c, side]) <= true_min + 1e-4, (b, c, side)
    assert checked >= n


@pytest.mark.parametrize("seed", range(3))
def test_chosen_neuron_is_unstable_and_unsplit(seed):
    net, P, res, sg = _problem(seed)
    for method in ("fsb", "babsr"):
        which, local = choose(P, res, sg, method)
        for b in range(which.shape[0]):
            if int(which[b]) < 0:
                # none left: every neuron stable or split in that domain
                for r in P.relus:
                    p = P.pre[r]
                    free = (res["lo"][p][b] < 0) & (res["up"][p][b] > 0) & (sg[r][b] == 0)
                    assert not bool(free.any())
                continue
            r = P.relus[int(which[b])]
            p = P.pre[r]
            j = int(local[b])
            assert float(res["lo"][p][b].flatten()[j]) < 0 < float(res["up"][p][b].flatten()[j])
            assert int(sg[r][b].flatten()[j]) == 0


def test_fsb_choice_is_at_least_as_good_as_babsr_by_the_estimate():
    net, P, res, sg = _problem(5, hidden=(16, 16, 16), n=24)
    row = most_open_row(P, res["margin"])
    babsr, gap = scores(P, res, sg, row)
    which_b, local_b = top_neuron(P, babsr)
    which_f, local_f = fsb(P, res, sg)
    live = which_b >= 0
    assert bool((live == (which_f >= 0)).all())
    off = torch.tensor(P.offsets)

    def score(which, local):
        idx = (off[which.clamp(min=0)] + local).unsqueeze(1)
        return worse_child(P, res, sg, row, idx, live.unsqueeze(1), babsr)[:, 0]

    eb, ef = score(which_b, local_b), score(which_f, local_f)
    assert bool((ef[live] >= eb[live] - 1e-5).all())
    # and on some domain it picks a strictly better neuron than the score alone
    assert bool((ef[live] > eb[live] + 1e-4).any())


def test_unknown_branching_is_a_value_error():
    net = _net(0, hidden=(4,), n_in=3)
    bm = BoundedModel(net, input_shape=(3,))
    with pytest.raises(ValueError, match="branching"):
        ReluPrepared(bm, -torch.ones(3), torch.ones(3), [torch.tensor([[1.0]])],
                     [torch.tensor([0.0])], branching="random")
