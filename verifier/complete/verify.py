"""``verify(model, spec, timeout)``: a verdict for a VNN-LIB property, with its reason.

The property is violated (``sat``) iff some region's box holds an ``x`` whose output ``y``
satisfies one of the region's conjunctions ``C y <= d``. In order:

1. an attack (PGD on the violation ``max_r (C_r y - d_r)``) looks for such an ``x``; a candidate
   is **replayed on the original model** (onnxruntime for ONNX) and reported only if the
   replayed output satisfies the conjunction exactly: ``sat``;
2. incomplete methods of increasing cost (IBP, CROWN, alpha-CROWN) bound ``C y`` over each box; a
   conjunction is refuted when some row has ``lower(C_r y) > d_r``; when every conjunction of
   every region is refuted: ``unsat``, proved by that method;
3. for inputs of at most ``max_split_inputs`` values, branch and bound on input splits
   (``input_bab``) until every domain is refuted (``unsat``) or a replayed counterexample
   turns up (``sat``); for larger inputs of a model with ReLUs, branch and bound on ReLU
   splits with beta-CROWN bounds (``relu_bab``), starting from alpha-CROWN's intermediate
   bounds, until the deadline;
4. otherwise ``unknown`` (bounds too loose, no counterexample found), or ``timeout`` when the
   budget ran out first. An internal error is raised, never turned into a verdict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ShapeError

STATUSES = ("sat", "unsat", "unknown", "timeout")


@dataclass
class Counterexample:
    """An input inside the spec's box and the original model's output on it."""
    x: np.ndarray          # flat, C order, float64 values of the float32 input that was replayed
    y: np.ndarray          # flat output of the original model
    region: int
    disjunct: int
    replayed_by: str       # "onnxruntime" or "torch"

    def vnncomp_text(self) -> str:
        """The VNN-COMP counterexample: ``((X_0 v) ... (Y_0 v) ...)``."""
        parts = [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.x)]
        parts += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(self.y)]
        return "(" + "\n".join(parts) + ")"


@dataclass
class Verdict:
    status: str                      # sat | unsat | unknown | timeout
    reason: str
    method: str | None = None        # what decided it: "pgd", "ibp", "crown", ...
    counterexample: Counterexample | None = None
    time_s: float = 0.0
    details: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Verdict({self.status}: {self.reason}; {self.time_s:.3f}s)"

    def to_json(self) -> dict:
        out = {"status": self.status, "reason": self.reason, "method": self.method,
               "time_s": self.time_s}
        if self.counterexample is not None:
            out["counterexample"] = {"x": self.counterexample.x.tolist(),
                                     "y": self.counterexample.y.tolist(),
                                     "replayed_by": self.counterexample.replayed_by}
        return out


def _holds(c, y: np.ndarray) -> bool:
    return bool(np.all(c.C @ y <= c.d))


def _float32_inside(x: np.ndarray, lower: np.ndarray, upper: np.ndarray):
    """The float32 point nearest ``x`` inside [lower, upper] (bounds in float64): rounding to
    float32 may step outside the box, so such entries move one float32 ulp back inside.
    -> (x32, inside); ``inside`` is False only where the box holds no float32 value (a
    degenerate bound that float32 cannot represent) beyond a 1e-7 relative slack."""
    x32 = np.clip(x, lower, upper).astype(np.float32)
    lo_bad = x32 < lower
    x32[lo_bad] = np.nextafter(x32[lo_bad], np.float32(np.inf))
    hi_bad = x32 > upper
    x32[hi_bad] = np.nextafter(x32[hi_bad], np.float32(-np.inf))
    slack = 1e-7 * np.maximum(1.0, np.abs(lower))
    inside = bool(np.all(x32 >= lower - slack) and np.all(x32 <= upper + slack))
    return x32, inside


def _replay(x, disjunct, region, ri, run, replayer):
    """A candidate point replayed on the original model: the Counterexample, or None when the
    replayed output satisfies none of the region's conjunctions (or x is not in the box)."""
    x32, inside = _float32_inside(x.detach().double().numpy().reshape(-1), region.lower,
                                  region.upper)
    if not inside:
        return None
    y = run(x32)
    for kk in [disjunct] + [j for j in range(len(region.disjuncts)) if j != disjunct]:
        if _holds(region.disjuncts[kk], y):
            return Counterexample(x32.astype(np.float64), y, ri, kk, replayer)
    return None


def verify(model, spec, timeout: float = 60.0, methods=("ibp", "crown", "alpha-crown"), attack: bool = True,
           seed: int = 0, bab: bool = True, max_split_inputs: int = 16, progress=None,
           expander=None) -> Verdict:
    """Decide a VNN-LIB property on a model.

    ``model``: a ``BoundedModel`` or an ONNX path; ``spec``: a ``VnnlibSpec`` or a path;
    ``timeout``: wall-clock seconds for the whole call (checked between steps);
    ``bab``: branch and bound, by input splitting when the input has at most
    ``max_split_inputs`` values, else by ReLU splitting; ``progress(domains_left,
    worst_margin, elapsed_s)`` is called after every round of it; ``expander``: where
    branch and bound (input- or ReLU-split) bounds its batches of domains (default: this
    process; see ``input_bab.LocalExpander`` and ``relu_bab.LocalReluExpander``; one expander,
    such as a ``RayDomainPool``, serves both).
    """
    from ..api import BoundedModel
    from ..spec.vnnlib import VnnlibSpec, read_vnnlib
    from .replay import replay_runner
    from .spec_attack import spec_attack

    t0 = time.perf_counter()
    deadline = t0 + timeout
    if not isinstance(model, BoundedModel):
        model = BoundedModel.from_onnx(model)
    if not isinstance(spec, VnnlibSpec):
        spec = read_vnnlib(spec)
    n_in = int(np.prod(model.input_shape))
    n_out = int(np.prod(model.output_shape))
    if spec.n_inputs != n_in or spec.n_outputs != n_out:
        raise ShapeError(f"the spec declares {spec.n_inputs} inputs and {spec.n_outputs} outputs; "
                         f"the model has {n_in} inputs {list(model.input_shape)} and {n_out} outputs")

    def done(status, reason, method=None, cex=None, **details):
        return Verdict(status, reason, method, cex, time.perf_counter() - t0, details)

    dt = model.dtype
    from ..perturbation import round_down, round_up
    # rounded outwards: the float32 box contains the spec's float64 box
    boxes = [(round_down(torch.as_tensor(r.lower), dt).reshape(model.input_shape),
              round_up(torch.as_tensor(r.upper), dt).reshape(model.input_shape)) for r in spec.regions]

    # 1. attack, with replay on the original model
    if attack:
        run, replayer = replay_runner(model)

        def f(x):
            return model.graph_forward(x)

        for ri, (region, (lo, hi)) in enumerate(zip(spec.regions, boxes)):
            if time.perf_counter() > deadline:
                return done("timeout", f"budget of {timeout:g}s ran out during the attack")
            Cs = [torch.as_tensor(c.C, dtype=dt) for c in region.disjuncts]
            ds = [torch.as_tensor(c.d, dtype=dt) for c in region.disjuncts]
            x, k, v = spec_attack(f, lo, hi, Cs, ds, seed=seed + ri, deadline=deadline)
            if v <= 0:
                x32, inside = _float32_inside(x.detach().double().numpy().reshape(-1),
                                              region.lower, region.upper)
                y = run(x32)
                if inside:
                    for kk in [k] + [j for j in range(len(region.disjuncts)) if j != k]:
                        if _holds(region.disjuncts[kk], y):
                            cex = Counterexample(x32.astype(np.float64), y, ri, kk, replayer)
                            return done("sat", f"counterexample found by PGD and replayed with "
                                               f"{replayer}", "pgd", cex)

    # 2. incomplete methods of increasing cost
    input_bab = bab and n_in <= max_split_inputs
    last_open = None
    refuted: set = set()  # (region, conjunction) refuted by some method
    roots: dict = {}  # alpha-CROWN's intermediate bounds per region (ReLU-split BaB starts there)
    for method in methods:
        if time.perf_counter() > deadline:
            return done("timeout", f"budget of {timeout:g}s ran out before {method}")
        open_count = 0
        for ri, (region, (lo, hi)) in enumerate(zip(spec.regions, boxes)):
            C = torch.as_tensor(np.concatenate([c.C for c in region.disjuncts]), dtype=dt)
            d = np.concatenate([c.d for c in region.disjuncts])
            from ..perturbation import Box
            box = Box(lo.unsqueeze(0), hi.unsqueeze(0))
            spec_c = C.reshape(1, C.shape[0], *model.output_shape)
            if method == "alpha-crown":
                # output slopes only where input-split branch and bound follows (its time is
                # better spent on domains); else the pre-activation bounds too
                from ..bounds.alpha import alpha_crown_bounds
                with torch.no_grad():
                    low, _, roots[ri] = alpha_crown_bounds(model.graph, model._leaves(box),
                                                           spec_c.to(dt), deadline=deadline,
                                                           intermediate=not input_bab)
                lower = torch.nan_to_num(low, nan=-torch.inf)[0].double().numpy()
            else:
                lower = model.bounds(box, method, spec=spec_c).lower[0].double().numpy()
            k = 0
            for kk, c in enumerate(region.disjuncts):
                rows = slice(k, k + c.C.shape[0])
                k += c.C.shape[0]
                if not np.any(lower[rows] > c.d):
                    open_count += 1
                else:
                    refuted.add((ri, kk))
        if open_count == 0:
            return done("unsat", f"every output condition refuted by {method} bounds", method)
        last_open = open_count
    # 3. complete: branch and bound on input splits for low-dimensional inputs
    if input_bab:
        from .input_bab import input_split_bab
        run, replayer = replay_runner(model)
        total = 0
        for ri, (region, (lo, hi)) in enumerate(zip(spec.regions, boxes)):
            Cs = [torch.as_tensor(c.C, dtype=dt) for c in region.disjuncts]
            ds = [torch.as_tensor(c.d, dtype=dt) for c in region.disjuncts]
            r = input_split_bab(model, lo, hi, Cs, ds, deadline, progress=progress,
                                expander=expander)
            total += r.domains
            if r.status == "candidate":
                cex = _replay(r.x, r.disjunct, region, ri, run, replayer)
                if cex is not None:
                    return done("sat", f"counterexample found by input-split branch and bound "
                                       f"and replayed with {replayer}", "bab-input", cex,
                                domains=total)
                # our float32 graph and the original model disagree at a boundary point
                return done("unknown", "a candidate counterexample of branch and bound did not "
                                       "replay on the original model", None, domains=total)
            if r.status == "timeout":
                return done("timeout", f"budget of {timeout:g}s ran out in branch and bound "
                                       f"({total} domains)", None, domains=total)
        return done("unsat", f"every output condition refuted on all {total} input-split "
                             f"domains (CROWN bounds)", "bab-input", domains=total)
    relu_bab = bab and any(n.op in ("relu", "leaky_relu") for n in model.graph)
    if relu_bab:
        from .relu_bab import relu_split_bab
        run, replayer = replay_runner(model)
        total = 0
        for ri, (region, (lo, hi)) in enumerate(zip(spec.regions, boxes)):
            if time.perf_counter() > deadline:
                return done("timeout", f"budget of {timeout:g}s ran out in ReLU-split branch and "
                                       f"bound ({total} domains)", None, domains=total)
            todo = [kk for kk in range(len(region.disjuncts)) if (ri, kk) not in refuted]
            if not todo:
                continue
            Cs = [torch.as_tensor(region.disjuncts[kk].C, dtype=dt) for kk in todo]
            ds = [torch.as_tensor(region.disjuncts[kk].d, dtype=dt) for kk in todo]
            r = relu_split_bab(model, lo, hi, Cs, ds, deadline, root=roots.get(ri),
                               progress=progress, expander=expander)
            total += r.domains
            if r.status == "candidate":
                cex = _replay(r.x, todo[r.disjunct], region, ri, run, replayer)
                if cex is not None:
                    return done("sat", f"counterexample found by ReLU-split branch and bound "
                                       f"({r.reason}) and replayed with {replayer}", "bab-relu",
                                cex, domains=total)
                return done("unknown", "a candidate counterexample of ReLU-split branch and bound "
                                       "did not replay on the original model", None, domains=total)
            if r.status == "timeout":
                return done("timeout", f"budget of {timeout:g}s ran out in ReLU-split branch and "
                                       f"bound: {r.reason}", None, domains=total)
            if r.status != "unsat":
                return done("unknown", f"ReLU-split branch and bound: {r.reason}", None,
                            domains=total)
        return done("unsat", f"every output condition refuted: every subdomain refuted by "
                             f"beta-CROWN bounds ({total} ReLU-split domains)", "bab-relu",
                    domains=total)
    if time.perf_counter() > deadline:
        return done("timeout", f"budget of {timeout:g}s ran out")
    return done("unknown", f"{last_open} output condition(s) not refuted by "
                           f"{', '.join(methods)}; no counterexample found", None)
