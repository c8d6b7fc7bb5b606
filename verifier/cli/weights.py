"""Weight perturbations on the command line: the ``--weights`` flags of ``verifier bounds`` and
the ``verifier flatness`` and ``verifier sensitivity`` commands.

The modules that import torch are imported inside the commands, so that ``verifier --help``
and argument errors answer without torch (tests/cli/test_cli_main.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from .util import (EXIT_OK, CliError, check_input_scale, device_arguments, load_cli_model,
                   model_arguments,
                   nonneg_float, npz_member_dtype, output_file, plot_file, positive_int,
                   save_output)

FLATNESS_DESCRIPTION = """\
Certified flatness of a classifier on a dataset: an upper bound on the mean cross-entropy loss
of every model whose parameters lie in the set (--weights, --weight-eps), beside the loss of one
model in the set found by a weight-space attack (a lower bound), so the gap is visible. Also the
certified accuracy (correct, and no model in the set changes the prediction). Several
--weight-eps values give a curve (certified max loss against eps), saved with --csv and --plot.
The input is fixed; the data file is an .npz with arrays x (inputs) and y (integer labels)."""

FLATNESS_EPILOG = """\
examples:
  verifier flatness examples/data/lirpa_mnist_fc_3layer.onnx \\
      --data examples/data/mnist_test100.npz --weights '*' --weight-eps 0.001
  # a radius sweep, as a table, a CSV and a plot
  verifier flatness model.onnx --data test.npz --weights '*.weight' \\
      --weight-eps 0.0005 0.001 0.002 --csv curve.csv --plot curve.png"""

DELTA_DESCRIPTION = """\
Certify models produced from a base model by another method, on the inputs of a dataset:
  --other M.onnx   every model W + t (W_other - W) for t in [T0, T1] (default [0, 1]: the whole
                   segment from the base to the other model, e.g. a fine-tuned or merged copy);
                   with --ball, every model within |W_other - W| of W entry-wise (an L-inf ball
                   that holds a quantized copy and every rounding in between);
  --delta D.npz    a task vector: arrays named by parameter, the models W + t delta;
  --quantize BITS  the copy rounded to a symmetric BITS-bit grid (per tensor, or --per-channel),
                   its rounding error taken as an L-inf ball around W; with --any-rounding, the
                   ball of half a grid step, which holds every rounding to that grid.
Reports the certified accuracy and the fraction of samples whose prediction no model in the set
changes, and the certified worst-case loss beside an attack's."""

DELTA_EPILOG = """\
examples:
  verifier delta base.onnx --other finetuned.onnx --data test.npz --t 0 1
  verifier delta examples/data/lirpa_mnist_fc_3layer.onnx --quantize 8 \\
      --data examples/data/mnist_test100.npz"""

SENSITIVITY_DESCRIPTION = """\
Per-module sensitivity: for each module in turn (the parameters sharing a name prefix, such as
fc1 for fc1.weight and fc1.bias), the certified worst-case increase of the mean loss when only
that module's parameters move within the set, and the attack's lower bound. Ranked, largest
first: the modules at the bottom are the ones a fine-tuning or pruning method can touch safely."""

SENSITIVITY_EPILOG = """\
example:
  verifier sensitivity examples/data/lirpa_mnist_fc_3layer.onnx \\
      --data examples/data/mnist_test100.npz --weight-eps 0.01 --relative --plot sens.png"""


def weight_arguments(p: argparse.ArgumentParser, patterns: bool = True, sweep: bool = False) -> None:
    g = p.add_argument_group("parameter set (weight perturbation)")
    if patterns:
        g.add_argument("--weights", action="append", metavar="PATTERN",
                       help="parameters to perturb, by name as the model stores them (ONNX "
                            "initializer names such as fc1.weight); globs (*, ?, [..]) allowed; "
                            "repeatable")
    g.add_argument("--weight-eps", type=nonneg_float, metavar="E", nargs="+" if sweep else None,
                   help="radius of each parameter's set" + (" (several values: a sweep)" if sweep else ""))
    g.add_argument("--weight-norm", choices=("inf", "2"), default="inf",
                   help="inf: every entry moves by at most E; 2: each tensor moves by at most E "
                        "in Frobenius norm (default: inf)")
    g.add_argument("--relative", action="store_true",
                   help="E is relative to each entry's magnitude: |dW| <= E |W| (L-inf only)")


def check_weight_args(a: argparse.Namespace, need: bool) -> bool:
    """-> whether a weight set was asked for; raises on incomplete or contradictory flags."""
    pats = getattr(a, "weights", None)
    eps = a.weight_eps
    if pats is None and eps is None:
        if need:
            raise CliError("give the parameter set: --weight-eps E (and --weights PATTERN)")
        if a.relative or a.weight_norm != "inf":
            raise CliError("--relative and --weight-norm need --weights and --weight-eps")
        return False
    if hasattr(a, "weights") and pats is None:
        raise CliError("--weight-eps needs --weights PATTERN (which parameters move; '*' for all)")
    if eps is None:
        raise CliError("--weights needs --weight-eps E (the radius)")
    if a.relative and a.weight_norm != "inf":
        raise CliError("--relative is element-wise: use it with --weight-norm inf")
    return True


def make_weights(a: argparse.Namespace, eps: float, patterns=None):
    from ..weights import WeightPerturbation
    return WeightPerturbation(patterns if patterns is not None else a.weights, eps,
                              a.weight_norm, a.relative)


def data_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p, "the classifier")
    p.add_argument("--data", required=True, metavar="DATA.npz",
                   help="inputs x [N, *input_shape] and integer labels y [N] (an .npz file)")
    q = p.add_argument_group("how")
    q.add_argument("--method", choices=("ibp", "crown", "crown-ibp", "alpha-crown"), default="crown",
                   help="bound method (default: crown)")
    q.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="use only the first N samples of the data")
    q.add_argument("--batch-size", type=positive_int, default=64, metavar="B",
                   help="samples bounded per call (default 64)")
    q.add_argument("--attack-steps", type=positive_int, default=30, metavar="K",
                   help="steps of the weight-space attack (default 30)")
    q.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch CPU threads (default 1)")
    device_arguments(q)
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the results as JSON")
    o.add_argument("--csv", metavar="F.csv", type=output_file, help="also write the table as CSV")
    o.add_argument("--plot", metavar="F.png", type=plot_file,
                   help="also draw it (PNG; flatness and sensitivity)")


def flatness_arguments(p: argparse.ArgumentParser) -> None:
    data_arguments(p)
    weight_arguments(p, sweep=True)


def sensitivity_arguments(p: argparse.ArgumentParser) -> None:
    data_arguments(p)
    weight_arguments(p, patterns=False)
    p.add_argument("--params", choices=("weight", "bias", "both"), default="weight",
                   help="which parameters of each module move (default: weight)")


def delta_arguments(p: argparse.ArgumentParser) -> None:
    data_arguments(p)
    g = p.add_argument_group("the set of models (one of --other, --delta, --quantize)")
    g.add_argument("--other", metavar="M", help="another model of the same architecture (same "
                                                "format as MODEL)")
    g.add_argument("--delta", metavar="D.npz", help="a task vector: one array per parameter name")
    g.add_argument("--quantize", type=positive_int, metavar="BITS",
                   help="every rounding of the weights to a BITS-bit symmetric grid")
    g.add_argument("--t", nargs=2, type=float, default=None, metavar=("T0", "T1"),
                   help="the segment's range of t (default 0 1)")
    g.add_argument("--ball", action="store_true",
                   help="with --other: the L-inf ball of radius |W_other - W| around W instead "
                        "of the segment")
    g.add_argument("--per-channel", action="store_true",
                   help="with --quantize: one grid step per output channel")
    g.add_argument("--any-rounding", action="store_true",
                   help="with --quantize: certify every rounding to the grid (radius half a step)")


def _models_set(a, model):
    """The parameter set of ``verifier delta`` -> (set, label)."""
    from ..analysis.deltas import parameter_delta, quantization_radii, quantize_parameters
    from ..weights import WeightPerturbation, WeightSegment
    given = [f for f, v in (("--other", a.other), ("--delta", a.delta), ("--quantize", a.quantize))
             if v is not None]
    if len(given) != 1:
        raise CliError("give exactly one of --other, --delta, --quantize" +
                       (f" (got {', '.join(given)})" if given else ""))
    if a.ball and a.other is None:
        raise CliError("--ball goes with --other")
    if (a.per_channel or a.any_rounding) and a.quantize is None:
        raise CliError("--per-channel and --any-rounding go with --quantize")
    if a.t is not None and (a.quantize is not None or a.ball):
        raise CliError("--t sets the range of a segment (--other without --ball, or --delta)")
    if a.quantize is not None:
        if a.any_rounding:
            radii = quantization_radii(model, a.quantize, a.per_channel)
            return WeightPerturbation(None, radii), f"any {a.quantize}-bit"
        q = quantize_parameters(model, a.quantize, a.per_channel)
        radii = {k: d.abs() for k, d in parameter_delta(model, q).items()}
        return WeightPerturbation(None, radii), f"{a.quantize}-bit"
    if a.other is not None:
        from ..model_io import load_model, model_kind
        other = load_model(a.other, a.arch if model_kind(a.model) == "torch" else None,
                           a.arch_kwargs, a.input_shape)
        delta = parameter_delta(model, other)
        if a.ball:
            return WeightPerturbation(None, {k: d.abs() for k, d in delta.items()}), "ball"
    else:
        delta = _load_delta(a.delta)
    if not delta:
        raise CliError("the two models have the same parameters: nothing moves")
    t = tuple(a.t) if a.t is not None else (0.0, 1.0)
    return WeightSegment(delta, t), f"t in [{t[0]:g}, {t[1]:g}]"


def _load_delta(path):
    import os

    import numpy as np
    import torch
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.ndarray):
            raise CliError(f"--delta {path}: a single .npy array; a task vector is an .npz file "
                           "with one array per parameter name: np.savez(PATH, **{name: delta})")
        with z:
            return {k: torch.from_numpy(np.array(z[k], dtype=np.float32)) for k in z.files}
    except CliError:
        raise
    except Exception as e:
        raise CliError(f"{path}: not a readable .npz of arrays ({type(e).__name__}: {e})") from None


def cmd_delta(a: argparse.Namespace) -> int:
    if a.plot:
        raise CliError("--plot draws curves and module bars (flatness, sensitivity); delta has "
                       "no plot: use --csv or --json")
    model, data = _load(a)
    from ..analysis.flatness import flatness
    weights, label = _models_set(a, model)
    r = flatness(model, data, weights, method=a.method, batch_size=a.batch_size,
                 attack_steps=a.attack_steps, label=label, progress=_progress("bounding"))
    a.weight_norm, a.relative = "inf", False
    _finish(a, [r], None, "sets")
    if not a.json:
        print(f"prediction certified unchanged on {r.stable_fraction:.1%} of {r.n} samples "
              f"for every model in the set ({label})")
    return EXIT_OK


def _load(a):
    import os
    if a.plot:  # before the work: a plot needs matplotlib
        from ..analysis.flatness import pyplot
        pyplot()
    for f in (a.model, a.data):
        if not os.path.exists(f):
            raise CliError(f"{f}: no such file")
    import torch

    from ..analysis.flatness import load_npz
    torch.set_num_threads(a.threads)
    model = load_cli_model(a)
    x, y = load_npz(a.data)
    stored = npz_member_dtype(a.data, "x")
    if stored is not None:
        check_input_scale(x.numpy(), f"data file {a.data} (x)", dtype=stored)
    if a.max_samples:
        x, y = x[:a.max_samples], y[:a.max_samples]
    return model, (x, y)


def _progress(what):
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        print(f"\r{what}: {done}/{total} samples", end="" if done < total else "\n",
              file=sys.stderr, flush=True)
    return show


def _table(results, first: str) -> None:
    print(f"{first:>14} {'clean loss':>11} {'certified':>11} {'attack':>11} {'cert. incr.':>11} "
          f"{'att. incr.':>11} {'clean acc':>9} {'cert. acc':>9} {'time s':>7}")
    for r in results:
        print(f"{r.label:>14} {r.clean_loss:>11.5g} {r.certified_loss:>11.5g} {r.attack_loss:>11.5g} "
              f"{r.certified_increase:>11.5g} {r.attack_increase:>11.5g} {r.clean_accuracy:>9.3f} "
              f"{r.certified_accuracy:>9.3f} {r.time_s:>7.2f}")


def _finish(a, results, plot, what: str) -> None:
    """Write the --csv and --plot files, then print the table (or JSON). A file that cannot be
    written after all is saved in the temporary folder instead and reported after the table, as
    an error: the computed results are never lost."""
    from ..analysis.flatness import write_csv
    wrote, problems = [], []
    for path, write, kind in ((a.csv, lambda tmp: write_csv(results, tmp), "the CSV"),
                              (a.plot, plot, "the plot")):
        if path:
            done, problem = save_output(path, write, kind)
            if done is not None and problem is None:
                wrote.append(done)
            if problem is not None:
                problems.append(problem)
    if a.json:
        print(json.dumps({"model": a.model, "data": a.data, "method": a.method,
                          "weight_norm": a.weight_norm, "relative": a.relative,
                          what: [r.summary() for r in results]}))
    else:
        _table(results, {"radii": "eps", "modules": "module"}.get(what, "set"))
        for path in wrote:
            print(f"wrote {path}")
    if problems:
        raise CliError("; ".join(problems))


def cmd_flatness(a: argparse.Namespace) -> int:
    check_weight_args(a, need=True)
    model, data = _load(a)
    from ..analysis.flatness import flatness, plot_curve
    radii = list(a.weight_eps)
    results = [flatness(model, data, make_weights(a, e), method=a.method, batch_size=a.batch_size,
                        attack_steps=a.attack_steps, label=f"{e:g}", progress=_progress(f"eps {e:g}"))
               for e in radii]
    _finish(a, results, lambda path: plot_curve(results, radii, path,
                                                f"{a.model.rsplit('/', 1)[-1]}: {a.method}"), "radii")
    return EXIT_OK


def cmd_sensitivity(a: argparse.Namespace) -> int:
    check_weight_args(a, need=True)
    model, data = _load(a)
    from ..analysis.sensitivity import plot_sensitivity, sensitivity
    results = sensitivity(model, data, a.weight_eps, a.weight_norm, a.relative, params=a.params,
                          method=a.method, batch_size=a.batch_size, attack_steps=a.attack_steps)
    rel = " relative" if a.relative else ""
    norm = "L-inf" if a.weight_norm == "inf" else "L2"
    _finish(a, results, lambda path: plot_sensitivity(
        results, path, f"{norm} eps={a.weight_eps:g}{rel}, {a.method}"), "modules")
    return EXIT_OK


def describe_weights(a) -> str:
    norm = "L-inf" if a.weight_norm == "inf" else "L2 (Frobenius, per tensor)"
    rel = " relative to |W|" if a.relative else ""
    return f"{norm} eps={a.weight_eps:g}{rel} on {', '.join(a.weights)}"
