"""Certified-training losses on bounds from the core engine (``BoundedModel.bounds(live=True)``).

For a sample ``(x, y)`` and the margin spec ``C`` (rows ``e_y - e_j``, j != y), a sound lower
bound ``m_j <= f_y(x') - f_j(x')`` for all ``x'`` in the ball gives the robust cross-entropy

    robust_ce = CE([0, -m_1, ..., -m_{n-1}], class 0) = log(1 + sum_j exp(-m_j)),

an upper bound on the cross-entropy of every ``x'`` in the ball (the worst-case logits, with
the true class at 0 and class j at ``-m_j``). The margin lower bound is IBP's, or CROWN-IBP's
mixed with IBP's: ``m = beta * m_crown_ibp + (1 - beta) * m_ibp`` (any convex mix of sound lower
bounds is sound). The training loss is ``kappa * natural_ce + (1 - kappa) * robust_ce``.

Warm-up regularizers (used while eps ramps up, after Shi et al. 2021), computed from the IBP
intervals ``[l, u]`` (center c, radius r) of each ReLU's input:
* ``tightness``: per pre-activation layer k, the growth of the mean radius over the previous
  one (the input's for the first), ``g_k = mean r_k / mean r_{k-1}``; penalty
  ``mean_k relu(g_k - tau)``: intervals must not blow up with depth;
* ``balance``: ``mean_k (mean c_k / mean(|c_k| + r_k))^2``: pre-activations neither mostly
  active nor mostly dead (a dead layer kills the gradient, an all-active one is linear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import BoundedModel, margin_spec
from ..devices import uniform
from ..ops import RULES
from ..perturbation import LpBall
from ..projected_gradient import Variable, projected_gradient, sign_step


def robust_ce(margin_lower: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(-m_j))`` per sample, averaged; ``margin_lower: [B, n-1]``."""
    z = torch.cat([torch.zeros_like(margin_lower[:, :1]), -margin_lower], 1)
    return torch.logsumexp(z, 1).mean()


def relu_inputs(bm: BoundedModel) -> list[str]:
    """Names of the nodes read by a ReLU-like activation (a kink at 0 that branch and bound may
    split: ReLU, LeakyReLU), in topological order."""
    g = bm.graph
    return [n for n in g.order if any(RULES[c.op].splittable for c in g.consumers(n))]


def warmup_regularizers(bm: BoundedModel, nodes: dict, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tightness, balance) from the IBP intervals ``nodes`` (see the module doc)."""
    names = relu_inputs(bm)
    prev = nodes[bm.input].radius.mean()
    tight, bal = [], []
    for n in names:
        iv = nodes[n]
        c, r = iv.center, iv.radius
        rm = r.mean()
        tight.append(F.relu(rm / prev.clamp(min=1e-12) - tau))
        bal.append((c.mean() / (c.abs() + r).mean().clamp(min=1e-12)) ** 2)
        prev = rm
    if not names:
        z = nodes[bm.input].lower.new_zeros(())
        return z, z
    return torch.stack(tight).mean(), torch.stack(bal).mean()


def certified_margins(bm: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float,
                      method: str, n_classes: int, clip=(0.0, 1.0), batch_stats=None, weights=None):
    """-> (margin lower bounds ``[B, n-1]``, IBP node intervals): IBP's, or CROWN-IBP's mixed
    with IBP's by ``beta`` (method "crown-ibp"); differentiable in the model's parameters.
    ``weights``: a weight perturbation (``verifier.weights``) centered at the current
    parameters: the bounds then hold for every model in that set too (flatness training);
    with ``eps`` 0 the input is fixed."""
    C = margin_spec(y, n_classes, dtype=x.dtype)
    ball = LpBall(x, eps, clip=clip) if eps > 0 or weights is None else x
    res = bm.bounds(ball, "ibp", spec=C, live=True, batch_stats=batch_stats, weights=weights)
    lower = res.lower
    if method == "crown-ibp" and beta > 0:
        # the IBP intervals just computed are CROWN-IBP's intermediate bounds; the loss reads
        # only lower bounds of the spec rows: one lower-side backward pass
        cres = bm.bounds(ball, "crown-ibp", spec=C, live=True, batch_stats=batch_stats,
                         weights=weights, intervals=res.nodes, upper=False)
        lower = beta * cres.lower + (1 - beta) * lower if beta < 1 else cres.lower
    return lower, res.nodes


def pgd_ce(net, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, generator=None,
           clip=(0.0, 1.0)) -> torch.Tensor:
    """An L-inf PGD point maximizing the cross-entropy (random start, sign steps of 2.5 eps /
    steps), for the adversarial loss term; the model's mode is left as it is."""
    if eps <= 0 or steps <= 0:
        return x
    lo, hi = (x - eps).clamp(*clip), (x + eps).clamp(*clip)

    def start(r, gen):
        noise = uniform(x.shape, gen, x.dtype, x.device) * 2 - 1
        return {"x": (x + eps * noise).clamp(lo, hi)}

    var = Variable(project=lambda z: torch.min(torch.max(z, lo), hi),
                   step=sign_step(2.5 * eps / steps))
    run = projected_gradient(lambda xs: F.cross_entropy(net(xs["x"]), y), {"x": var}, start,
                             steps, seed=None, generator=generator, keep_best=False)
    return run.x["x"].detach()
