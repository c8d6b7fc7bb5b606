"""alpha-CROWN: sound (sampling + PGD), never looser than CROWN, and tighter somewhere."""
import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel, LpBall, margin_spec


def _nets():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.LeakyReLU(0.1),
                        nn.Linear(20, 4)), (6,)
    yield nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10),
                        nn.ReLU(), nn.Linear(10, 5)), (1, 9, 9)


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("norm", ["inf", 2])
def test_alpha_crown_is_sound_and_never_looser_than_crown(i, norm):
    net, shape = list(_nets())[i]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    torch.manual_seed(1)
    x = torch.rand(2, *shape)
    eps = 0.15 if norm == "inf" else 0.5
    ball = LpBall(x, eps, norm=norm)
    n_out = bm.output_shape[0]
    for spec in (None, margin_spec([0, 2], n_out, dtype=torch.float64)):
        rep = check_sound(bm, ball, spec=spec, methods=("crown", "alpha-crown"), check_nodes=False)
        a, c = rep.results["alpha-crown"], rep.results["crown"]
        assert (a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all()


def test_alpha_crown_tightens_an_unstable_net():
    net, shape = list(_nets())[0]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    ball = linf(torch.rand(1, *shape), 0.3)
    C = margin_spec([1], 4, dtype=torch.float64)
    a = bm.bounds(ball, "alpha-crown", spec=C)
    c = bm.bounds(ball, "crown", spec=C)
    assert (a.lower - c.lower).max() > 1e-4


@pytest.mark.parametrize("i", [0, 1])
def test_alpha_crown_intermediate_bounds_sound_tighter_and_never_looser(i):
    """The pre-activation bounds are optimized layer by layer: every node's interval contains
    sampled and PGD values, is inside CROWN's, and is strictly tighter somewhere."""
    net, shape = list(_nets())[i]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    torch.manual_seed(2)
    ball = linf(torch.rand(2, *shape), 0.3)
    rep = check_sound(bm, ball, spec=margin_spec([1, 3], bm.output_shape[0], dtype=torch.float64),
                      methods=("crown", "alpha-crown"), node_neurons=8)
    a, c = rep.results["alpha-crown"], rep.results["crown"]
    tighter = False
    for name, iv in a.nodes.items():
        ref = c.nodes[name]
        assert (iv.lower >= ref.lower - 1e-9).all() and (iv.upper <= ref.upper + 1e-9).all(), name
        tighter |= bool(((iv.lower > ref.lower + 1e-6) | (iv.upper < ref.upper - 1e-6)).any())
    assert tighter


def test_alpha_crown_intermediate_chunks_give_the_same_bounds(monkeypatch):
    """Rows of a node are optimized independently, so chunking them changes nothing."""
    import verifier.bounds.alpha as alpha
    net, shape = list(_nets())[0]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    torch.manual_seed(3)
    ball = linf(torch.rand(1, *shape), 0.3)
    C = margin_spec([2], 4, dtype=torch.float64)
    whole = bm.bounds(ball, "alpha-crown", spec=C)
    monkeypatch.setattr(alpha, "INTERMEDIATE_CHUNK", 3 * 60)  # one row per chunk here
    parts = bm.bounds(ball, "alpha-crown", spec=C)
    assert torch.allclose(whole.lower, parts.lower, atol=1e-6)
    for name in whole.nodes:
        assert torch.allclose(whole[name].lower, parts[name].lower, atol=1e-6)


def test_slope_gradients_match_finite_differences_for_both_directions():
    """The backward pass is differentiable in the slopes of both bound directions (a view that
    stacked the lower and upper A once dropped the upper half's gradient)."""
    from verifier.bounds.alpha import _slopes
    from verifier.bounds.crown import backward_bound, crown_bounds
    torch.manual_seed(4)
    # consecutive affine ops (Flatten, Linear) pass the two halves of one A between them
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                        nn.Linear(20, 4))
    shape = (2, 3)
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    leaves = bm._leaves(linf(torch.rand(1, *shape), 0.4))
    _, _, bounds = crown_bounds(bm.graph, leaves, None)
    out = bm.graph.output
    C = torch.eye(4, dtype=torch.float64).unsqueeze(0)
    alphas, _ = _slopes(bm.graph, bounds, out, 1, 4, torch.float64)
    assert alphas
    g = torch.Generator().manual_seed(0)
    start = {k: tuple((0.2 + 0.6 * torch.rand(a.shape, generator=g, dtype=torch.float64))
                      for a in pair) for k, pair in alphas.items()}
    for d in (0, 1):  # 0: slopes of the lower bound, 1: of the upper bound
        params = {k: tuple(a.clone().requires_grad_(True) for a in pair) for k, pair in start.items()}
        with torch.enable_grad():
            lo, up = backward_bound(bm.graph, out, C, bounds, leaves, alpha=params)
            value = (lo if d == 0 else up).sum()
            grads = torch.autograd.grad(value, [pair[d] for pair in params.values()])
        for (k, pair), gr in zip(start.items(), grads):
            for i in range(0, pair[d].numel(), 7):
                moved = {kk: tuple(a.clone() for a in pp) for kk, pp in start.items()}
                moved[k][d].view(-1)[i] += 1e-6
                l2, u2 = backward_bound(bm.graph, out, C, bounds, leaves, alpha=moved)
                fd = float(((l2 if d == 0 else u2).sum() - value) / 1e-6)
                assert abs(fd - float(gr.flatten()[i])) < 1e-4 * (1 + abs(fd)), (k, d, i)


@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_s_shaped_tangent_lines_hold_at_every_position(op):
    """Sigmoid / tanh lines at any tangent positions in [0, 1] (random, and both ends) must
    stay below / above f on the whole interval: on a dense grid of each of 600 intervals that
    are negative, positive, mixed, narrow and wide."""
    from verifier.bound_types import Interval
    from verifier.ops import RULES
    from types import SimpleNamespace
    rule, node = RULES[op], SimpleNamespace(name="act")
    g = torch.Generator().manual_seed(0)
    c = (torch.rand(600, generator=g, dtype=torch.float64) - 0.5) * 12
    w = torch.rand(600, generator=g, dtype=torch.float64) ** 3 * 10 + 1e-7
    x = Interval((c - w / 2).view(1, 600), (c + w / 2).view(1, 600))
    taus = [torch.rand(2, 1, 3, 600, generator=g, dtype=torch.float64),
            torch.zeros(2, 1, 1, 600, dtype=torch.float64), torch.ones(2, 1, 1, 600, dtype=torch.float64)]
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64).view(-1, 1)
    pts = x.lower + grid * (x.upper - x.lower)                       # [2001, 600]
    f = rule.f(None, pts)
    free_l, _, _, free_u, _, _ = rule.tangent_ranges(node, x)
    assert bool(free_l.any()) and bool(free_u.any())
    for tau in taus:
        kl, bl, ku, bu = rule._lines(node, x, tau)                   # [1, S, 600]
        for s in range(kl.shape[1]):
            low = kl[0, s] * pts + bl[0, s]
            up = ku[0, s] * pts + bu[0, s]
            assert float((low - f).max()) <= 1e-12, "a lower line above f"
            assert float((f - up).max()) <= 1e-12, "an upper line below f"


def test_alpha_crown_tangents_are_sound_never_looser_and_tighter_on_s_shaped_nets():
    torch.manual_seed(0)
    for act in (nn.Sigmoid, nn.Tanh):
        net = nn.Sequential(nn.Linear(6, 20), act(), nn.Linear(20, 20), act(), nn.Linear(20, 4))
        bm = BoundedModel(net, input_shape=(6,), dtype=torch.float64)
        ball = LpBall(torch.rand(2, 6), 0.5)
        rep = check_sound(bm, ball, spec=margin_spec([0, 2], 4, dtype=torch.float64),
                          methods=("crown", "alpha-crown"), node_neurons=8)
        a, c = rep.results["alpha-crown"], rep.results["crown"]
        assert (a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all()
        assert float((a.lower - c.lower).mean()) > 1e-4, act.__name__


def test_max_pool_lower_lines_hold_for_any_weights():
    """A max pool's lower line may be any convex combination of a window's real elements: with
    random weights (some windows all zero: CROWN's element), the bounds of every output must
    contain the values at sampled points and at the box's corners."""
    from verifier.bounds.crown import backward_bound, crown_bounds
    torch.manual_seed(0)
    net = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1))
    bm = BoundedModel(net, input_shape=(2, 7, 7), dtype=torch.float64)
    ball = LpBall(torch.randn(2, 2, 7, 7), 0.8)
    leaves = bm._leaves(ball)
    _, _, bounds = crown_bounds(bm.graph, leaves, None)
    pool = next(n.name for n in bm.graph if n.op == "maxpool")
    n_out = 2 * 4 * 4
    C = torch.eye(n_out, dtype=torch.float64).view(1, n_out, 2, 4, 4).expand(2, -1, -1, -1, -1)
    g = torch.Generator().manual_seed(1)
    x = ball.interval()
    pts = x.lower + torch.rand(4000, *x.lower.shape, generator=g, dtype=torch.float64) * (x.upper - x.lower)
    with torch.no_grad():
        y = net(pts.flatten(0, 1)).view(4000, 2, -1)
    for trial in range(3):
        w = torch.rand(2, n_out, 2, 9, 16, generator=g, dtype=torch.float64)
        w = w * (torch.rand(w.shape, generator=g, dtype=torch.float64) < 0.5)   # sparse, some all zero
        lo, up = backward_bound(bm.graph, bm.graph.output, C, bounds, leaves, alpha={pool: (w, w)})
        assert bool((y >= lo.unsqueeze(0) - 1e-9).all()), "a lower bound above a sampled value"
        assert bool((y <= up.unsqueeze(0) + 1e-9).all()), "an upper bound below a sampled value"


def test_alpha_crown_pool_weights_are_sound_never_looser_and_tighter():
    from verifier.ops.pooling import MaxPool
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    bm = BoundedModel(net, input_shape=(1, 10, 10), dtype=torch.float64)
    ball = LpBall(torch.rand(2, 1, 10, 10), 0.1)
    spec = margin_spec([0, 2], 5, dtype=torch.float64)
    rep = check_sound(bm, ball, spec=spec, methods=("crown", "alpha-crown"), node_neurons=8)
    a, c = rep.results["alpha-crown"], rep.results["crown"]
    assert (a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all()
    gain = float((a.lower - c.lower).mean())
    # the same without the pool weights (the rule says it has no freedom): most of the gain is theirs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MaxPool, "alpha_init", lambda self, node, inputs, B, S, dtype: None)
        slopes_only = float((bm.bounds(ball, "alpha-crown", spec=spec).lower - c.lower).mean())
    assert gain > 2 * slopes_only + 1e-3
