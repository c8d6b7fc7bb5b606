"""``verifier train``: certified training (IBP, CROWN-IBP, MTL-IBP, CC-IBP, SABR) from a config
file and flags.

The modules that import torch are imported inside the commands, so that ``verifier --help``
and argument errors answer without torch (tests/cli/test_cli_main.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..train.config import AUTO_GRID, METHODS, default, load_config
from .lipschitz import cmd_train_lipschitz, lipschitz_train_arguments
from .util import (EXIT_OK, CliError, device_name, finite_float, nonneg_float, nonneg_int,
                   output_dir, positive_int)

TRAIN_DESCRIPTION = """\
Train a classifier to be certifiably robust under an L-inf ball of radius --eps (pixel scale,
inputs in [0, 1]) with bound-propagation losses, then evaluate it on the test set. --method:
  ibp        ce(m)                                m: IBP lower bounds of the margins f_y - f_j
  crown-ibp  ce(beta*m_crown_ibp + (1-beta)*m)    over the eps ball, ce(v) = log(1 + sum exp(-v_j))
             (--loss-fusion: beta*U + (1-beta)*ce(m), U: CROWN-IBP's bound on the CE itself)
  mtl-ibp    (1-alpha)*ce(z_adv) + alpha*ce(m)    z_adv: the margins at a PGD point of the ball
  cc-ibp     ce((1-alpha)*z_adv + alpha*m)        (De Palma et al. 2024)
  sabr       ce(m_S)   m_S: IBP over the box of radius sabr_lambda*eps around a PGD point of
             the ball shrunk so that the box stays inside it (Mueller et al. 2023)
each mixed with the natural loss as kappa*natural + (1-kappa)*loss while eps ramps up.
Settings come from a config file (YAML or TOML: the keys of verifier.train.TrainConfig, see
docs/howto-train.md) with the flags below overriding it.
A checkpoint is written after every epoch (OUTPUT/checkpoint.pt); --resume continues a stopped
run from it, ending with the same weights as an uninterrupted run. At the end OUTPUT holds
model.pt (state dict; with --ema-decay the moving average, the last weights in model_last.pt),
model.onnx, report.json and report.png: clean accuracy, PGD accuracy,
certified accuracy by each method of the config key eval_methods, and certified accuracy
against eps (eval_eps)."""

TRAIN_EPILOG = """\
examples:
  verifier train --dataset digits --model mlp --model-kwargs '{"in_dim": 64, "hidden": [64]}' \\
      --eps 0.1 --epochs 20 --output runs/digits
  verifier train --config mnist.yaml --eps 0.3 --train-eps 0.4 --output runs/mnist03
  verifier train --config mnist.yaml --output runs/mnist03 --resume"""

# flag -> config key, for the flags that map one to one
_FLAGS = ["dataset", "train_path", "test_path", "train_subset", "test_subset", "model", "method",
          "eps", "train_eps", "schedule", "epochs", "warmup_epochs", "ramp_epochs", "batch_size",
          "lr", "seed", "output", "threads", "device", "pgd_weight", "reg_weight", "eval_eps",
          "alpha", "sabr_lambda", "pgd_steps", "loss_fusion", "augment_shift", "ema_decay"]


def _default(key: str) -> str:
    """``(default X)``: the default of a TrainConfig key (the one source of defaults; a flag that
    is not given leaves the config file's value, else that default)."""
    v = default(key)
    if isinstance(v, list):
        v = " ".join(map(str, v)) or "none"
    return f"(default {v})"


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a YAML (.yaml/.yml) or TOML (.toml) config file")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["digits", "idx", "npz"],
                   help="digits (scikit-learn's 8x8 digits), idx (a folder of MNIST-format files), "
                        f"npz (files with arrays images and labels) {_default('dataset')}")
    g.add_argument("--train-path", metavar="PATH", help="idx: the folder; npz: the training file")
    g.add_argument("--test-path", metavar="PATH", help="npz: the test file (idx: the same folder)")
    g.add_argument("--train-subset", type=positive_int, metavar="N", help="the first N training samples")
    g.add_argument("--test-subset", type=positive_int, metavar="N", help="the first N test samples")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", metavar="NAME", help="a zoo model (models/architectures.py: mlp, "
                   f"small_cnn, cnn_cert, ...) or package.module:function {_default('model')}")
    g.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments of the model, a JSON object")
    g.add_argument("--method", choices=list(METHODS),
                   help=f"the loss (formulas above) {_default('method')}")
    g.add_argument("--alpha", type=nonneg_float,
                   help=f"mtl-ibp, cc-ibp: the IBP share of the mix, in [0, 1] {_default('alpha')}")
    g.add_argument("--sabr-lambda", type=nonneg_float,
                   help=f"sabr: the small box's radius over eps, in (0, 1] {_default('sabr_lambda')}")
    g.add_argument("--pgd-steps", type=int, metavar="N",
                   help="steps of the training attack (mtl-ibp, cc-ibp, sabr, --pgd-weight) "
                        f"{_default('pgd_steps')}")
    g.add_argument("--loss-fusion", action="store_true", default=None,
                   help="crown-ibp: bound the cross-entropy itself, one backward row per sample "
                        "instead of one per margin (faster, can be looser; docs/howto-train.md) "
                        f"{_default('loss_fusion')}")
    g.add_argument("--eps", type=nonneg_float,
                   help=f"the target L-inf radius (evaluation) {_default('eps')}")
    g.add_argument("--train-eps", type=nonneg_float, help="the radius trained at (default --eps)")
    g.add_argument("--schedule", choices=["smooth", "linear"],
                   help=f"the eps ramp's shape {_default('schedule')}")
    g.add_argument("--warmup-epochs", type=int, metavar="N",
                   help=f"epochs at eps 0 {_default('warmup_epochs')}")
    g.add_argument("--ramp-epochs", type=int, metavar="N",
                   help=f"epochs of the eps ramp {_default('ramp_epochs')}")
    g.add_argument("--pgd-weight", type=nonneg_float,
                   help=f"weight of an adversarial (PGD) loss term {_default('pgd_weight')}")
    g.add_argument("--reg-weight", type=nonneg_float,
                   help=f"weight of the warm-up regularizers {_default('reg_weight')}")
    g.add_argument("--augment-shift", type=nonneg_int, metavar="K",
                   help="move each training image by a random offset of up to K pixels per axis, "
                        f"zero-filled {_default('augment_shift')}")
    g = p.add_argument_group("optimization and output")
    g.add_argument("--epochs", type=positive_int, metavar="N",
                   help=f"training epochs {_default('epochs')}")
    g.add_argument("--batch-size", type=positive_int, metavar="N",
                   help=f"samples per optimizer step {_default('batch_size')}")
    g.add_argument("--lr", type=finite_float, help=f"Adam's learning rate {_default('lr')}")
    g.add_argument("--ema-decay", type=finite_float, metavar="D",
                   help="the model is a moving average of the weights, decay D per step, e.g. "
                        "0.999; the last weights are saved as model_last.pt (0: off) "
                        f"{_default('ema_decay')}")
    g.add_argument("--seed", type=int,
                   help=f"the weights' and the shuffling's seed {_default('seed')}")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help=f"torch threads {_default('threads')}")
    g.add_argument("--device", type=device_name, metavar="DEV",
                   help="where the model trains and is evaluated: cpu, cuda, cuda:N, or auto (a "
                        f"GPU when one is visible) {_default('device')}")
    g.add_argument("--output", metavar="DIR", type=output_dir,
                   help=f"the run folder (checkpoint, model, report) {_default('output')}")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    g.add_argument("--eval-eps", type=nonneg_float, nargs="*", metavar="E",
                   help="the radii of the report's certified-accuracy-against-eps plot (IBP and "
                        "CROWN-IBP on every test sample); given without values: no plot "
                        f"(default --eps times {' '.join(f'{f:g}' for f in AUTO_GRID)})")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")
    lipschitz_train_arguments(p)


def cmd_train(a: argparse.Namespace) -> int:
    if getattr(a, "lipschitz", None) is not None:
        return cmd_train_lipschitz(a)
    from ..train.run import run_training
    overrides = {k: getattr(a, k) for k in _FLAGS}
    if a.model_kwargs is not None:
        try:
            kw = json.loads(a.model_kwargs)
        except json.JSONDecodeError as e:
            raise CliError(f"--model-kwargs is not valid JSON: {e}") from None
        if not isinstance(kw, dict):
            raise CliError("--model-kwargs must be a JSON object of keyword arguments")
        overrides["model_kwargs"] = kw
    cfg = load_config(a.config, overrides)
    report = run_training(cfg, resume=a.resume, progress=not a.no_progress and sys.stderr.isatty())
    if a.json:
        print(json.dumps(report))
        _print_warnings(report)
        return EXIT_OK
    cert = "  ".join(f"{m} {v:.4f}" for m, v in report["certified_acc"].items())
    print(f"{report['dataset']}: {report['n']} test samples, eps {report['eps']}")
    print(f"clean accuracy     {report['clean_acc']:.4f}")
    print(f"PGD accuracy       {report['pgd_acc']:.4f}  ({report['pgd_steps']} steps)")
    print(f"certified accuracy {cert}")
    print(f"training {report['train_time_s']:.1f} s, evaluation {report['eval_time_s']:.1f} s; "
          f"files in {cfg.output}: model.pt{' model_last.pt' if cfg.ema_decay > 0 else ''} "
          "model.onnx report.json report.png")
    _print_warnings(report)
    return EXIT_OK


def _print_warnings(report: dict) -> None:
    """The report's warnings (a near-chance model), last, on stderr: one line each."""
    sys.stdout.flush()
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
