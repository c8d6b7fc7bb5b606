"""LoRA adapters as weight sets: a low-rank update ``W + s·B A`` (``s = alpha / rank``) on chosen
linear layers, and the sets that certify it.

    lora = add_lora(net, ["blocks.*.att.qkv", "blocks.*.mlp.0"], rank=4)   # a copy, adapters on
    fit_adapters(lora, x, y, steps=100)                  # trains the adapters only
    model = BoundedModel(lora, input_shape=(1, 28, 28))
    flatness(model, data, WeightPerturbation(ADAPTERS, 1e-3))   # ADAPTERS = "*lora_*"
    flatness(BoundedModel(net, ...), data, merge_segment(lora, t=(0, 1)))  # W + t·s·B A, t in [0, 1]
    adapter_sensitivity(model, lora, data, 1e-3)         # per adapter; full=True: its base weight

The adapter of a layer is two bias-free linear layers, ``lora_A: in -> rank`` and ``lora_B:
rank -> out``; the layer computes ``base(x) + s·lora_B(lora_A(x))``, so a set on ``lora_A`` and
``lora_B`` moves the effective weight by ``s·(B dA + dB A + dB dA)``: a bilinear, low-rank
subset of the full weight's neighbourhood (``enclosing_radii`` gives the L-inf box on the full
weight that holds it). Merging the adapter at a scale ``t`` is the segment ``W + t·s·B A`` on
the base model's weights (``merge_segment``), certified for every ``t`` of an interval at once.
"""
from __future__ import annotations

import copy
import fnmatch
import math

import torch
import torch.nn as nn

from ..errors import VerifierError
from ..weights import WeightPerturbation, WeightSegment
from .flatness import FlatnessResult, flatness

ADAPTERS = "*lora_*"   # the glob that selects every adapter parameter


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank)·lora_B(lora_A(x))`` over the last dim; ``lora_A`` starts
    as PyTorch's default linear initialization and ``lora_B`` at zero (the adapted layer starts
    equal to ``base``). ``base``'s parameters are frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise VerifierError(f"LoRA adapts nn.Linear layers, got {type(base).__name__}")
        if not (isinstance(rank, int) and rank >= 1):
            raise VerifierError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise VerifierError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def delta(self) -> torch.Tensor:
        """The merged update ``s·B A``: ``[out, in]``."""
        return (self.scale * self.lora_B.weight @ self.lora_A.weight).detach()

    def merged(self, t: float = 1.0) -> nn.Linear:
        """A plain linear layer with weight ``W + t·s·B A``."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.add_(t * self.delta())
        for p in out.parameters():
            p.requires_grad_(True)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def add_lora(model: nn.Module, patterns, rank: int = 4, alpha: float | None = None,
             seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose linear layers named by the glob ``patterns`` (module
    names, e.g. ``blocks.*.att.qkv``) are wrapped in ``LoRALinear``; every other parameter is
    frozen. ``seed`` draws the adapters' initial ``lora_A``. The original is not changed."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(False)
    mods = dict(out.named_modules())
    chosen = []
    for pat in pats:
        hit = [n for n in mods if n and fnmatch.fnmatchcase(n, pat)]
        if not hit:
            linear = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
            raise VerifierError(f"no module matches {pat!r}; the model's linear layers: {', '.join(linear)}")
        for n in hit:
            if not isinstance(mods[n], nn.Linear):
                raise VerifierError(f"module {n!r} matched by {pat!r} is a {type(mods[n]).__name__}; "
                                    "LoRA adapts nn.Linear layers")
            if n not in chosen:
                chosen.append(n)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for n in chosen:
            _set_module(out, n, LoRALinear(mods[n], rank, alpha))
    finally:
        torch.random.set_rng_state(gen_state)
    return out.eval()


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> ``LoRALinear`` of every adapted layer."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not found:
        raise VerifierError("the model has no LoRA adapters (add them with add_lora)")
    return found


def adapter_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Adapted layer -> the names of its adapter parameters (``NAME.lora_A.weight``,
    ``NAME.lora_B.weight``): the groups of a per-adapter sensitivity."""
    return {n: [f"{n}.lora_A.weight", f"{n}.lora_B.weight"] for n in adapters(model)}


def merge_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{NAME.weight: s·B A}`` for every adapted layer ``NAME``: the update as a delta on the
    weights of the model without adapters (the names it has there)."""
    return {f"{n}.weight": m.delta() for n, m in adapters(model).items()}


def merge_segment(model: nn.Module, t=(0.0, 1.0)) -> WeightSegment:
    """The models ``W + t·s·B A`` (every adapter merged at one scale ``t`` in ``[t0, t1]``), a
    ``WeightSegment`` on the base model's weights (the model before ``add_lora``)."""
    return WeightSegment(merge_deltas(model), t)


def merge_flatness(bounded_base, model: nn.Module, data, t=(0.0, 1.0), pieces: int = 1,
                   **kw) -> FlatnessResult:
    """``flatness`` of the merged models ``W + t·s·B A`` for every ``t`` in ``[t0, t1]``, the
    interval cut into ``pieces`` equal segments each certified on its own (tighter: each piece
    moves the weights less) and combined per sample: the certified loss is the largest of the
    pieces', a sample is certified (stable) when every piece certifies it, the attack's loss is
    the largest found. ``bounded_base``: the ``BoundedModel`` of the model before ``add_lora``;
    ``model``: the adapted one."""
    if not (isinstance(pieces, int) and pieces >= 1):
        raise VerifierError(f"pieces must be an integer >= 1, got {pieces!r}")
    t0, t1 = (float(v) for v in t)
    edges = [t0 + (t1 - t0) * k / pieces for k in range(pieces + 1)]
    rs = [flatness(bounded_base, data, merge_segment(model, (a, b)), **kw)
          for a, b in zip(edges[:-1], edges[1:])]
    if len(rs) == 1:
        return rs[0]
    cpu = torch.device("cpu")   # per-sample summaries (Python lists) of the pieces
    per = torch.tensor([r.per_sample_certified for r in rs], dtype=torch.float64, device=cpu).max(0).values
    correct = torch.tensor([r.per_sample_correct for r in rs], device=cpu).all(0)
    stable = torch.tensor([r.per_sample_stable for r in rs], device=cpu).all(0)
    first = rs[0]
    return FlatnessResult(
        n=first.n, clean_loss=first.clean_loss, certified_loss=float(per.mean()),
        attack_loss=max(r.attack_loss for r in rs), clean_accuracy=first.clean_accuracy,
        # a sample is certified (stable) on the union when it is in every piece
        certified_accuracy=float(correct.double().mean()), stable_fraction=float(stable.double().mean()),
        method=first.method, time_s=sum(r.time_s for r in rs), per_sample_certified=per.tolist(),
        label=f"t in [{t0:g}, {t1:g}], {pieces} pieces", per_sample_correct=correct.tolist(),
        per_sample_stable=stable.tolist())


def merged(model: nn.Module, t: float = 1.0) -> nn.Module:
    """A copy with every adapter merged into its base weight at scale ``t`` (plain layers, the
    architecture of the model before ``add_lora``)."""
    out = copy.deepcopy(model)
    for n, m in adapters(out).items():
        _set_module(out, n, m.merged(t))
    return out.eval()


def base_weights(model: nn.Module) -> list[str]:
    """The names of the adapted layers' own (frozen) weights in the adapted model,
    ``NAME.base.weight``: a set on them is full fine-tuning of those layers."""
    return [f"{n}.base.weight" for n in adapters(model)]


def adapter_sensitivity(bounded, module: nn.Module, data, eps: float, full: bool = False,
                        **kw) -> list[FlatnessResult]:
    """Per adapted layer, the certified (and attacked) loss rise when only its adapter moves
    (``lora_A`` and ``lora_B`` in an L-inf ball of radius ``eps``), or with ``full`` its base
    weight instead (full fine-tuning of that layer at the same radius per entry); ranked by
    certified increase, largest first. ``bounded``: the ``BoundedModel`` of ``module`` (the
    adapted model); ``kw`` go to ``flatness``."""
    out = []
    for n, names in adapter_parameters(module).items():
        chosen = [f"{n}.base.weight"] if full else names
        out.append(flatness(bounded, data, WeightPerturbation(chosen, eps), label=n, **kw))
    return sorted(out, key=lambda r: -r.certified_increase)


def enclosing_radii(model: nn.Module, eps: float, names: str = "adapted") -> dict[str, torch.Tensor]:
    """Per-element radii on each adapted layer's base weight of the L-inf box that holds every
    effective weight ``W + s·(B + dB)(A + dA)`` with ``|dA|, |dB| <= eps``: ``|s·(B dA + dB A +
    dB dA)|_oi <= s·eps·(sum_r |B_or| + sum_r |A_ri| + rank·eps)``. Keys ``NAME.base.weight``
    (``names="adapted"``, the adapted model's) or ``NAME.weight`` (``"base"``, the model before
    ``add_lora``). ``WeightPerturbation(None, enclosing_radii(lora, eps))`` holds the adapter
    ball's models: its certified loss also bounds theirs."""
    if not (math.isfinite(eps) and eps >= 0):
        raise VerifierError(f"eps must be a finite number >= 0, got {eps!r}")
    if names not in ("adapted", "base"):
        raise VerifierError(f"names must be 'adapted' or 'base', got {names!r}")
    out = {}
    for n, m in adapters(model).items():
        A, B = m.lora_A.weight.detach().double(), m.lora_B.weight.detach().double()
        r = m.scale * eps * (B.abs().sum(1, keepdim=True) + A.abs().sum(0, keepdim=True) + m.rank * eps)
        key = f"{n}.base.weight" if names == "adapted" else f"{n}.weight"
        out[key] = r * (1 + 1e-6)   # slack for the float32 product of the model
    return out


def fit_adapters(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100,
                 lr: float = 1e-2, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Cross-entropy training of the adapter parameters only (Adam, ``steps`` minibatches);
    -> the loss per step. The model is left in eval mode."""
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    if not params:
        raise VerifierError("the model has no LoRA adapters (add them with add_lora)")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)   # the same draws on any device
    losses = []
    model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen,
                                device="cpu").to(x.device)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    return losses
