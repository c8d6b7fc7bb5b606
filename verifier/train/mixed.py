"""Certified-training losses that mix an adversarial point with IBP bounds (``method`` mtl-ibp,
cc-ibp, sabr), beside the pure-bound losses of ``losses.py``.

Notation: ``x`` a sample, ``y`` its label, ``eps`` the current (ramped) radius, the ball
``B = {x' : |x' - x|_inf <= eps} ∩ [0, 1]^d``; ``z(x') = [f_y(x') - f_j(x')]_{j != y}`` the
logit differences (margins) at a point, ``m`` IBP's lower bounds of ``z`` over ``B``, and

    ce(v) = log(1 + sum_j exp(-v_j))   (``losses.robust_ce``; ``ce(z(x')) = CE(f(x'), y)``).

``x_adv`` is a PGD point (random start, ``steps`` sign steps) maximizing ``CE(f(x'), y)``.

* **MTL-IBP** (De Palma et al. 2024, "Expressive losses for verified robustness via convex
  combinations"): ``loss = (1 - alpha) * ce(z(x_adv)) + alpha * ce(m)``, a convex combination
  of the adversarial and the IBP (robust) cross-entropies.
* **CC-IBP** (same paper): ``loss = ce((1 - alpha) * z(x_adv) + alpha * m)``, the
  cross-entropy of the convex combination of the adversarial margins and their IBP lower bounds.
  Both reduce to adversarial training at ``alpha = 0`` and to IBP training at ``alpha = 1``;
  as ``m <= z(x_adv)``, both lie between the adversarial and the IBP loss.
* **SABR** (Mueller et al. 2023, "Certified training: small boxes are all you need"): with
  ``lo = max(x - eps, 0)``, ``hi = min(x + eps, 1)`` and the small radius
  ``r = min(lambda * eps, (hi - lo) / 2)`` (per pixel), ``x_adv`` is searched in the shrunk box
  ``[lo + r, hi - r]``, so that the small box ``S = [x_adv - r, x_adv + r]`` lies inside ``B``;
  ``loss = ce(m_S)`` with ``m_S`` IBP's margin lower bounds over ``S``. ``lambda = 1`` is IBP.

The adversarial margins ``z(x_adv)`` are those of the network being bounded: for a module in
training mode, its BatchNorm layers normalize by the clean batch's statistics, as in the live
graph of the bounds (``forward_with_stats``; no running-statistics update), so that
``m <= z(x_adv)`` holds for the same function. The attack itself runs on the module in eval mode
(running statistics), as the PGD term of ``losses.pgd_ce`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import BoundedModel, margin_spec
from ..devices import uniform
from ..errors import VerifierError
from ..perturbation import Box, LpBall
from ..projected_gradient import Variable, projected_gradient, sign_step
from .losses import robust_ce

MIXED_METHODS = ("mtl-ibp", "cc-ibp", "sabr")


def mtl_ibp_loss(adv_margins: torch.Tensor, ibp_lower: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * ce(z_adv) + alpha * ce(m)``, averaged over the batch; both ``[B, n-1]``."""
    return (1 - alpha) * robust_ce(adv_margins) + alpha * robust_ce(ibp_lower)


def cc_ibp_loss(adv_margins: torch.Tensor, ibp_lower: torch.Tensor, alpha: float) -> torch.Tensor:
    """``ce((1 - alpha) * z_adv + alpha * m)``, averaged over the batch; both ``[B, n-1]``."""
    return robust_ce((1 - alpha) * adv_margins + alpha * ibp_lower)


def pgd_in_box(net, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               steps: int, generator=None) -> torch.Tensor:
    """A point of the box ``[lo, hi]`` (``[B, *shape]``, ``lo <= hi``) maximizing the
    cross-entropy: a uniform random start in the box, then ``steps`` sign steps of 2.5 times
    the box's largest half-width / steps, each projected back into the box. Detached; the
    model's mode is left as it is. ``steps`` 0: the random start."""
    x0 = lo + uniform(x.shape, generator, x.dtype, x.device) * (hi - lo)
    if steps <= 0:
        return x0.detach()
    half = float((hi - lo).max()) / 2
    if half <= 0:
        return x0.detach()
    var = Variable(project=lambda z: torch.min(torch.max(z, lo), hi),
                   step=sign_step(2.5 * half / steps))
    run = projected_gradient(lambda xs: F.cross_entropy(net(xs["x"]), y), {"x": var},
                             lambda r, gen: {"x": x0.clone()}, steps, seed=None,
                             generator=generator, keep_best=False)
    return run.x["x"].detach()


def sabr_box(net, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float, steps: int,
             generator=None, clip=(0.0, 1.0)) -> Box:
    """SABR's small box ``[x_adv - r, x_adv + r]`` inside ``[lo, hi]`` (the eps ball clipped
    to ``clip``), ``r = min(lam * eps, (hi - lo) / 2)``, ``x_adv`` a PGD point of the shrunk
    box ``[lo + r, hi - r]`` (see the module doc)."""
    lo, hi = (x - eps).clamp(*clip), (x + eps).clamp(*clip)
    r = torch.minimum(torch.full_like(x, lam * eps), (hi - lo) / 2)
    inner_lo, inner_hi = lo + r, torch.max(hi - r, lo + r)
    xa = pgd_in_box(net, x, y, inner_lo, inner_hi, steps, generator)
    # the clamps only absorb rounding: xa - r >= lo and xa + r <= hi in exact arithmetic
    return Box(torch.max(xa - r, lo), torch.min(xa + r, hi))


def forward_with_stats(net, x: torch.Tensor, batch_stats: dict | None) -> torch.Tensor:
    """``net(x)`` with every BatchNorm layer named in ``batch_stats`` (``{name: (mean [C],
    var [C])}``, from ``graph.live.BatchStats``) computing ``(x - mean) / sqrt(var + eps) *
    gamma + beta`` with those statistics (differentiable in them); the module runs in eval mode
    (no running-statistics update, no dropout) and gets its mode back. Without statistics: the
    module in eval mode (running statistics), as the bounds of an eval-mode module."""
    mods = dict(net.named_modules())
    handles = []

    def hook(mean, var):
        def h(mod, args, out):
            z = args[0]
            shape = [1, -1] + [1] * (z.ndim - 2)
            out = (z - mean.view(shape)) / torch.sqrt(var.view(shape) + mod.eps)
            if mod.affine:
                out = out * mod.weight.view(shape) + mod.bias.view(shape)
            return out
        return h
    for name, (mean, var) in (batch_stats or {}).items():
        handles.append(mods[name].register_forward_hook(hook(mean, var)))
    mode = net.training
    net.eval()
    try:
        return net(x)
    finally:
        net.train(mode)
        for h in handles:
            h.remove()


def adversarial_margins(bm: BoundedModel, x_adv: torch.Tensor, y: torch.Tensor, n_classes: int,
                        batch_stats=None) -> torch.Tensor:
    """``z(x_adv)``: the margins ``f_y - f_j`` at the points, ``[B, n-1]``, on the live graph
    (differentiable in the parameters; training-mode BatchNorm with ``batch_stats``). The same
    values as ``forward_with_stats`` (which the loss uses: on ``cnn_cert`` the graph's point
    evaluation costs about 4 times the module's forward pass)."""
    C = margin_spec(y, n_classes, dtype=x_adv.dtype)
    return bm.bounds(x_adv, "ibp", spec=C, live=True, batch_stats=batch_stats).lower


def mixed_loss(net, bm: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
               n_classes: int, alpha: float = 0.5, lam: float = 0.4, steps: int = 1,
               generator=None, batch_stats=None, clip=(0.0, 1.0)) -> tuple[torch.Tensor, dict, dict]:
    """-> (the loss of ``method`` (one of ``MIXED_METHODS``) at radius ``eps > 0``, the IBP
    node intervals it bounded (the eps ball's, SABR: the small box's), logged values).
    The attack runs with ``net`` in eval mode; the mode is restored afterwards."""
    if method not in MIXED_METHODS:
        raise VerifierError(f"mixed_loss: method {method!r} is not one of {', '.join(MIXED_METHODS)}")
    mode = net.training
    net.eval()
    try:
        if method == "sabr":
            box = sabr_box(net, x, y, eps, lam, steps, generator, clip)
        else:
            lo, hi = (x - eps).clamp(*clip), (x + eps).clamp(*clip)
            xa = pgd_in_box(net, x, y, lo, hi, steps, generator)
    finally:
        net.train(mode)
    C = margin_spec(y, n_classes, dtype=x.dtype)
    if method == "sabr":
        res = bm.bounds(box, "ibp", spec=C, live=True, batch_stats=batch_stats)
        loss = robust_ce(res.lower)
        return loss, res.nodes, {"box_cert": float((res.lower.detach() > 0).all(1).float().mean())}
    res = bm.bounds(LpBall(x, eps, clip=clip), "ibp", spec=C, live=True, batch_stats=batch_stats)
    z = (C @ forward_with_stats(net, xa, batch_stats).unsqueeze(-1)).squeeze(-1)
    loss = (mtl_ibp_loss if method == "mtl-ibp" else cc_ibp_loss)(z, res.lower, alpha)
    return loss, res.nodes, {"adv_acc": float((z.detach() > 0).all(1).float().mean()),
                             "cert": float((res.lower.detach() > 0).all(1).float().mean())}
