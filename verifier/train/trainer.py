"""The certified-training loop: epochs of mini-batches, a checkpoint after every epoch, exact
resume.

Determinism: the model is drawn with ``torch.manual_seed(seed)``; epoch ``e`` shuffles with a
generator seeded by ``(seed, e)``, PGD starts draw from a generator seeded by ``(seed, e, step)``
and the shifts of ``augment_shift`` from one seeded by ``(seed, e, step, 1)``, so nothing random depends on how the run got to an epoch. The checkpoint
(``OUTPUT/checkpoint.pt``, written atomically at the end of every epoch) holds the model,
optimizer and lr-scheduler states, the global RNG state, the epoch count and the history; a
resumed run starts at the first unfinished epoch and ends with the same weights as an
uninterrupted one (same config, same number of threads).

With ``ema_decay`` d > 0 the run also keeps an exponential moving average of the model's state
(parameters and BatchNorm statistics; the checkpoint holds it too): after optimizer step n,
``ema = r * ema + (1 - r) * weights`` with ``r = min(d, (1 + n) / (10 + n))``, starting from the
initial weights. The trained model ``train`` returns is then the average; the last weights stay
in ``TrainState.raw``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import BoundedModel
from ..devices import resolve_device
from ..errors import ModelLoadError
from ..graph.live import BatchStats
from ..model_io import build_architecture
from ..weights import WeightPerturbation
from .config import ATTACK_METHODS, ConfigError, TrainConfig, default, to_dict
from .data import Dataset, load_dataset
from .init import ibp_init_
from .losses import certified_margins, fused_robust_ce, pgd_ce, robust_ce, warmup_regularizers
from .mixed import mixed_loss
from .schedule import Schedule

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
# config keys that may differ between a run and its resumption
_RESUME_FREE = {"output", "threads", "device", "eval_methods", "eval_eps", "eval_pgd_steps", "eval_batch",
                "eval_budget_s", "eval_bab_timeout_s", "eval_pgd_restarts", "test_subset", "test_path"}


def load_data(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    train = load_dataset(cfg.dataset, cfg.train_path, "train").subset(cfg.train_subset)
    test_path = cfg.test_path or cfg.train_path
    test = load_dataset(cfg.dataset, test_path, "test").subset(cfg.test_subset)
    return train, test


def build_model(cfg: TrainConfig, input_shape, n_classes: int) -> nn.Module:
    """The architecture named by ``cfg.model`` (zoo name or module:function), seeded."""
    torch.manual_seed(cfg.seed)
    try:
        net, _ = build_architecture(cfg.model, json.dumps(cfg.model_kwargs) if cfg.model_kwargs else None,
                                    input_shape)
    except ModelLoadError as e:
        raise ConfigError(f"config key 'model': {str(e).replace('--arch-kwargs', 'model_kwargs').replace('--arch', 'model')}") from None
    except (TypeError, ValueError) as e:   # an unknown keyword, or a value the builder refuses
        raise ConfigError(f"config key 'model_kwargs': {e}") from None
    with torch.no_grad():
        try:
            out = net.eval()(torch.zeros(2, *input_shape, device="cpu"))
        except Exception as e:
            raise ConfigError(f"model {cfg.model!r} does not take inputs of shape "
                              f"{list(input_shape)}: {type(e).__name__}: {e}") from None
    if tuple(out.shape) != (2, n_classes):
        raise ConfigError(f"model {cfg.model!r} outputs shape {list(out.shape[1:])}, the dataset "
                          f"has {n_classes} classes")
    if cfg.ibp_init and cfg.method != "natural":
        ibp_init_(net, torch.Generator(device="cpu").manual_seed(cfg.seed))
    return net


def _gen(*keys: int) -> torch.Generator:
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2 ** 62)
    return torch.Generator(device="cpu").manual_seed(s)


def random_shift(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ([B, C, H, W]) moved by its own random whole-pixel offset (dy, dx),
    each uniform in [-k, k], the uncovered border filled with 0 (the pixel range's lower end)."""
    if k == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (k, k, k, k))
    dy, dx = torch.randint(0, 2 * k + 1, (2, B), generator=gen, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]


@dataclass
class TrainState:
    net: nn.Module
    bm: BoundedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int          # epochs completed
    history: list
    ema: dict | None = None   # ema_decay > 0: the moving average of net.state_dict()
    raw: dict | None = None   # after train() with ema_decay > 0: the last weights (net holds the EMA)


def ema_rate(decay: float, n: int) -> float:
    """The averaging rate of the n-th update (n = 1, 2, ...): ``min(decay, (1 + n) / (10 + n))``,
    so the first steps do not leave the average stuck near the initial weights."""
    return min(decay, (1 + n) / (10 + n))


def ema_update_(ema: dict, net: nn.Module, rate: float) -> None:
    """``ema <- rate * ema + (1 - rate) * net's state``, in place; integer buffers (BatchNorm's
    batch count) are copied."""
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if ema[k].is_floating_point():
                ema[k].mul_(rate).add_(v.detach(), alpha=1 - rate)
            else:
                ema[k].copy_(v)


def _new_state(cfg: TrainConfig, train: Dataset) -> TrainState:
    net = build_model(cfg, train.input_shape, train.n_classes)
    # traces in eval mode; moves the net to the device before the optimizer sees its parameters
    bm = BoundedModel(net, input_shape=train.input_shape, device=resolve_device(cfg.device))
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones),
                                                 gamma=cfg.lr_decay)
    ema = ({k: v.detach().clone() for k, v in net.state_dict().items()}
           if cfg.ema_decay > 0 else None)
    return TrainState(net, bm, opt, sched, 0, [], ema)


def _save(state: TrainState, cfg: TrainConfig, path: Path) -> None:
    ckpt = {"model": state.net.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "epoch": state.epoch,
            "rng": torch.get_rng_state(), "history": state.history, "config": to_dict(cfg)}
    if state.ema is not None:
        ckpt["ema"] = state.ema
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _load(state: TrainState, cfg: TrainConfig, path: Path) -> None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable checkpoint ({type(e).__name__}; "
                          "torch.load(weights_only=True) refused it)") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(ckpt):
        raise ConfigError(f"{path}: not a training checkpoint of verifier train")
    old, new = ckpt.get("config", {}), to_dict(cfg)
    # a key the checkpoint's config lacks (added since) had its default then
    diff = sorted(k for k in new if k not in _RESUME_FREE and old.get(k, default(k)) != new[k])
    if diff:
        raise ConfigError(f"{path}: --resume with a different config ({', '.join(diff)}); use the "
                          "run's config or another output folder")
    state.net.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.ema is not None:
        if "ema" not in ckpt:
            raise ConfigError(f"{path}: the checkpoint holds no moving average of the weights "
                              "(ema_decay); use the run's config or another output folder")
        for k, v in ckpt["ema"].items():
            state.ema[k].copy_(v)
    state.epoch = int(ckpt["epoch"])
    state.history = list(ckpt.get("history", []))
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"])


def train_step(cfg: TrainConfig, state: TrainState, xb, yb, s: dict, n_classes: int, gen) -> dict:
    """One optimizer step at the schedule point ``s``; -> logged values."""
    net = state.net
    with BatchStats(net) as stats:
        logits = net(xb)
    nat = F.cross_entropy(logits, yb)
    loss, out = nat, {"nat": float(nat.detach()), "acc": float((logits.argmax(1) == yb).float().mean())}
    eps = s["eps"]
    weights = None
    if cfg.weight_eps > 0 and s["progress"] > 0:
        weights = WeightPerturbation(cfg.weight_params, cfg.weight_eps * s["progress"],
                                     relative=cfg.weight_relative)
    if cfg.method in ATTACK_METHODS:
        if eps > 0:
            # the attack, the ball and the small box all use the current (ramped) eps
            rob, nodes, logged = mixed_loss(net, state.bm, xb, yb, eps, cfg.method, n_classes,
                                            alpha=cfg.alpha, lam=cfg.sabr_lambda,
                                            steps=cfg.pgd_steps, generator=gen, batch_stats=stats)
            loss = s["kappa"] * nat + (1 - s["kappa"]) * rob
            out.update(rob=float(rob.detach()), **logged)
            if cfg.reg_weight > 0 and s["progress"] < 1:
                tight, bal = warmup_regularizers(state.bm, nodes, cfg.reg_tau)
                loss = loss + cfg.reg_weight * (1 - s["progress"]) * (tight + bal)
    elif cfg.method != "natural" and (eps > 0 or weights is not None):
        if cfg.loss_fusion:
            per_sample, lower, nodes = fused_robust_ce(state.bm, xb, yb, eps, s["beta"], n_classes,
                                                       batch_stats=stats, weights=weights)
            rob = per_sample.mean()
        else:
            lower, nodes = certified_margins(state.bm, xb, yb, eps, s["beta"], cfg.method, n_classes,
                                             batch_stats=stats, weights=weights)
            rob = robust_ce(lower)
        loss = s["kappa"] * nat + (1 - s["kappa"]) * rob
        out.update(rob=float(rob.detach()), cert=float((lower > 0).all(1).float().mean()))
        if cfg.reg_weight > 0 and s["progress"] < 1 and eps > 0:
            tight, bal = warmup_regularizers(state.bm, nodes, cfg.reg_tau)
            loss = loss + cfg.reg_weight * (1 - s["progress"]) * (tight + bal)
    if cfg.pgd_weight > 0 and eps > 0:
        mode = net.training
        net.eval()
        xa = pgd_ce(net, xb, yb, eps, cfg.pgd_steps, gen)
        net.train(mode)
        adv = F.cross_entropy(net(xa), yb)
        loss = loss + cfg.pgd_weight * adv
        out["adv"] = float(adv.detach())
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    state.optimizer.step()
    out["loss"] = float(loss.detach())
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"the training loss is {out['loss']} (eps {eps:.4g}); lower lr or "
                                 "lengthen the ramp")
    return out


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, callback=None,
          data: tuple[Dataset, Dataset] | None = None) -> TrainState:
    """Train (or resume) per ``cfg``; the checkpoint lives in ``cfg.output``. ``callback(epoch,
    step)`` runs after every optimizer step (tests interrupt runs with it). -> the final state."""
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output)
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose "
                          "another output folder")
    # everything the config can get wrong (data, model, checkpoint) fails before the folder
    # exists; a folder this call made is removed again if the run fails before writing into it
    train_ds, _ = data if data is not None else load_data(cfg)
    if cfg.augment_shift and (train_ds.x.ndim != 4
                              or cfg.augment_shift >= min(train_ds.x.shape[-2:])):
        raise ConfigError(f"config key 'augment_shift': {cfg.augment_shift} pixels needs images "
                          f"[N, C, H, W] larger than the shift; the training data is "
                          f"{list(train_ds.x.shape)}")
    state = _new_state(cfg, train_ds)
    if resume and ckpt_path.exists():
        _load(state, cfg, ckpt_path)
        log.info("resumed from %s after epoch %d", ckpt_path, state.epoch)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        _epochs(cfg, state, train_ds, ckpt_path, progress, callback)
    except BaseException:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    if state.ema is not None:    # the model is the average; the last weights stay in state.raw
        state.raw = {k: v.detach().clone() for k, v in state.net.state_dict().items()}
        state.net.load_state_dict(state.ema)
    state.net.eval()
    return state


def _epochs(cfg: TrainConfig, state: TrainState, train_ds: Dataset, ckpt_path: Path, progress: bool,
            callback) -> None:
    """The epochs from ``state.epoch`` on, a checkpoint after each."""
    from tqdm import tqdm
    N, bs = len(train_ds), cfg.batch_size
    steps = max(1, N // bs) if N >= bs else 1
    schedule = Schedule(cfg.eps_train, cfg.warmup_epochs, cfg.ramp_epochs, steps, cfg.schedule,
                        (cfg.kappa_start, cfg.kappa_end), (cfg.beta_start, cfg.beta_end))
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(N, generator=_gen(cfg.seed, epoch), device="cpu")  # the data's
        state.net.train()
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for step in bar:
            idx = perm[step * bs:(step + 1) * bs]
            s = schedule.at(epoch, step)
            dev = state.bm.device
            xb = train_ds.x[idx]
            if cfg.augment_shift:
                xb = random_shift(xb, cfg.augment_shift, _gen(cfg.seed, epoch, step, 1))
            vals = train_step(cfg, state, xb.to(dev), train_ds.y[idx].to(dev), s,
                              train_ds.n_classes,
                              _gen(cfg.seed, epoch, step))
            if state.ema is not None:
                ema_update_(state.ema, state.net, ema_rate(cfg.ema_decay, epoch * steps + step + 1))
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(eps=f"{s['eps']:.3f}", loss=f"{vals['loss']:.3f}")
            if callback is not None:
                callback(epoch, step)
        state.scheduler.step()
        state.epoch = epoch + 1
        rec = {"epoch": epoch + 1, "eps": s["eps"], "lr": state.optimizer.param_groups[0]["lr"],
               "time_s": round(time.perf_counter() - t0, 3),
               **{k: v / steps for k, v in sums.items()}}
        state.history.append(rec)
        _save(state, cfg, ckpt_path)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in rec.items()))
