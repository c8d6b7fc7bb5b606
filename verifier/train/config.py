"""The training configuration: one validated dataclass, read from a YAML or TOML file and/or
given as overrides (the command line's flags). Unknown keys, wrong types and invalid
combinations are one-line ``ConfigError``s naming the key."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..deps import require
from ..device_names import check_device_name
from ..errors import DeviceError, VerifierError


class ConfigError(VerifierError):
    """An invalid training configuration (key, value or file)."""


METHODS = ("natural", "ibp", "crown-ibp", "mtl-ibp", "cc-ibp", "sabr")
# the methods whose loss needs an adversarial point (verifier.train.mixed)
ATTACK_METHODS = ("mtl-ibp", "cc-ibp", "sabr")
# the default grid of the certified-accuracy-against-eps plot, in multiples of eps: the fall of
# certified accuracy below, at and past the radius of interest
AUTO_GRID = (0.25, 0.5, 1.0, 1.5, 2.0)
EVAL_METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown", "bab")


@dataclass
class TrainConfig:
    """Every setting of ``verifier train`` (eps in [0, 1] pixel scale, L-inf)."""

    dataset: str = "digits"                # digits | idx | npz
    train_path: str | None = None          # idx: the folder (both splits); npz: the train file
    test_path: str | None = None           # idx: defaults to train_path; npz: the test file
    train_subset: int | None = None        # use the first N training samples
    test_subset: int | None = None         # evaluate on the first N test samples
    model: str = "mlp"                     # a zoo name (models/architectures.py) or module:function
    model_kwargs: dict = field(default_factory=dict)
    method: str = "ibp"                    # natural | ibp | crown-ibp | mtl-ibp | cc-ibp | sabr
    eps: float = 0.1                       # the target radius (evaluation)
    train_eps: float | None = None         # the radius trained at (default: eps)
    epochs: int = 20
    warmup_epochs: int = 1                 # eps = 0
    ramp_epochs: int = 10                  # eps ramps 0 -> train_eps
    schedule: str = "smooth"               # smooth | linear
    kappa_start: float = 1.0               # natural-loss weight at the ramp's start ...
    kappa_end: float = 0.0                 # ... and from its end on
    beta_start: float = 1.0                # CROWN-IBP weight in the mixed lower bound
    beta_end: float = 0.0
    loss_fusion: bool = False              # crown-ibp: bound the cross-entropy itself (1 backward row)
    batch_size: int = 64                   # with lr 2e-3: the README's digits run (clean ~0.8)
    lr: float = 2e-3                       # Adam's learning rate
    lr_milestones: list = field(default_factory=list)   # epochs where lr *= lr_decay
    lr_decay: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    ema_decay: float = 0.0                 # the model shipped: an EMA of the weights (0: the last)
    ibp_init: bool = False                 # Shi et al. 2021 initialization (for models with BatchNorm)
    reg_weight: float = 0.5                # warm-up regularizers' weight (0: off)
    reg_tau: float = 1.0
    weight_eps: float = 0.0                # train under weight perturbations too (0: off) ...
    weight_params: str = "*"               # ... of these parameters (glob) ...
    weight_relative: bool = True           # ... |dW| <= weight_eps |W| (else |dW| <= weight_eps)
    pgd_weight: float = 0.0                # adversarial CE term (0: off)
    augment_shift: int = 0                 # training images moved by up to this many pixels (0: off)
    pgd_steps: int = 5                     # attack steps of that term and of mtl-ibp/cc-ibp/sabr
    alpha: float = 0.5                     # mtl-ibp / cc-ibp: the IBP share of the convex combination
    sabr_lambda: float = 0.4               # sabr: small-box radius / eps
    seed: int = 0
    output: str = "train_out"
    threads: int = 1
    device: str = "cpu"                   # cpu | cuda | cuda:N | auto (a GPU when one is visible)
    eval_methods: list = field(default_factory=lambda: ["ibp", "crown", "alpha-crown"])
    eval_eps: list | None = None           # certified accuracy vs eps (IBP, CROWN-IBP);
                                           # None: eps x AUTO_GRID; []: no grid
    eval_pgd_steps: int = 20
    eval_pgd_restarts: int = 1             # starts of the evaluation's PGD: the centre, then random
    eval_batch: int = 100
    eval_budget_s: float | None = None     # time cap of each method after the first (None: none)
    eval_bab_timeout_s: float = 30.0       # eval method bab: seconds per sample

    def __post_init__(self):
        self.validate()

    @property
    def eps_train(self) -> float:
        return self.eps if self.train_eps is None else self.train_eps

    def eval_eps_grid(self) -> list[float]:
        """The radii of the certified-accuracy-against-eps plot: ``eval_eps`` when given, else
        ``eps`` times ``AUTO_GRID`` (those within [0, 1]; none when eps is 0)."""
        if self.eval_eps is not None:
            return list(self.eval_eps)
        return [g for g in dict.fromkeys(round(self.eps * f, 6) for f in AUTO_GRID) if 0 < g <= 1]

    def validate(self) -> None:
        def bad(key, why):
            raise ConfigError(f"config key {key!r}: {why}")
        if self.dataset not in ("digits", "idx", "npz"):
            bad("dataset", f"{self.dataset!r} is not one of digits, idx, npz")
        if self.dataset != "digits" and not self.train_path:
            bad("train_path", f"dataset {self.dataset} needs train_path")
        if self.dataset == "npz" and not self.test_path:
            bad("test_path", "dataset npz needs test_path (an .npz of test images)")
        if self.method not in METHODS:
            bad("method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        for k in ("eps", "train_eps"):
            v = getattr(self, k)
            if v is not None and not (0 <= v <= 1 and math.isfinite(v)):
                bad(k, f"{v} is outside [0, 1] (pixel scale)")
        for k in ("epochs", "batch_size", "threads", "eval_batch", "eval_pgd_restarts"):
            if getattr(self, k) < 1:
                bad(k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("warmup_epochs", "ramp_epochs", "pgd_steps", "eval_pgd_steps", "seed",
                  "augment_shift"):
            if getattr(self, k) < 0:
                bad(k, f"must be >= 0, got {getattr(self, k)}")
        if self.warmup_epochs + self.ramp_epochs > self.epochs:
            bad("ramp_epochs", f"warmup_epochs + ramp_epochs = {self.warmup_epochs + self.ramp_epochs}"
                               f" exceeds epochs = {self.epochs}")
        if self.schedule not in ("smooth", "linear"):
            bad("schedule", f"{self.schedule!r} is not smooth or linear")
        for k in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            if not 0 <= getattr(self, k) <= 1:
                bad(k, f"must lie in [0, 1], got {getattr(self, k)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be > 0 and finite, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            bad("lr_decay", f"must lie in (0, 1], got {self.lr_decay}")
        if any(not isinstance(m, int) or m < 1 for m in self.lr_milestones):
            bad("lr_milestones", f"must be a list of positive epoch numbers, got {self.lr_milestones}")
        if self.weight_eps > 0 and self.method not in ("ibp", "crown-ibp"):
            bad("weight_eps", "training under weight perturbations needs method ibp or crown-ibp, "
                              f"not {self.method}")
        if self.loss_fusion and self.method != "crown-ibp":
            bad("loss_fusion", f"bounds CROWN-IBP's cross-entropy; method {self.method} has no "
                               "CROWN-IBP pass to fuse")
        if not (0 <= self.alpha <= 1 and math.isfinite(self.alpha)):
            bad("alpha", f"must lie in [0, 1] (0: adversarial loss, 1: IBP loss), got {self.alpha}")
        if not (0 < self.sabr_lambda <= 1 and math.isfinite(self.sabr_lambda)):
            bad("sabr_lambda", f"must lie in (0, 1] (the small box's radius over eps), got "
                               f"{self.sabr_lambda}")
        if self.method in ATTACK_METHODS and self.pgd_steps < 1:
            bad("pgd_steps", f"method {self.method} needs an attack of at least 1 step, got "
                             f"{self.pgd_steps}")
        for k in ("weight_decay", "reg_weight", "pgd_weight", "weight_eps"):
            if getattr(self, k) < 0:
                bad(k, f"must be >= 0, got {getattr(self, k)}")
        if not (0 <= self.ema_decay < 1 and math.isfinite(self.ema_decay)):
            bad("ema_decay", f"must lie in [0, 1) (0: off), got {self.ema_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad("grad_clip", f"must be > 0 or null, got {self.grad_clip}")
        unknown = [m for m in self.eval_methods if m not in EVAL_METHODS]
        if unknown:
            bad("eval_methods", f"{unknown} not among {', '.join(EVAL_METHODS)}")
        if self.eval_budget_s is not None and not self.eval_budget_s > 0:
            bad("eval_budget_s", f"must be > 0 seconds or null, got {self.eval_budget_s}")
        if not (self.eval_bab_timeout_s > 0 and math.isfinite(self.eval_bab_timeout_s)):
            bad("eval_bab_timeout_s", f"must be > 0 seconds, got {self.eval_bab_timeout_s}")
        if self.eval_eps is not None and any(not (0 <= e <= 1) for e in self.eval_eps):
            bad("eval_eps", f"values must lie in [0, 1], got {self.eval_eps}")
        if not isinstance(self.model_kwargs, dict):
            bad("model_kwargs", "must be a mapping of keyword arguments")
        try:
            self.device = check_device_name(self.device)
        except DeviceError as e:
            bad("device", str(e))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_INTS = {"train_subset", "test_subset", "epochs", "warmup_epochs", "ramp_epochs", "batch_size",
         "pgd_steps", "seed", "threads", "eval_pgd_steps", "eval_batch", "eval_pgd_restarts",
         "augment_shift"}
_FLOATS = {"eps", "train_eps", "kappa_start", "kappa_end", "beta_start", "beta_end", "lr",
           "lr_decay", "weight_decay", "ema_decay", "grad_clip", "reg_weight", "reg_tau", "pgd_weight", "weight_eps",
           "eval_budget_s", "alpha", "sabr_lambda", "eval_bab_timeout_s"}
_STRS = {"dataset", "train_path", "test_path", "model", "method", "schedule", "output",
         "weight_params", "device"}
_OPTIONAL = {"train_path", "test_path", "train_subset", "test_subset", "train_eps", "grad_clip",
             "eval_budget_s", "eval_eps"}


def _coerce(key: str, v):
    if v is None:
        if key in _OPTIONAL:
            return None
        raise ConfigError(f"config key {key!r}: null is not allowed")
    if key in _INTS:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {v!r}")
        return v
    if key in _FLOATS:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {v!r}")
        return float(v)
    if key in _STRS:
        if not isinstance(v, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {v!r}")
        return v
    if key in ("ibp_init", "weight_relative", "loss_fusion"):
        if not isinstance(v, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {v!r}")
        return v
    if key == "model_kwargs":
        if not isinstance(v, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {v!r}")
        return dict(v)
    if key in ("lr_milestones", "eval_methods", "eval_eps"):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {v!r}")
        if key == "eval_eps":
            if any(isinstance(e, bool) or not isinstance(e, (int, float)) for e in v):
                raise ConfigError(f"config key {key!r}: expected a list of numbers, got {v!r}")
            return [float(e) for e in v]
        if key == "lr_milestones" and any(isinstance(e, bool) or not isinstance(e, int) for e in v):
            raise ConfigError(f"config key {key!r}: expected a list of integers, got {v!r}")
        return list(v)
    raise ConfigError(f"config key {key!r}: unknown")  # pragma: no cover


def from_dict(d: dict, where: str = "config") -> TrainConfig:
    """Validate a mapping (file contents plus overrides) into a ``TrainConfig``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level")
    kw = {}
    for k, v in d.items():
        if k not in _FIELDS:
            close = difflib.get_close_matches(str(k), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown config key {k!r}{hint}")
        kw[k] = _coerce(k, v)
    return TrainConfig(**kw)


def read_config_file(path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or TOML (.toml) file; parse errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        yaml = require("yaml", f"reading the YAML config {path}")
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"{path}: invalid YAML: {msg}") from None
        d = {} if d is None else d
    else:
        raise ConfigError(f"{path}: unknown config format (use .yaml, .yml or .toml)")
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return d


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """The file's settings (if any) with ``overrides`` (keys with value None are skipped)."""
    d = read_config_file(path) if path is not None else {}
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(d, str(path) if path is not None else "config")


def default(key: str):
    """The default of a ``TrainConfig`` key: the one source of defaults for the Python API and
    the command line (whose flags default to "not given" and state these in their help)."""
    f = _FIELDS[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
