"""``verifier bounds``: bounds of a model's outputs or margins over an input set (an Lp ball or
a box), optionally over a set of parameter values too; a table or JSON.

torch is imported inside ``cmd_bounds`` only, so that ``verifier bounds --help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import time

from . import weights as cw
from ..report import per_layer_widths
from .util import (EXIT_OK, CliError, check_box, check_finite, check_input_scale, finite_float,
                   device_arguments, int_or_path, labels_for, load_cli_model, load_npy,
                   model_arguments,
                   nonneg_float, positive_int)

BOUNDS_DESCRIPTION = """\
Bound the outputs of a classifier (an ONNX file, or a PyTorch state dict with --arch) over a
set of inputs: an Lp ball around --input (radius --eps, optionally clipped to [LO, HI]) or the
box [--lower, --upper], or a zonotope of style shifts around --input (--style, --generators,
optionally on an intermediate node --at), and optionally over a set of parameter values
(--weights, --weight-eps; then --input without --eps keeps the input fixed). With --label Y it bounds the margins
f_Y(x) - f_j(x) for every j != Y in ascending j; the sample is verified when every margin's
lower bound is > 0.

The .npy files hold one input (with or without a leading batch dimension of 1) or a batch of
N inputs [N, *input_shape]; every sample is bounded in one batched call."""

BOUNDS_EPILOG = """\
examples:
  # CROWN margins of one MNIST digit under an L-inf ball of radius 0.03
  verifier bounds examples/data/lirpa_mnist_fc_3layer.onnx \\
      --input examples/data/mnist_sample.npy --eps 0.03 --label examples/data/mnist_label.npy

  # IBP bounds of the logits of 5 samples over explicit boxes, as JSON
  verifier bounds model.onnx --lower xl.npy --upper xu.npy --method ibp --json

  # margins under per-channel mean/std shifts (|scale| <= 0.05, |shift| <= 0.05) of the first
  # feature map of the zoo's MNIST CNN
  verifier bounds models/nat_mnist.onnx --input examples/data/mnist_sample.npy \\
      --label examples/data/mnist_label.npy --style 0.05 0.05 --at _1_relu

  # margins when every weight of the model moves by at most 0.1% of its value (fixed input)
  verifier bounds examples/data/lirpa_mnist_fc_3layer.onnx --input examples/data/mnist_sample.npy \\
      --label examples/data/mnist_label.npy --weights '*.weight' --weight-eps 0.001 --relative"""


# the same text as docs/cli.md's table (tests/test_docs_facts.py compares them)
METHOD_HELP = ("ibp: interval bounds (fast, loose); crown: backward linear bounds with CROWN "
               "intermediate bounds; crown-ibp: CROWN on the output with IBP intermediate bounds; "
               "alpha-crown: CROWN whose relaxations' free parameters (ReLU lower slopes, "
               "sigmoid and tanh tangent points, ...) are optimized by gradient steps, for the "
               "pre-activation bounds layer by layer (on a transformer: the Q, K and V of the blocks "
               "after the first) and then for the output; never looser than crown (tightest, "
               "slower) (default: crown)")


def bounds_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    ball = p.add_argument_group(
        "input set, form 1: an Lp ball (exclusive with form 2)")
    ball.add_argument("--input", metavar="X.npy",
                      help="center(s) of the ball: one input, or a batch [N, *input_shape]")
    ball.add_argument("--eps", type=nonneg_float, metavar="E",
                      help="radius of the ball (>= 0), in the model's input units; required "
                           "with --input")
    ball.add_argument("--norm", choices=("inf", "2", "1"),
                      help="the norm of the ball: L-inf, L2 or L1 (default: inf)")
    ball.add_argument("--clip", nargs=2, type=finite_float, metavar=("LO", "HI"),
                      help="also keep every input entry in [LO, HI], e.g. the valid pixel range "
                           "(default: no clipping)")
    zon = p.add_argument_group(
        "input set, form 3: a zonotope around --input, x + z G with z in [-1, 1]^k (instead "
        "of --eps)")
    zon.add_argument("--style", nargs=2, type=nonneg_float, metavar=("SIGMA", "TAU"),
                     help="per-channel mean/std shift of --input (or of node --at's value): "
                          "y_c = mu_c + (1 + s_c)(x_c - mu_c) + t_c with |s_c| <= SIGMA, "
                          "|t_c| <= TAU, mu_c the channel's mean (2 generators per channel)")
    zon.add_argument("--generators", metavar="G.npy",
                     help="your own generators: [k, *shape] shared by the samples or "
                          "[N, k, *shape], shape the input's (or node --at's)")
    zon.add_argument("--at", metavar="NODE",
                     help="place the set on this intermediate node instead of the input: its "
                          "value at --input is shifted, the model downstream is bounded "
                          "(node names: the keys of the API's BoundResult.nodes)")
    box = p.add_argument_group("input set, form 2: a box (exclusive with form 1)")
    box.add_argument("--lower", metavar="XL.npy",
                     help="lower corner(s) of the box, shaped like --input")
    box.add_argument("--upper", metavar="XU.npy",
                     help="upper corner(s) of the box; needs --lower, and lower <= upper")
    q = p.add_argument_group("what to bound and how")
    q.add_argument("--method", choices=("ibp", "crown", "crown-ibp", "alpha-crown"), default="crown",
                   help=METHOD_HELP)
    q.add_argument("--label", type=int_or_path, metavar="Y",
                   help="the correct class: an integer, or a .npy file of integers (one per "
                        "sample, or one for all); bounds the margins f_Y - f_j for j != Y "
                        "instead of the outputs, and reports whether each sample is verified")
    q.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating-point precision of the bound computation (default: float32)")
    q.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch CPU threads (default: 1). Bounding a small batch runs many small "
                        "kernels, which get much slower with more threads on a busy machine; "
                        "raise it for big batches or big models on an idle machine")
    device_arguments(p)
    cw.weight_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object on stdout: {"lower": [[...] per sample], '
                          '"upper": [[...] per sample], "verified": [bool per sample] or null '
                          'without --label, "time_s": seconds spent bounding (not loading)}')
    out.add_argument("--per-layer", action="store_true",
                     help="with --json: also bound every node with ibp, crown and alpha-crown and "
                          'add "method" and "per_layer" (mean bound width per node and method) '
                          "to the JSON, for 'verifier report'")


def _check_bounds_args(a: argparse.Namespace) -> None:
    """The combinations argparse cannot express: one input-set form, complete."""
    ball = [f for f, v in (("--input", a.input), ("--eps", a.eps), ("--norm", a.norm),
                           ("--clip", a.clip)) if v is not None]
    box = [f for f, v in (("--lower", a.lower), ("--upper", a.upper)) if v is not None]
    if ball and box:
        raise CliError(f"{', '.join(ball)} and {', '.join(box)} exclude each other: give either "
                       "--input X.npy --eps E (an Lp ball) or --lower XL.npy --upper XU.npy "
                       "(a box)")
    if not ball and not box:
        raise CliError("no input set: give --input X.npy --eps E (an Lp ball) or "
                       "--lower XL.npy --upper XU.npy (a box)")
    if ball and a.input is None:
        raise CliError(f"{ball[0]} needs --input X.npy (the center of the ball)")
    zono = [f for f, v in (("--style", a.style), ("--generators", a.generators)) if v is not None]
    if a.at is not None and not zono:
        raise CliError("--at NODE needs --style SIGMA TAU or --generators G.npy")
    if zono:
        if len(zono) > 1:
            raise CliError("--style and --generators exclude each other: give one")
        if box or a.input is None:
            raise CliError(f"{zono[0]} needs --input X.npy (the center of the zonotope) and no "
                           "--lower/--upper")
        clash = [f for f, v in (("--eps", a.eps), ("--norm", a.norm), ("--clip", a.clip),
                                ("--weights", a.weights)) if v]
        if clash:
            raise CliError(f"{zono[0]} and {', '.join(clash)} exclude each other: the zonotope "
                           "is the whole set")
        return
    if ball and a.eps is None and not cw.check_weight_args(a, need=False):
        raise CliError("--input needs --eps E (the radius of the ball; with --weights, no --eps "
                       "keeps the input fixed)")
    if a.eps is None and a.norm is not None or a.eps is None and a.clip is not None:
        raise CliError("--norm and --clip need --eps E")
    if box and (a.lower is None or a.upper is None):
        raise CliError("--lower and --upper go together: give both")
    if a.clip is not None and a.clip[0] > a.clip[1]:
        raise CliError(f"--clip {a.clip[0]:g} {a.clip[1]:g}: LO > HI, the range is empty")
    cw.check_weight_args(a, need=False)


def _describe_set(a: argparse.Namespace, n: int) -> str:
    s = "" if n == 1 else "s"
    if a.weights:
        fixed = not a.eps
        a2 = argparse.Namespace(**{**vars(a), "weights": None})
        inp = f"fixed input {a.input} ({n} sample{s})" if fixed else _describe_set(a2, n)
        return f"{inp}; parameters: {cw.describe_weights(a)}"
    where = "" if a.at is None else f" of node {a.at}'s value"
    if a.style is not None:
        return (f"per-channel mean/std shift sigma={a.style[0]:g} tau={a.style[1]:g}{where} at "
                f"{a.input} ({n} sample{s})")
    if a.generators is not None:
        return f"zonotope with generators {a.generators}{where} around {a.input} ({n} sample{s})"
    if a.input is not None:
        norm = {"inf": "L-inf", "2": "L2", "1": "L1"}[a.norm or "inf"]
        clip = "" if a.clip is None else f" clipped to [{a.clip[0]:g}, {a.clip[1]:g}]"
        return f"{norm} ball eps={a.eps:g}{clip} around {a.input} ({n} sample{s})"
    return f"box [{a.lower}, {a.upper}] ({n} sample{s})"


def _print_table(a, lower, upper, labels, verified, n_out, time_s, proved_by=None) -> None:
    print(f"{a.method} bounds of {a.model}")
    print(f"input set: {_describe_set(a, len(lower))}")
    for i, (lo, up) in enumerate(zip(lower, upper)):
        print()
        if labels is None:
            print(f"sample {i}: outputs")
            rows, head = list(range(len(lo))), "output"
        else:
            y = int(labels[i])
            print(f"sample {i} (label {y}): margins f_{y} - f_j")
            rows, head = [j for j in range(n_out) if j != y], "j"
        print(f"  {head:>6} {'lower':>14} {'upper':>14}")
        for r, l_, u_ in zip(rows, lo, up):
            print(f"  {r:>6} {l_:>14.6g} {u_:>14.6g}")
        if verified is not None:
            k = min(range(len(lo)), key=lambda t: lo[t])
            word = f"yes ({proved_by[i]})" if verified[i] else "no"
            print(f"  verified: {word} (smallest margin lower bound {lo[k]:.6g} at j={rows[k]})")
    if verified is not None:
        print(f"\nverified: {sum(verified)} of {len(verified)} samples")
    print(f"time: {time_s:.4f} s bounding (not counting model loading)")


def _zonotope(a: argparse.Namespace, model, center):
    """The zonotope of --style / --generators around the input, or around node --at's value
    there: a Zonotope, or ``{node: Zonotope}``."""
    import torch

    from ..perturbation import Zonotope, style_shift
    base = center
    if a.at is not None:
        values = model.node_values(center)
        if a.at not in values or a.at == model.input:
            names = [k for k in values if k != model.input]
            raise CliError(f"--at {a.at}: no such intermediate node; nodes: {', '.join(names)}")
        base = values[a.at]
    if a.style is not None:
        if base.ndim < 3:
            raise CliError(f"--style needs a feature map [channels, *spatial] per sample; "
                           f"{'node ' + a.at if a.at else 'the input'} has shape "
                           f"{list(base.shape[1:])}")
        Z = style_shift(base, *a.style)
    else:
        G = load_npy(a.generators, "generators file")
        check_finite(G, f"generators file {a.generators}")
        Z = Zonotope(base, torch.from_numpy(G).to(base.dtype))
    return Z if a.at is None else {a.at: Z}


def cmd_bounds(a: argparse.Namespace) -> int:
    _check_bounds_args(a)
    if a.per_layer and (not a.json or a.weights or a.style or a.generators):
        raise CliError("--per-layer needs --json and no --weights, --style or --generators")
    # cheap checks on the files first, before paying for torch and the model
    if a.input is not None:
        x = load_npy(a.input, "input file")
        check_finite(x, f"input file {a.input}")
        check_input_scale(x, f"input file {a.input}", a.clip, a.eps or 0.0)
    else:
        xl, xu = load_npy(a.lower, "lower-bound file"), load_npy(a.upper, "upper-bound file")
        check_finite(xl, f"lower-bound file {a.lower}")
        check_finite(xu, f"upper-bound file {a.upper}")
        check_input_scale(xl, f"lower-bound file {a.lower}")
        check_input_scale(xu, f"upper-bound file {a.upper}")

    import torch

    from ..api import margin_spec
    from ..perturbation import Box, LpBall

    torch.set_num_threads(a.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[a.dtype]
    model = load_cli_model(a, dtype=dtype)

    weights = cw.make_weights(a, a.weight_eps) if a.weights else None
    if a.style is not None or a.generators is not None:
        pert = _zonotope(a, model, model.check_input(torch.from_numpy(x), f"input file {a.input}"))
    elif a.input is not None:
        center = model.check_input(torch.from_numpy(x), f"input file {a.input}")
        if a.eps is None:  # a fixed input (weights perturbed)
            pert = Box(center, center)
        else:
            pert = LpBall(center, a.eps, a.norm or "inf", None if a.clip is None else tuple(a.clip))
    else:
        lo = model.check_input(torch.from_numpy(xl), f"lower-bound file {a.lower}")
        up = model.check_input(torch.from_numpy(xu), f"upper-bound file {a.upper}")
        check_box(lo.cpu().numpy(), up.cpu().numpy(), f"lower-bound file {a.lower}",
                  f"upper-bound file {a.upper}")
        pert = Box(lo, up)
    n = pert.batch_size if not isinstance(pert, dict) else next(iter(pert.values())).batch_size
    out_shape = tuple(model.output_shape)
    n_out = 1
    for d in out_shape:
        n_out *= d

    labels, spec = None, None
    if a.label is not None:
        labels = labels_for(a.label, n, n_out)
        spec = margin_spec(labels, n_out, dtype=dtype).reshape(n, n_out - 1, *out_shape)

    t0 = time.perf_counter()
    res = model.bounds(pert, method=a.method, spec=spec, weights=weights)
    time_s = time.perf_counter() - t0

    lower = res.lower.reshape(n, -1).double()
    upper = res.upper.reshape(n, -1).double()
    if torch.isnan(lower).any() or torch.isnan(upper).any():
        raise RuntimeError("the engine returned NaN bounds (a floating-point overflow? try "
                           "--dtype float64 or a smaller --eps)")
    verified = None if labels is None else [bool(v) for v in (lower > 0).all(dim=1)]
    proved_by = None if labels is None else [
        (p or a.method) if v else None for v, p in zip(verified, res.proved_by)]
    lower, upper = lower.tolist(), upper.tolist()
    if a.json:
        d = {"lower": lower, "upper": upper, "verified": verified, "proved_by": proved_by,
             "time_s": time_s}
        if a.per_layer:
            d["method"] = a.method
            d["per_layer"] = per_layer_widths(model, pert, spec)
        print(json.dumps(d))
    else:
        _print_table(a, lower, upper, labels, verified, n_out, time_s, proved_by)
    return EXIT_OK
