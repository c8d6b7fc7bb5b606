"""Lipschitz-constrained training: any weight constraint x (Muon | AdamW), then certificates.

Every weight of a ``nn.Linear`` and ``nn.Conv1d/2d`` is constrained after every optimizer step
(and once at initialization, so the invariant holds from the start):

* a Linear weight ``W`` gets ``sigma_max(W) <= w_max``;
* a convolution kernel ``K: [c_out, c_in, *k]`` is constrained through its matrix
  ``K_mat: [c_out, c_in * prod(k)]`` to ``w_max / sqrt(overlap)``, where overlap (at most
  prod(k)) is the most patches one input pixel falls into: the convolution's output is
  ``K_mat`` applied to every patch, so ``||conv x||^2 <= ||K_mat||^2 sum_patches ||patch||^2
  <= ||K_mat||^2 overlap ||x||^2`` and the operator norm is <= w_max.

So a chain of such layers with 1-Lipschitz activations has a constant <= w_max^depth; the
certified constant (``certify.lipschitz_constant``, from the stored weights) is usually smaller.

Optimizers: ``muon``: ``torch.optim.Muon`` for the 2-D weights (Linear), AdamW for the rest
(biases, convolution kernels, which Muon does not take); ``adamw``: AdamW for everything.
Weight decay is 0 except for the ``weight_decay`` baseline (no constraint, decay
``weight_decay``). The soft cap is coupled to the step: a matrix that met the cap and took a Muon
step of adjusted lr eta has ``sigma_max <= w_max + 1.25 eta``; after an AdamW step,
``sigma_max <= w_max + ||dW||_F``; the cap uses that bound (never above ``||W||_F``).

Loss: cross-entropy of ``temperature · f(x)``: a w_max-constrained network has small logits,
and the temperature sets how hard the loss pushes the margins.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device_names import check_device_name
from ..devices import resolve_device
from ..errors import DeviceError
from ..train.config import ConfigError
from ..train.evaluation import export_onnx
from ..train.trainer import build_model, load_data
from ..analysis.lipschitz import crown_l2, lipschitz_certify, lipschitz_constant
from .constraints import CONSTRAINTS, MUON_UPDATE_NORM, apply_constraint
from ..ops.norms import window_overlap

OPTIMIZERS = ("muon", "adamw")


@dataclass
class LipschitzConfig:
    """Every setting of a Lipschitz-constrained run (data keys as in ``TrainConfig``)."""

    dataset: str = "digits"                # digits | idx | npz
    train_path: str | None = None
    test_path: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    constraint: str = "spectral_soft_cap"  # one of CONSTRAINTS
    w_max: float = 1.0                     # per-layer spectral norm cap
    optimizer: str = "muon"                # muon | adamw
    lr: float = 0.02                       # Muon's lr (matrices) ...
    adamw_lr: float = 1e-3                 # ... and AdamW's (the rest, or all with adamw)
    weight_decay: float = 0.01             # only for the weight_decay baseline
    temperature: float = 2.0               # the loss is CE(temperature * logits)
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    threads: int = 1
    device: str = "cpu"                   # cpu | cuda | cuda:N | auto
    output: str | None = None              # folder for model.pt, model.onnx, report.json
    radii: list = field(default_factory=lambda: [0.5, 1.0])
    crown: bool = True                     # also run CROWN's L2 verification at each radius
    crown_subset: int | None = None        # CROWN on the first N test samples only
    domain: list | None = None             # [lo, hi]: the constant on inputs in that box
                                           # (needed by attention); None: global
    ibp_init: bool = False                 # (read by the shared model builder; unused here)
    method: str = "natural"

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"config key {key!r}: {why}")
        if self.constraint not in CONSTRAINTS:
            bad("constraint", f"{self.constraint!r} is not one of {', '.join(CONSTRAINTS)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"{self.optimizer!r} is not muon or adamw")
        for k in ("w_max", "lr", "adamw_lr", "temperature"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                bad(k, f"must be a positive number, got {v}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        for k in ("epochs", "batch_size", "threads"):
            if getattr(self, k) < 1:
                bad(k, f"must be >= 1, got {getattr(self, k)}")
        if any(not (r > 0) for r in self.radii):
            bad("radii", f"must be positive, got {self.radii}")
        if self.domain is not None:
            if (len(self.domain) != 2 or not all(isinstance(v, (int, float)) for v in self.domain)
                    or not self.domain[0] < self.domain[1]):
                bad("domain", f"must be [lo, hi] with lo < hi, got {self.domain}")
        if self.crown_subset is not None and self.crown_subset < 1:
            bad("crown_subset", f"must be >= 1, got {self.crown_subset}")
        try:
            self.device = check_device_name(self.device)
        except DeviceError as e:
            bad("device", str(e))


def constrained_weights(net: nn.Module) -> list[tuple[str, nn.Parameter, float]]:
    """(name, weight, cap on its matrix) for every Linear and Conv1d/2d weight of ``net``."""
    out = []
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            out.append((f"{name}.weight", mod.weight, 1.0))
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            k = mod.kernel_size
            out.append((f"{name}.weight", mod.weight,
                        1.0 / math.sqrt(window_overlap(k, mod.stride, mod.dilation))))
    return out


def project_(net: nn.Module, constraint: str, w_max: float, bounds: dict | None = None) -> None:
    """Apply ``constraint`` in place to every constrained weight (``bounds``: name -> a known
    upper bound on the matrix's sigma_max, for the soft cap)."""
    with torch.no_grad():
        for name, p, scale in constrained_weights(net):
            W = p.reshape(p.shape[0], -1)
            s = None if bounds is None else bounds.get(name)
            p.copy_(apply_constraint(constraint, W, w_max * scale, s).reshape(p.shape))


def _optimizers(net: nn.Module, cfg: LipschitzConfig):
    wd = cfg.weight_decay if cfg.constraint == "weight_decay" else 0.0
    mats = {id(p) for _, p, _ in constrained_weights(net) if p.ndim == 2}
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW(net.parameters(), lr=cfg.adamw_lr, weight_decay=wd)], set()
    muon_params = [p for p in net.parameters() if id(p) in mats]
    rest = [p for p in net.parameters() if id(p) not in mats]
    opts = [torch.optim.Muon(muon_params, lr=cfg.lr, weight_decay=wd)]
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=cfg.adamw_lr, weight_decay=0.0))
    return opts, mats


def _muon_step_norm(p: torch.Tensor, lr: float) -> float:
    """A bound on the spectral norm of one torch.optim.Muon step (its default lr adjustment)."""
    A, B = p.shape[:2]
    return MUON_UPDATE_NORM * lr * math.sqrt(max(1.0, A / B))


@dataclass
class TrainResult:
    net: nn.Module
    history: list
    train_time_s: float


def train_lipschitz(cfg: LipschitzConfig, train_ds, progress: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``train_ds`` under ``cfg.constraint`` (see the module doc)."""
    torch.set_num_threads(cfg.threads)
    dev = resolve_device(cfg.device)
    net = build_model(cfg, train_ds.input_shape, train_ds.n_classes).to(dev).train()
    if cfg.constraint != "weight_decay":
        project_(net, cfg.constraint, cfg.w_max)
    opts, muon_ids = _optimizers(net, cfg)
    caps = {name: cfg.w_max * s for name, _, s in constrained_weights(net)}
    history = []
    t_start = time.perf_counter()
    n = len(train_ds)
    it = range(cfg.epochs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"{cfg.optimizer}+{cfg.constraint}")
    for epoch in it:
        t0 = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=g, device="cpu")  # indexes the data, on the CPU
        tot_loss, correct = 0.0, 0
        for k in range(0, n, cfg.batch_size):
            idx = perm[k:k + cfg.batch_size]
            x, y = train_ds.x[idx].to(dev), train_ds.y[idx].to(dev)
            logits = net(x)
            loss = F.cross_entropy(cfg.temperature * logits, y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            before = ({name: p.detach().clone() for name, p, _ in constrained_weights(net)
                       if id(p) not in muon_ids} if cfg.constraint == "spectral_soft_cap" else {})
            for o in opts:
                o.step()
            if cfg.constraint != "weight_decay":
                bounds = {}
                if cfg.constraint == "spectral_soft_cap":
                    for name, p, _ in constrained_weights(net):
                        step = (_muon_step_norm(p, cfg.lr) if id(p) in muon_ids else
                                float((p.detach() - before[name]).norm()))
                        bounds[name] = caps[name] + step
                project_(net, cfg.constraint, cfg.w_max, bounds)
            tot_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "loss": tot_loss / n, "train_acc": correct / n,
                        "time_s": round(time.perf_counter() - t0, 2)})
    return TrainResult(net.eval(), history, time.perf_counter() - t_start)


def evaluate_lipschitz(net: nn.Module, test_ds, radii=(0.5, 1.0), crown: bool = True,
                       domain=None, crown_subset: int | None = None) -> dict:
    """Certified constant (per layer and overall), clean accuracy, L2 certified accuracy from
    margins at each radius, and CROWN's L2 verified accuracy beside it (on the first
    ``crown_subset`` samples). ``domain=(lo, hi)``: the constant holds for inputs in that box
    (attention needs one); the margin certificate then covers the ball within the box."""
    t0 = time.perf_counter()
    rep = lipschitz_constant(net, test_ds.input_shape,
                             domain=None if domain is None else tuple(domain))
    out = lipschitz_certify(net, test_ds.x, test_ds.y, rep.lipschitz, radii)
    out["layers"] = [l.to_dict() for l in rep.layers]
    if domain is not None:
        out["domain"] = list(domain)
    if crown:
        out["crown_certified_acc"], out["crown_local_constant_median"] = {}, {}
        k = len(test_ds) if crown_subset is None else min(crown_subset, len(test_ds))
        out["crown_n"] = k
        for r in radii:
            c = crown_l2(net, test_ds.x[:k], test_ds.y[:k], r, input_shape=test_ds.input_shape)
            out["crown_certified_acc"][str(r)] = float(c["verified"].double().mean())
            out["crown_local_constant_median"][str(r)] = float(c["local_constant"].median())
    out["n"] = len(test_ds)
    out["eval_time_s"] = round(time.perf_counter() - t0, 1)
    return out


def run_lipschitz(cfg: LipschitzConfig, progress: bool = False, data=None) -> dict:
    """Train, evaluate, and (with ``cfg.output``) write model.pt, model.onnx, report.json."""
    torch.set_num_threads(cfg.threads)
    train_ds, test_ds = data if data is not None else load_data(cfg)
    res = train_lipschitz(cfg, train_ds, progress=progress)
    report = evaluate_lipschitz(res.net, test_ds, cfg.radii, cfg.crown, cfg.domain,
                                cfg.crown_subset)
    report.update(constraint=cfg.constraint, optimizer=cfg.optimizer, w_max=cfg.w_max,
                  epochs=cfg.epochs, dataset=test_ds.name,
                  train_time_s=round(res.train_time_s, 1), history=res.history)
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in res.net.state_dict().items()}, out / "model.pt")
        export_onnx(res.net, train_ds.input_shape, out / "model.onnx")
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    report["net"] = res.net
    return report
