"""Certified-training losses on bounds from the core engine (``BoundedModel.bounds(live=True)``).

For a sample ``(x, y)`` and the margin spec ``C`` (rows ``e_y - e_j``, j != y), a sound lower
bound ``m_j <= f_y(x') - f_j(x')`` for all ``x'`` in the ball gives the robust cross-entropy

    robust_ce = CE([0, -m_1, ..., -m_{n-1}], class 0) = log(1 + sum_j exp(-m_j)),

an upper bound on the cross-entropy of every ``x'`` in the ball (the worst-case logits, with
the true class at 0 and class j at ``-m_j``). The margin lower bound is IBP's, or CROWN-IBP's
mixed with IBP's: ``m = beta * m_crown_ibp + (1 - beta) * m_ibp`` (any convex mix of sound lower
bounds is sound). The training loss is ``kappa * natural_ce + (1 - kappa) * robust_ce``.

Loss fusion (``loss_fusion``, CROWN-IBP only; after Xu et al. 2020, "Automatic perturbation
analysis for scalable certified robustness and beyond") bounds the cross-entropy itself with
one CROWN-IBP row per sample instead of one per margin. With ``d_j = f_j - f_y`` and IBP's
``l_j <= d_j <= u_j`` over the ball, a shift ``M >= 0`` and, since exp is convex, its chord
``exp(d - M) <= a_j + b_j d`` on ``[l_j, u_j]``:

    CE(x') = M + log(exp(-M) + sum_{j != y} exp(d_j - M))
          <= M + log(A + sum_j b_j d_j(x'))            A = exp(-M) + sum_j a_j
          <= M + log(A + Lambda)                        log is increasing

where ``Lambda`` is CROWN-IBP's upper bound on the single linear function ``sum_j b_j (f_j - f_y)``
over the ball. The backward pass carries 1 row instead of n - 1 (about 9x less work on 10
classes); the bound can be looser than the per-margin one where IBP's ``[l_j, u_j]`` is wide
(the chord of exp is then far above it).

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


def robust_ce_per_sample(margin_lower: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(-m_j))`` per sample ``[B]``; ``margin_lower: [B, n-1]``."""
    z = torch.cat([torch.zeros_like(margin_lower[:, :1]), -margin_lower], 1)
    return torch.logsumexp(z, 1)


def robust_ce(margin_lower: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(-m_j))`` per sample, averaged; ``margin_lower: [B, n-1]``."""
    return robust_ce_per_sample(margin_lower).mean()


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


def _ibp_margins(bm: BoundedModel, x, y, eps, n_classes, clip, batch_stats, weights):
    """-> (margin spec C, the perturbation set, IBP's live bounds of C f over it): the input
    ball (the point itself when only the weights move)."""
    C = margin_spec(y, n_classes, dtype=x.dtype)
    ball = LpBall(x, eps, clip=clip) if eps > 0 or weights is None else x
    return C, ball, bm.bounds(ball, "ibp", spec=C, live=True, batch_stats=batch_stats,
                              weights=weights)


def certified_margins(bm: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float,
                      method: str, n_classes: int, clip=(0.0, 1.0), batch_stats=None, weights=None):
    """-> (margin lower bounds ``[B, n-1]``, IBP node intervals): IBP's, or CROWN-IBP's mixed
    with IBP's by ``beta`` (method "crown-ibp"); differentiable in the model's parameters.
    ``weights``: a weight perturbation (``verifier.weights``) centered at the current
    parameters: the bounds then hold for every model in that set too (flatness training);
    with ``eps`` 0 the input is fixed."""
    C, ball, res = _ibp_margins(bm, x, y, eps, n_classes, clip, batch_stats, weights)
    lower = res.lower
    if method == "crown-ibp" and beta > 0:
        # the IBP intervals just computed are CROWN-IBP's intermediate bounds; the loss reads
        # only lower bounds of the spec rows: one lower-side backward pass
        cres = bm.bounds(ball, "crown-ibp", spec=C, live=True, batch_stats=batch_stats,
                         weights=weights, intervals=res.nodes, upper=False)
        lower = beta * cres.lower + (1 - beta) * lower if beta < 1 else cres.lower
    return lower, res.nodes


def fused_robust_ce(bm: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float,
                    n_classes: int, clip=(0.0, 1.0), batch_stats=None, weights=None):
    """-> (per-sample upper bound ``[B]`` of the cross-entropy over the ball, the IBP margin
    lower bounds ``[B, n-1]``, IBP node intervals): CROWN-IBP with loss fusion (module doc),
    mixed with IBP's robust cross-entropy by ``beta`` (a convex mix of two upper bounds);
    differentiable in the model's parameters."""
    C, ball, res = _ibp_margins(bm, x, y, eps, n_classes, clip, batch_stats, weights)
    ibp_ce = robust_ce_per_sample(res.lower)
    if beta <= 0:
        return ibp_ce, res.lower, res.nodes
    lo, hi = -res.upper, -res.lower                       # d_j = f_j - f_y, j != y
    m = hi.detach().amax(1, keepdim=True).clamp(min=0)    # any shift is exact; this one avoids overflow
    el, eh = torch.exp(lo - m), torch.exp(hi - m)
    w = hi - lo
    narrow = w < 1e-6
    # the chord's slope; on a (near) point interval the tangent's, which is the same line there
    b = torch.where(narrow, torch.exp((lo + hi) / 2 - m), (eh - el) / torch.where(narrow, 1.0, w))
    a = el - b * lo
    big_a = torch.exp(-m).squeeze(1) + a.sum(1)
    # -sum_j b_j (f_j - f_y) = sum_j b_j (row j of C) . f: its lower bound is -Lambda
    spec = (b.unsqueeze(2) * C).sum(1, keepdim=True)      # [B, 1, n]
    cres = bm.bounds(ball, "crown-ibp", spec=spec, live=True, batch_stats=batch_stats,
                     weights=weights, intervals=res.nodes, upper=False)
    lam = -cres.lower[:, 0]
    tiny = torch.finfo(x.dtype).tiny
    fused = m.squeeze(1) + torch.log((big_a + lam).clamp(min=tiny))
    # never worse than IBP's own bound (both are sound upper bounds)
    fused = torch.minimum(fused, ibp_ce)
    ce = beta * fused + (1 - beta) * ibp_ce if beta < 1 else fused
    return ce, res.lower, res.nodes


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
