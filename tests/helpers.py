"""Shared machinery of the soundness tests.

The one check every rule and method must pass: for a model ``f``, a perturbation set ``S`` and an
optional spec ``C``, every bound the verifier returns (the output's ``C·f`` and every intermediate
node in ``result.nodes``) contains the true values at

- many points of ``S``: random points, vertices of the box (Box, L-inf; random sign patterns),
  points on the L2 sphere / L1 vertices ``c ± eps e_i`` (then clipped), and the center;
- PGD points (``verifier.attack.pgd``) that maximize and minimize every bounded output quantity and
  a random subset of every intermediate node's neurons.

True values come from a float64 copy of the model run by ``torch.fx.Interpreter`` over the same
fx trace the verifier built its graph from (node names are fx node names, so
``result.nodes[name]`` and the recorded ``values[name]`` line up).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from verifier import BoundedModel, Box, LpBall, margin_spec
from verifier.attack import inside, pgd
from verifier.bounds.forward import evaluate

METHODS = ("ibp", "crown", "crown-ibp")


# --- the reference model ---------------------------------------------------------------------
from verifier.graph.trace import _Recorder  # noqa: E402  (the same value recorder)


class Reference:
    """The float64 twin of a BoundedModel's source module, evaluated node by node.

    ``outputs(x)``: ``[N, *out]``; ``nodes(x)``: fx node name -> value ``[N, *shape]``.
    """

    def __init__(self, bm: BoundedModel):
        module = bm.module
        if isinstance(module, fx.GraphModule):
            gm = module
        else:  # the same trace as verifier.graph.trace.build_graph
            try:
                gm = fx.symbolic_trace(module)
            except Exception:
                gm = fx.symbolic_trace(torch.nn.Sequential(module))
        self.gm = copy.deepcopy(gm).double().eval()
        for name, v in list(vars(self.gm).items()):  # plain tensor attributes (fx constants)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(self.gm, name, v.double())

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gm(x.double())
        return out[0] if isinstance(out, (list, tuple)) else out

    def nodes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rec = _Recorder(self.gm)
        rec.run(x.double())
        return {k: v for k, v in rec.values.items() if isinstance(v, torch.Tensor)}


# --- points of a perturbation set ------------------------------------------------------------
def model_perturbation(bm: BoundedModel, p):
    """The set as the model sees it: inputs reshaped to ``[B, *input_shape]``, in the model's
    dtype (the same set ``BoundedModel.bounds`` bounds over)."""
    if isinstance(p, Box):
        return Box(bm.check_input(p.lower, "box lower"), bm.check_input(p.upper, "box upper"))
    return LpBall(bm.check_input(p.center, "center"), p.eps, p.norm, p.clip).to(bm.dtype)



def _geometry(p):
    if isinstance(p, Box):
        return math.inf, p.lower, p.upper, None
    if p.norm == math.inf:
        box = p.interval()
        return math.inf, box.lower, box.upper, None
    return p.norm, None, None, torch.as_tensor(p.eps, dtype=p.center.dtype)


def extreme_points(p, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points on the boundary of the set, ``[n, B, *shape]``: random vertices of a box (and
    of the L-inf ball, clipped or not); for L2 points on the sphere, for L1 the vertices
    ``c ± eps e_i``, both then clamped to the clip box (which keeps them in the ball: the clamp
    moves each coordinate towards the center, that lies in the clip box)."""
    norm, lo, hi, eps = _geometry(p)
    if norm == math.inf:
        pick = torch.rand((n, *lo.shape), generator=gen) < 0.5
        return torch.where(pick, lo.unsqueeze(0), hi.unsqueeze(0))
    c = p.center
    B = c.shape[0]
    e = eps.expand(B) if eps.ndim == 0 else eps
    e = e.view(1, B, *([1] * (c.ndim - 1)))
    if norm == 2.0:
        g = torch.randn((n, *c.shape), generator=gen, dtype=c.dtype)
        g = g / torch.linalg.vector_norm(g.flatten(2), dim=-1).view(n, B, *([1] * (c.ndim - 1)))
    else:
        flat = torch.zeros((n, B, c[0].numel()), dtype=c.dtype)
        i = torch.randint(0, flat.shape[-1], (n, B, 1), generator=gen)
        s = torch.where(torch.rand((n, B, 1), generator=gen) < 0.5, -1.0, 1.0).to(c.dtype)
        g = flat.scatter(2, i, s).view(n, *c.shape)
    x = c.unsqueeze(0) + e * g
    if p.clip is not None:
        x = torch.minimum(torch.maximum(x, p.clip[0]), p.clip[1])
    return x


def sample_points(p, n_random: int = 128, n_extreme: int = 64, seed: int = 0) -> torch.Tensor:
    """Random points, boundary points and the center of the set: ``[n, B, *shape]``, all inside."""
    gen = torch.Generator().manual_seed(seed)
    pts = [p.sample(n_random, generator=gen), extreme_points(p, n_extreme, gen)]
    center = (p.lower + p.upper) / 2 if isinstance(p, Box) else p.center
    pts.append(center.unsqueeze(0))
    x = torch.cat([t.to(pts[0].dtype) for t in pts], 0)
    ok = inside(p, x.transpose(0, 1), rtol=1e-6)
    assert bool(ok.all()), "a sampled point lies outside the perturbation set (test bug)"
    return x


# --- the check --------------------------------------------------------------------------------
@dataclass
class Violation:
    what: str
    worst: float
    details: str = ""


@dataclass
class SoundnessReport:
    results: dict = field(default_factory=dict)      # method -> BoundResult
    checked_nodes: set = field(default_factory=set)
    n_points: int = 0


def _tol(bound: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    return atol + rtol * bound.abs()


def _excess(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, rtol, atol):
    """values: [n, B, *s]; lower/upper: [B, *s] -> largest violation beyond tolerance (<= 0 ok)."""
    below = (lower.unsqueeze(0) - _tol(lower, rtol, atol).unsqueeze(0)) - values
    above = values - (upper.unsqueeze(0) + _tol(upper, rtol, atol).unsqueeze(0))
    return torch.maximum(below, above)


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol): about 1e-5 in float32, 1e-8 in float64."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-8, 1e-8)


def _flat_spec_values(y: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """y: [n, B, *out] -> C·y: [n, B, S] (or y itself without a spec)."""
    if C is None:
        return y
    return torch.einsum("bsk,nbk->nbs", C.flatten(2).double(), y.flatten(2))


def check_sound(bm: BoundedModel, perturbation, spec: torch.Tensor | None = None,
                methods=METHODS, n_random: int = 128, n_extreme: int = 64, pgd_steps: int = 20,
                restarts: int = 2, node_neurons: int = 6, seed: int = 0,
                rtol: float | None = None, atol: float | None = None,
                check_nodes: bool = True) -> SoundnessReport:
    """Bound ``bm`` with every method and assert that every bound contains every true value at
    sampled and PGD points. Returns the results (for further checks by the caller)."""
    d_rtol, d_atol = default_tolerance(bm.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    ref = Reference(bm)
    p = model_perturbation(bm, perturbation)
    p64 = p.to(torch.float64)
    B = p.interval().lower.shape[0]
    C = None
    if spec is not None:
        C = torch.as_tensor(spec, dtype=torch.float64)
        if C.ndim == 1 + len(bm.output_shape):
            C = C.unsqueeze(0).expand(B, *C.shape)
    report = SoundnessReport()
    for m in methods:
        report.results[m] = bm.bounds(perturbation, method=m, spec=spec)

    # points: samples and PGD on the output (max and min of each bounded quantity)
    x = sample_points(p64, n_random, n_extreme, seed)                 # [n, B, *in]
    fn = lambda z: ref.outputs(z).flatten(1)                           # noqa: E731
    K = math.prod(bm.output_shape)
    if C is None:
        W = torch.cat([torch.eye(K), -torch.eye(K)]).double()            # [2K, K]
    else:
        Cf = C.flatten(2)
        W = torch.cat([Cf, -Cf], 1)                                    # [B, 2S, K]
    atk = pgd(fn, p64, W, steps=pgd_steps, restarts=restarts, seed=seed)
    assert bool(inside(p64, atk.x, rtol=1e-6).all()), "pgd returned a point outside the set"
    pts = [x, atk.x.transpose(0, 1)]

    # PGD on intermediate neurons: a few random coordinates of every node, max and min
    if check_nodes:
        vals0 = ref.nodes(x[:1].flatten(0, 1))
        names = [n for n in report.results[methods[0]].nodes if n in vals0 and n != bm.input]
        gen = torch.Generator().manual_seed(seed + 1)
        picks = []
        for n in names:
            size = vals0[n][0].numel()
            k = min(node_neurons, size)
            picks.append((n, torch.randperm(size, generator=gen)[:k]))
        if picks:
            def node_fn(z):
                v = ref.nodes(z)
                return torch.cat([v[n].flatten(1)[:, idx] for n, idx in picks], 1)
            Kn = sum(len(idx) for _, idx in picks)
            Wn = torch.cat([torch.eye(Kn), -torch.eye(Kn)]).double()
            atk_n = pgd(node_fn, p64, Wn, steps=max(5, pgd_steps // 2), restarts=1, seed=seed + 2)
            pts.append(atk_n.x.transpose(0, 1))
    X = torch.cat(pts, 0)                                              # [n, B, *in]
    n = X.shape[0]
    report.n_points = n
    with torch.no_grad():
        flat = X.flatten(0, 1)
        y = ref.outputs(flat).view(n, B, *bm.output_shape)
        node_vals = ref.nodes(flat) if check_nodes else {}
        inner = [k for k in report.results[methods[0]].nodes if "/" in k and k not in node_vals]
        if check_nodes and inner and len(bm.graph.leaves) == 1:
            # an inner node of a chain (Builder.add_inner) has no fx value of its own: its value
            # is the graph's, evaluated in float64 (the chain's output equals the source op's,
            # tests/graph/test_composite.py)
            g64 = copy.deepcopy(bm.graph).to(torch.float64)
            _, vals = evaluate(g64, {bm.graph.leaves[0]: flat.double()})
            node_vals.update({k: vals[k] for k in inner})
    qty = _flat_spec_values(y, C)
    problems = []
    for m, res in report.results.items():
        lo, up = res.lower.double(), res.upper.double()
        assert lo.shape == qty.shape[1:], f"{m}: bounds of shape {list(lo.shape)}, values {list(qty.shape[1:])}"
        assert bool((lo <= up + _tol(up.abs(), rtol, atol)).all()), f"{m}: lower > upper"
        ex = _excess(qty, lo, up, rtol, atol).max().item()
        if ex > 0:
            problems.append(Violation(f"{m}: output", ex, _where(qty, lo, up, rtol, atol)))
        if not check_nodes:
            continue
        for name, iv in res.nodes.items():
            if "/" in name and name not in node_vals:
                continue   # an inner node of a chain (Builder.add_inner): no fx value of its own
            assert name in node_vals, f"{m}: result.nodes has {name!r}, not an fx node of the model"
            v = node_vals[name].view(n, B, *iv.lower.shape[1:])
            ex = _excess(v, iv.lower.double(), iv.upper.double(), rtol, atol).max().item()
            report.checked_nodes.add(name)
            if ex > 0:
                problems.append(Violation(f"{m}: node {name}", ex,
                                          _where(v, iv.lower.double(), iv.upper.double(), rtol, atol)))
    assert not problems, "unsound bounds:\n" + "\n".join(
        f"  {v.what}: exceeded by {v.worst:.3g} {v.details}" for v in problems)
    return report


def _where(values, lo, up, rtol, atol) -> str:
    ex = _excess(values, lo, up, rtol, atol)
    i = int(ex.flatten().argmax())
    idx = torch.unravel_index(torch.tensor(i), ex.shape)
    j = tuple(int(t) for t in idx[1:])
    return (f"(at point {int(idx[0])}, element {j}: value {values[idx].item():.8g}, "
            f"bounds [{lo[j].item():.8g}, {up[j].item():.8g}])")


# --- exactness on affine models ----------------------------------------------------------------
def exact_affine_bounds(bm: BoundedModel, perturbation, spec=None):
    """Exact bounds of ``C·f`` over the set for an affine ``f`` (Jacobian at the center,
    concretized by the set itself): ``[B, S]`` (or ``[B, *out]``)."""
    ref = Reference(bm)
    p = model_perturbation(bm, perturbation).to(torch.float64)
    c = p.center if isinstance(p, LpBall) else (p.lower + p.upper) / 2
    B = c.shape[0]
    los, ups = [], []
    for b in range(B):
        cb = c[b:b + 1]
        J = torch.autograd.functional.jacobian(lambda z: ref.outputs(z).flatten(1)[0], cb)
        J = J.reshape(J.shape[0], -1)                                  # [K, n_in]
        f0 = ref.outputs(cb).flatten()
        if spec is None:
            Cb = torch.eye(J.shape[0], dtype=torch.float64)
        else:
            Cs = torch.as_tensor(spec, dtype=torch.float64)
            Cb = (Cs[b] if Cs.ndim == 2 + len(bm.output_shape) else Cs).reshape(-1, J.shape[0])
        A = (Cb @ J).view(1, Cb.shape[0], *c.shape[1:])
        mid = Cb @ f0 - (A.flatten(2)[0] @ cb.flatten())               # the constant term
        pb = _slice(p, b)
        los.append(pb.concretize(A, upper=False)[0] + mid)
        ups.append(pb.concretize(A, upper=True)[0] + mid)
    lo, up = torch.stack(los), torch.stack(ups)
    if spec is None:
        lo, up = lo.view(B, *bm.output_shape), up.view(B, *bm.output_shape)
    return lo, up


def _slice(p, b):
    if isinstance(p, Box):
        return Box(p.lower[b:b + 1], p.upper[b:b + 1])
    eps = p.eps
    if isinstance(eps, torch.Tensor) and eps.ndim >= 1:
        eps = eps[b:b + 1] if (eps.ndim == 1 or eps.shape[0] == p.center.shape[0]) else eps
    return LpBall(p.center[b:b + 1], eps, p.norm, p.clip)


def random_spec(B: int, S: int, out_shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A random spec ``[B, S, *out_shape]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((B, S, *out_shape), generator=gen, dtype=dtype)


def flat_margin_spec(labels, out_shape, dtype=torch.float64) -> torch.Tensor:
    """verifier.margin_spec over the flattened output, viewed back: ``[B, n - 1, *out_shape]``."""
    n = math.prod(out_shape)
    C = margin_spec(labels, n, dtype=dtype)
    return C.view(C.shape[0], n - 1, *out_shape)


def specs_for(bm: BoundedModel, B: int, seed: int = 0, max_margin: int = 40):
    """(name, spec) pairs: no spec, a random C, and a margin spec (labels from the center's
    prediction mod the output size; skipped for outputs too large to be a class vector)."""
    out = tuple(bm.output_shape)
    n = math.prod(out)
    specs = [("none", None), ("random", random_spec(B, 3, out, seed))]
    if 2 <= n <= max_margin:
        labels = torch.arange(B) % n
        specs.append(("margin", flat_margin_spec(labels, out)))
    return specs


def check_all_specs(bm: BoundedModel, perturbation, seed: int = 0, **kw):
    """``check_sound`` without a spec, with a random spec and with a margin spec."""
    B = model_perturbation(bm, perturbation).interval().lower.shape[0]
    return {name: check_sound(bm, perturbation, spec=C, seed=seed, **kw)
            for name, C in specs_for(bm, B, seed)}


def linf(x: torch.Tensor, eps, clip=None) -> LpBall:
    return LpBall(x, eps, "inf", clip)


def onnx2torch_or_skip():
    """onnx2torch (the ONNX loader's optional fallback), or skip: it is not in the base install,
    and where an older install left it beside a torch its torchvision was not built for, its
    import fails with a RuntimeError rather than an ImportError."""
    import pytest
    try:
        import onnx2torch
    except Exception as e:
        pytest.skip(f"onnx2torch not usable here ({type(e).__name__})")
    return onnx2torch


def randomize_batchnorm(net: torch.nn.Module, gen: torch.Generator | int = 0) -> torch.nn.Module:
    """Give every BatchNorm layer of ``net`` random affine parameters and running statistics
    (scales in [0.5, 1.5], variances in [0.5, 1.5]) drawn from ``gen`` (a generator, or its
    seed), so that a test's network does not carry the identity BatchNorm of a fresh module; in
    place, returns ``net``."""
    if isinstance(gen, int):
        gen = torch.Generator().manual_seed(gen)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net


def frozen_stats_copy(net: torch.nn.Module, stats: dict) -> torch.nn.Module:
    """An eval-mode copy of ``net`` whose BatchNorm layers normalize with the captured batch
    statistics ``stats`` ({module name: (mean, var)}, ``verifier.graph.live.BatchStats``): the
    function that bounds computed in training mode must enclose."""
    import copy
    frozen = copy.deepcopy(net).eval()
    mods = dict(frozen.named_modules())
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            mods[name].running_mean.copy_(mean.detach())
            mods[name].running_var.copy_(var.detach())
    return frozen


def check_domains_sound(P, res, match, pre, y, tol: float = 1e-4) -> int:
    """Branch-and-bound domains against sampled points: ``res`` is ``ReluPrepared.bound``'s
    result for ``n`` domains of one row with ``d = 0``, ``match [n, points]`` which points
    satisfy each domain's splits, ``pre`` the values of the split nodes' inputs at the points
    (in ``P.relus`` order) and ``y [points, 1]`` the output. Every domain with a point has a
    finite margin at or below the points' minimum of ``y`` and refined pre-activation bounds
    that contain the points' values. -> the number of domains checked."""
    lower = res["margin"][:, 0]
    checked = 0
    for b in range(lower.shape[0]):
        pts = match[b].nonzero().flatten()
        if pts.numel() == 0:
            continue
        checked += 1
        assert torch.isfinite(lower[b]), "a domain with points was declared infeasible"
        assert float(lower[b]) <= float(y[pts, 0].min()) + tol, (b, float(lower[b]))
        for z, r in zip(pre, P.relus):
            p = P.pre[r]
            zz = z[pts]
            assert bool((zz >= res["lo"][p][b] - tol).all()) and bool((zz <= res["up"][p][b] + tol).all()), (b, r)
    return checked
