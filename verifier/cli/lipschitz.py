"""``verifier lipschitz`` (a model's certified L2 Lipschitz constant) and the Lipschitz-constrained
mode of ``verifier train`` (``--lipschitz CONSTRAINT``).

The modules that import torch are imported inside the commands, so that ``verifier --help``
and argument errors answer without torch (tests/cli/test_cli_main.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from .util import (EXIT_OK, CliError, check_input_scale, device_arguments, int_or_path, labels_for,
                   load_cli_model, load_npy, model_arguments, positive_int)

LIPSCHITZ_DESCRIPTION = """\
Print a certified upper bound L on the L2 Lipschitz constant of a model,
||f(x) - f(x')||_2 <= L ||x - x'||_2 for all inputs, per layer and overall, composed through the
graph: exact SVD (float64) for dense layers, the FFT bound of the circular convolution on the
padded grid (or the exact SVD of the dense operator when small) for convolutions, max |scale|
for BatchNorm in eval mode, 1 for ReLU / LeakyReLU / Tanh, 1/4 for Sigmoid, products along
chains and sums over residual branches. Every operator without a constant is named in one error.

With --input and --label it also reports, per sample, the certified L2 radius
margin / (sqrt(2) L): no input within it changes the prediction."""

LIPSCHITZ_EPILOG = """\
examples:
  verifier lipschitz models/lip_mnist_softcap_w1.onnx
  verifier lipschitz models/lip_mnist_softcap_w1.onnx --json
  verifier lipschitz model.pt --arch mlp --arch-kwargs '{"in_dim": 64, "hidden": [64], "out": 10}'"""


def lipschitz_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p, "the model")
    p.add_argument("--input", metavar="X.npy", help="samples to certify (with --label)")
    p.add_argument("--label", metavar="Y", help="their labels: an integer or a .npy")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--domain", type=float, nargs=2, metavar=("LO", "HI"),
                   help="the constant on inputs in the box [LO, HI] only (e.g. 0 1 for images): "
                        "attention's products and softmax get one there")
    device_arguments(p)
    p.add_argument("--json", action="store_true",
                   help='print {"lipschitz": L, "layers": [{"name", "op", "constant", '
                        '"cumulative", "how"}, ...]} (plus "radius": [...] with --input)')


def cmd_lipschitz(a: argparse.Namespace) -> int:
    if (a.input is None) != (a.label is None):
        raise CliError("--input and --label go together")
    x = load_npy(a.input, "input file") if a.input is not None else None
    if x is not None:
        check_input_scale(x, f"input file {a.input}")

    import torch

    from ..analysis.lipschitz import certified_radius, lipschitz_constant
    torch.set_num_threads(a.threads)
    model = load_cli_model(a, dtype=torch.float64)
    rep = lipschitz_constant(model, domain=None if a.domain is None else tuple(a.domain))
    out = rep.to_dict()
    if a.domain is not None:
        out["domain"] = list(a.domain)
    if x is not None:
        xt = model.check_input(torch.from_numpy(x), f"input file {a.input}").double()
        with torch.no_grad():
            logits = model.module.double()(xt).reshape(len(xt), -1)
        y = torch.as_tensor(labels_for(int_or_path(a.label), len(xt), logits.shape[1]),
                            device=logits.device).long()
        out["radius"] = certified_radius(logits, y, rep.lipschitz).tolist()
    if a.json:
        print(json.dumps(out))
        return EXIT_OK
    where = "" if a.domain is None else f" on inputs in [{a.domain[0]:g}, {a.domain[1]:g}]"
    print(f"certified L2 Lipschitz constant of {a.model}{where}: {rep.lipschitz:.6g}")
    print(f"  {'node':<16} {'op':<11} {'constant':>12} {'cumulative':>12}  how")
    for l in rep.layers:
        print(f"  {l.name:<16} {l.op:<11} {l.constant:>12.6g} {l.cumulative:>12.6g}  {l.how}")
    if "radius" in out:
        print("certified L2 radius per sample (0: misclassified): "
              + " ".join(f"{r:.4g}" for r in out["radius"]))
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# verifier train --lipschitz
# ------------------------------------------------------------------------------------------

# flags of verifier train that mean nothing for a Lipschitz run
_IBP_ONLY = ["config", "method", "eps", "train_eps", "schedule", "warmup_epochs", "ramp_epochs",
             "pgd_weight", "reg_weight", "eval_eps"]


# verifier.lipschitz.constraints.CONSTRAINTS, spelled out so that --help needs no torch import
CONSTRAINTS = ("spectral_normalize", "spectral_hammer", "spectral_soft_cap", "spectral_hard_cap",
               "svd_clip", "weight_decay")


def lipschitz_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "Lipschitz-constrained training (instead of IBP; uses the data, model, --epochs, "
        "--batch-size, --lr (AdamW), --seed, --threads, --device, --output and --json flags)")
    g.add_argument("--lipschitz", choices=CONSTRAINTS, metavar="CONSTRAINT",
                   help=f"the weight constraint after every step: {', '.join(CONSTRAINTS)}")
    g.add_argument("--w-max", type=float, metavar="W", help="per-layer spectral norm cap (default 1)")
    g.add_argument("--optimizer", choices=["muon", "adamw"],
                   help="muon (Muon on matrices, AdamW on the rest) or adamw (default muon)")
    g.add_argument("--muon-lr", type=float, metavar="LR", help="Muon's learning rate (default 0.02)")
    g.add_argument("--temperature", type=float, help="the loss is CE(T * logits) (default 2)")
    g.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="L2 radii of the certified accuracy (default 0.5 1.0)")
    g.add_argument("--no-crown", action="store_true", help="skip CROWN's L2 verification")
    g.add_argument("--domain", type=float, nargs=2, metavar=("LO", "HI"),
                   help="certify the Lipschitz constant on inputs in [LO, HI] (e.g. 0 1 for "
                        "images; needed by attention); default: global")
    g.add_argument("--crown-subset", type=int, metavar="N",
                   help="run CROWN on the first N test samples only")


def cmd_train_lipschitz(a: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in _IBP_ONLY if getattr(a, k, None) is not None]
    if a.resume:
        given.append("--resume")
    if given:
        raise CliError(f"{', '.join(given)}: not used by --lipschitz training (flags only, no "
                       "config file or resume)")
    from ..lipschitz.train import LipschitzConfig, run_lipschitz
    kw = {k: getattr(a, k) for k in ("dataset", "train_path", "test_path", "train_subset",
                                     "test_subset", "model", "epochs", "batch_size", "seed",
                                     "threads", "device", "output") if getattr(a, k) is not None}
    for flag, key in (("w_max", "w_max"), ("optimizer", "optimizer"), ("muon_lr", "lr"),
                      ("lr", "adamw_lr"), ("temperature", "temperature"), ("radii", "radii")):
        if getattr(a, flag) is not None:
            kw[key] = getattr(a, flag)
    if a.model_kwargs is not None:
        try:
            mk = json.loads(a.model_kwargs)
        except json.JSONDecodeError as e:
            raise CliError(f"--model-kwargs is not valid JSON: {e}") from None
        if not isinstance(mk, dict):
            raise CliError("--model-kwargs must be a JSON object of keyword arguments")
        kw["model_kwargs"] = mk
    if a.domain is not None:
        kw["domain"] = list(a.domain)
    if a.crown_subset is not None:
        kw["crown_subset"] = a.crown_subset
    cfg = LipschitzConfig(constraint=a.lipschitz, crown=not a.no_crown, **kw)
    report = run_lipschitz(cfg, progress=not a.no_progress and sys.stderr.isatty())
    report.pop("net")
    if a.json:
        print(json.dumps(report))
        return EXIT_OK
    print(f"{report['dataset']}: {report['n']} test samples; {cfg.optimizer} + {cfg.constraint}, "
          f"w_max {cfg.w_max:g}, {cfg.epochs} epochs ({report['train_time_s']} s)")
    print(f"clean accuracy          {report['clean_acc']:.4f}")
    print(f"certified Lipschitz L   {report['lipschitz']:.6g}")
    for r, v in report["certified_acc"].items():
        crown = report.get("crown_certified_acc", {}).get(r)
        extra = "" if crown is None else f"   CROWN L2 {crown:.4f}"
        print(f"certified at r={r:<6}  {v:.4f} (margin > sqrt(2) L r){extra}")
    if cfg.output:
        print(f"files in {cfg.output}: model.pt model.onnx config.json report.json")
    return EXIT_OK
