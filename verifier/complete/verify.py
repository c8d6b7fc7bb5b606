"""``verify(model, spec, timeout)``: a verdict for a VNN-LIB property, with its reason.

The property is violated (``sat``) iff some region's box holds an ``x`` whose output ``y``
satisfies one of the region's conjunctions ``C y <= d``. ``verify`` is four steps, each one
call:

1. ``_attack``: PGD on the violation ``max_r (C_r y - d_r)`` looks for such an ``x``; a
   candidate is **replayed on the original model** (onnxruntime for ONNX) and reported only if
   the replayed output satisfies the conjunction exactly: ``sat``;
2. ``_incomplete_bounds``: methods of increasing cost (IBP, CROWN, alpha-CROWN) bound ``C y``
   over each box; a conjunction is refuted when some row has ``lower(C_r y) > d_r``; when
   every conjunction of every region is refuted: ``unsat``, proved by that method;
3. ``_branch_and_bound``: the one coordinator (``bab.branch_and_bound``) with the split
   strategy ``_split_strategy`` picks: input splits (``input_bab``, over the inputs that vary)
   when at most ``max_split_inputs`` input values vary in the spec's regions, until every
   domain is refuted (``unsat``) or a replayed counterexample turns up (``sat``); otherwise,
   for a model with ReLUs (or other nonlinearities whose input interval may be split:
   sigmoid, tanh, ...), neuron splits
   with beta-CROWN bounds (``relu_bab``) on the conjunctions still open, starting from
   alpha-CROWN's intermediate bounds, until the deadline;
4. ``_no_verdict``: otherwise ``unknown`` (bounds too loose, no counterexample found), or
   ``timeout`` when the budget ran out first. An internal error is raised, never turned into a
   verdict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..api import BoundedModel
from ..bounds.alpha import alpha_crown_bounds
from ..devices import check_same_device
from ..errors import ShapeError
from ..ops import RULES
from ..perturbation import Box, round_down, round_up
from ..spec.vnnlib import VnnlibSpec, read_vnnlib
from .fallback import stuck_domains
from .input_bab import input_split_bab
from .relu_bab import relu_split_bab
from .replay import replay_runner
from .spec_attack import spec_attack

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
    x32, inside = _float32_inside(x.detach().double().cpu().numpy().reshape(-1), region.lower,
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
           expander=None, device=None) -> Verdict:
    """Decide a VNN-LIB property on a model.

    ``model``: a ``BoundedModel`` or an ONNX path; ``spec``: a ``VnnlibSpec`` or a path;
    ``timeout``: wall-clock seconds for the whole call (checked between steps);
    ``bab``: branch and bound, by input splitting when at most ``max_split_inputs`` input
    values vary (have lower < upper in some region of the spec), else by neuron splitting (ReLU
    signs; input intervals of sigmoid, tanh and other nonlinearities whose rule gives a
    ``split_point``); ``progress(domains_left,
    worst_margin, elapsed_s)`` is called after every round of it; ``expander``: where
    branch and bound (input- or ReLU-split) bounds its batches of domains (default: this
    process, ``bab.LocalExpander``; one expander, such as a ``RayDomainPool``, serves both).
    ``device``: where an ONNX path is loaded and bounded (a ``BoundedModel`` must be on it).
    """
    t0 = time.perf_counter()
    run = _Run(*_load(model, spec, device), timeout, t0 + timeout)
    split = _split_strategy(run.model, run.spec, bab, max_split_inputs)
    if attack and (verdict := _attack(run, seed)) is not None:
        return _timed(verdict, t0)
    verdict, left = _incomplete_bounds(run, methods, alpha_intermediate=split is not INPUT_SPLITS)
    if verdict is None and split is not None:
        verdict = _branch_and_bound(run, split, left, progress, expander)
    return _timed(verdict or _no_verdict(run, methods, left), t0)


def _timed(verdict: Verdict, t0: float) -> Verdict:
    verdict.time_s = time.perf_counter() - t0
    return verdict


@dataclass
class _Run:
    """One call of ``verify``: the model, the spec, its regions' boxes in the model's dtype
    (rounded outwards: the float32 box contains the spec's float64 box), the budget."""
    model: Any
    spec: Any
    timeout: float
    deadline: float
    boxes: list = field(init=False)

    def __post_init__(self):
        dt = self.model.dtype
        self.boxes = [(round_down(torch.as_tensor(r.lower, device=self.model.device), dt).reshape(self.model.input_shape),
                       round_up(torch.as_tensor(r.upper, device=self.model.device), dt).reshape(self.model.input_shape))
                      for r in self.spec.regions]

    def late(self) -> bool:
        return time.perf_counter() > self.deadline

    def conjunctions(self, region, which=None):
        """``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]`` of the region's conjunctions."""
        dt = self.model.dtype
        cs = region.disjuncts if which is None else [region.disjuncts[k] for k in which]
        return ([torch.as_tensor(c.C, dtype=dt, device=self.model.device) for c in cs],
                [torch.as_tensor(c.d, dtype=dt, device=self.model.device) for c in cs])


def _load(model, spec, device=None):
    """-> (BoundedModel, VnnlibSpec) from paths or objects; the spec's sizes must match."""
    if not isinstance(model, BoundedModel):
        model = BoundedModel.from_onnx(model, device=device)
    check_same_device(model.device, device, "the model")
    if not isinstance(spec, VnnlibSpec):
        spec = read_vnnlib(spec)
    n_in = int(np.prod(model.input_shape))
    n_out = int(np.prod(model.output_shape))
    if spec.n_inputs != n_in or spec.n_outputs != n_out:
        raise ShapeError(f"the spec declares {spec.n_inputs} inputs and {spec.n_outputs} outputs; "
                         f"the model has {n_in} inputs {list(model.input_shape)} and {n_out} outputs")
    return model, spec


def _attack(run: _Run, seed: int) -> Verdict | None:
    """Step 1: PGD on each region's violation; a hit replayed on the original model: ``sat``."""
    replay, replayer = replay_runner(run.model)
    for ri, (region, (lo, hi)) in enumerate(zip(run.spec.regions, run.boxes)):
        if run.late():
            return Verdict("timeout", f"budget of {run.timeout:g}s ran out during the attack")
        Cs, ds = run.conjunctions(region)
        x, k, v = spec_attack(run.model.graph_forward, lo, hi, Cs, ds, seed=seed + ri,
                              deadline=run.deadline)
        if v <= 0:
            cex = _replay(x, k, region, ri, replay, replayer)
            if cex is not None:
                return Verdict("sat", f"counterexample found by PGD and replayed with {replayer}",
                               "pgd", cex)
    return None


@dataclass
class _Left:
    """What the incomplete bounds left: ``refuted`` (region, conjunction) pairs, alpha-CROWN's
    intermediate bounds per region (``roots``: ReLU-split branch and bound starts there) and
    how many conjunctions the last method left open."""
    refuted: set = field(default_factory=set)
    roots: dict = field(default_factory=dict)
    open: int | None = None


def _incomplete_bounds(run: _Run, methods, alpha_intermediate: bool):
    """Step 2: methods of increasing cost bound ``C y`` over each box; every conjunction of
    every region refuted by one method: ``unsat``. -> (Verdict or None, _Left)."""
    model, dt, left = run.model, run.model.dtype, _Left()
    for method in methods:
        if run.late():
            return Verdict("timeout", f"budget of {run.timeout:g}s ran out before {method}"), left
        open_count = 0
        for ri, (region, (lo, hi)) in enumerate(zip(run.spec.regions, run.boxes)):
            C = torch.as_tensor(np.concatenate([c.C for c in region.disjuncts]), dtype=dt, device=model.device)
            box = Box(lo.unsqueeze(0), hi.unsqueeze(0))
            spec_c = C.reshape(1, C.shape[0], *model.output_shape)
            if method == "alpha-crown":
                # output slopes only where input-split branch and bound follows (its time is
                # better spent on domains); else the intermediate bounds too (alpha_crown's
                # "auto": a transformer's attention operands only where the output slopes
                # leave a row at or below its threshold d)
                d = torch.as_tensor(np.concatenate([c.d for c in region.disjuncts]), dtype=dt,
                                    device=model.device)
                with torch.no_grad():
                    low, _, left.roots[ri] = alpha_crown_bounds(
                        model.graph, model._leaves(box), spec_c.to(dt), deadline=run.deadline,
                        intermediate="auto" if alpha_intermediate else False, target=d)
                lower = torch.nan_to_num(low, nan=-torch.inf)[0].double().cpu().numpy()
            else:
                lower = model.bounds(box, method, spec=spec_c).lower[0].double().cpu().numpy()
            k = 0
            for kk, c in enumerate(region.disjuncts):
                rows = slice(k, k + c.C.shape[0])
                k += c.C.shape[0]
                if not np.any(lower[rows] > c.d):
                    open_count += 1
                else:
                    left.refuted.add((ri, kk))
        if open_count == 0:
            return Verdict("unsat", f"every output condition refuted by {method} bounds",
                           method), left
        left.open = open_count
    return None, left


@dataclass(frozen=True)
class _Split:
    """A split strategy as ``verify`` runs and words it: ``run(model, lo, hi, Cs, ds, deadline,
    root, progress, expander, vary) -> BabResult`` (``vary``: the region's inputs with
    lower < upper, a bool mask); ``open_only``: hand it only the conjunctions the
    incomplete bounds left open; the reasons (format fields: timeout, total, reason, replayer);
    ``late``: the reason when the deadline passes between regions (None: the run reports it)."""
    method: str
    run: Callable
    open_only: bool
    sat: str
    no_replay: str
    timeout: str
    unknown: str
    unsat: str
    late: str | None


INPUT_SPLITS = _Split(
    "bab-input",
    lambda model, lo, hi, Cs, ds, deadline, root, progress, expander, vary: input_split_bab(
        model, lo, hi, Cs, ds, deadline, progress=progress, expander=expander, vary=vary),
    open_only=False,
    sat="counterexample found by input-split branch and bound and replayed with {replayer}",
    no_replay="a candidate counterexample of branch and bound did not replay on the original "
              "model",
    timeout="budget of {timeout:g}s ran out in branch and bound ({total} domains)",
    unknown="input-split branch and bound: {reason}",
    unsat="every output condition refuted on all {total} input-split domains (CROWN bounds)",
    late=None)

RELU_SPLITS = _Split(
    "bab-relu",
    lambda model, lo, hi, Cs, ds, deadline, root, progress, expander, vary: relu_split_bab(
        model, lo, hi, Cs, ds, deadline, root=root, progress=progress, expander=expander),
    open_only=True,
    sat="counterexample found by ReLU-split branch and bound ({reason}) and replayed with "
        "{replayer}",
    no_replay="a candidate counterexample of ReLU-split branch and bound did not replay on the "
              "original model",
    timeout="budget of {timeout:g}s ran out in ReLU-split branch and bound: {reason}",
    unknown="ReLU-split branch and bound: {reason}",
    unsat="every output condition refuted: every subdomain refuted by beta-CROWN bounds "
          "({total} ReLU-split domains)",
    late="budget of {timeout:g}s ran out in ReLU-split branch and bound ({total} domains)")


NEURON_SPLITS = _Split(
    "bab-neuron",
    RELU_SPLITS.run,
    open_only=True,
    sat="counterexample found by neuron-split branch and bound ({reason}) and replayed with "
        "{replayer}",
    no_replay="a candidate counterexample of neuron-split branch and bound did not replay on "
              "the original model",
    timeout="budget of {timeout:g}s ran out in neuron-split branch and bound: {reason}",
    unknown="neuron-split branch and bound: {reason}",
    unsat="every output condition refuted: every subdomain refuted by beta-CROWN bounds "
          "({total} neuron-split domains)",
    late="budget of {timeout:g}s ran out in neuron-split branch and bound ({total} domains)")


def varying_inputs(spec) -> np.ndarray:
    """The inputs that vary: a bool mask ``[n_inputs]``, true where some region of the spec
    has ``lower < upper`` (in its own float64 values, not the boxes rounded to the model's
    dtype, which give a fixed value that float32 cannot hold a box of one ulp)."""
    mask = np.zeros(spec.n_inputs, dtype=bool)
    for r in spec.regions:
        mask |= np.asarray(r.lower, dtype=np.float64) < np.asarray(r.upper, dtype=np.float64)
    return mask


def _split_strategy(model, spec, bab: bool, max_split_inputs: int) -> _Split | None:
    """Input splits when at most ``max_split_inputs`` input values vary (``varying_inputs``:
    an input of 800 values of which 8 vary is split in those 8), else neuron splits for a
    model with a node that branch and bound may split: ReLU splits (at 0) where every such
    node is ReLU-like, else neuron splits (``relu_bab`` also splits the input interval of other
    nonlinearities whose rule gives a ``split_point``: sigmoid, tanh, ...); else none."""
    if not bab:
        return None
    if int(varying_inputs(spec).sum()) <= max_split_inputs:
        return INPUT_SPLITS
    ops = {RULES[n.op] for n in model.graph if n.op != "input"}
    if any(r.splits for r in ops):
        return RELU_SPLITS if all(r.splittable for r in ops if r.splits) else NEURON_SPLITS
    return None


def _branch_and_bound(run: _Run, split: _Split, left: _Left, progress, expander) -> Verdict:
    """Step 3: branch and bound on each region in turn until every domain is refuted
    (``unsat``), a candidate replays on the original model (``sat``) or the budget ends."""
    replay, replayer = replay_runner(run.model)
    total, t_bab = 0, time.perf_counter()

    def verdict(status, reason, method=None, cex=None):
        why = r.reason if r is not None else ""
        return Verdict(status, reason.format(timeout=run.timeout, total=total, reason=why,
                                             replayer=replayer),
                       method, cex, details={"domains": total,
                                             "bab_s": time.perf_counter() - t_bab})

    r = None
    fallbacks = 0     # regions closed by input splits after ReLU splits ran out
    for ri, (region, (lo, hi)) in enumerate(zip(run.spec.regions, run.boxes)):
        if split.late is not None and run.late():
            return verdict("timeout", split.late)
        todo = [kk for kk in range(len(region.disjuncts))
                if not (split.open_only and (ri, kk) in left.refuted)]
        if not todo:
            continue
        Cs, ds = run.conjunctions(region, todo)
        vary = torch.as_tensor(np.asarray(region.lower) < np.asarray(region.upper), device=lo.device)
        r = split.run(run.model, lo, hi, Cs, ds, run.deadline, left.roots.get(ri), progress,
                      expander, vary)
        start = stuck_domains(r.left) if r.status == "unknown" and r.left is not None else None
        if start is not None:
            # ReLU splits ran out of neurons on some open domains: split their inputs
            stuck = start["key"].numel()
            r = input_split_bab(run.model, lo, hi, Cs, ds, run.deadline, progress=progress,
                                expander=expander, vary=vary,
                                base=torch.as_tensor(region.lower, dtype=torch.float64, device=lo.device),
                                start=start, domains=r.domains)
            r.reason = (f"{r.reason}; input splits took over {stuck} ReLU-split domains with "
                        "no neuron left to split")
            if r.status == "unsat":
                fallbacks += 1
        total += r.domains
        if r.status == "candidate":
            cex = _replay(r.x, todo[r.disjunct], region, ri, replay, replayer)
            if cex is not None:
                return verdict("sat", split.sat, split.method, cex)
            # our float32 graph and the original model disagree at a boundary point
            return verdict("unknown", split.no_replay)
        if r.status == "timeout":
            return verdict("timeout", split.timeout)
        if r.status != "unsat":
            return verdict("unknown", split.unknown)
    if fallbacks:
        return verdict("unsat", split.unsat + "; in {n} region(s) the domains ReLU splits could "
                       "not close were closed by input splits (CROWN bounds)".replace(
                           "{n}", str(fallbacks)), split.method)
    return verdict("unsat", split.unsat, split.method)


def _no_verdict(run: _Run, methods, left: _Left) -> Verdict:
    """Step 4: no proof and no counterexample: ``timeout`` if the budget ran out, else
    ``unknown``."""
    if run.late():
        return Verdict("timeout", f"budget of {run.timeout:g}s ran out")
    return Verdict("unknown", f"{left.open} output condition(s) not refuted by "
                              f"{', '.join(methods)}; no counterexample found")
