"""The ``verifier`` command line (also ``python -m verifier``).

One function per subcommand, ``cmd_<name>(args) -> exit status``, plus its argument builder and
one line in ``SUBCOMMANDS``. Exit status: 0 done, 2 a usage or input error (``error: ...`` on
stderr), 1 an internal error (``internal error: ...``; the traceback with ``--debug``).

torch (and numpy) are imported inside the command functions only, so ``verifier --help`` and
argument errors answer at once.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from .cli_util import (EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ArgParser, CliError, HelpFormatter,
                       check_box, check_finite, finite_float, int_or_path, labels_for, load_npy,
                       nonneg_float, positive_int)

from . import cli_lipschitz as cl
from . import cli_train as ct
from . import cli_verify as cv
from . import cli_weights as cw
from . import report as rp

PROG = "verifier"


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str              # one line, in ``verifier --help``
    description: str       # the top of ``verifier NAME --help``
    epilog: str            # examples, at the bottom of ``verifier NAME --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ================================================================================================
# verifier bounds
# ================================================================================================

BOUNDS_DESCRIPTION = """\
Bound the outputs of an ONNX classifier over a set of inputs: an Lp ball around --input
(radius --eps, optionally clipped to [LO, HI]) or the box [--lower, --upper], and optionally
over a set of parameter values (--weights, --weight-eps; then --input without --eps keeps the
input fixed). With --label Y it bounds the margins f_Y(x) - f_j(x) for every j != Y in
ascending j; the sample is verified when every margin's lower bound is > 0.

The .npy files hold one input (with or without a leading batch dimension of 1) or a batch of
N inputs [N, *input_shape]; every sample is bounded in one batched call."""

BOUNDS_EPILOG = """\
examples:
  # CROWN margins of one MNIST digit under an L-inf ball of radius 0.03
  verifier bounds examples/data/lirpa_mnist_fc_3layer.onnx \\
      --input examples/data/mnist_sample.npy --eps 0.03 --label examples/data/mnist_label.npy

  # IBP bounds of the logits of 5 samples over explicit boxes, as JSON
  verifier bounds model.onnx --lower xl.npy --upper xu.npy --method ibp --json

  # margins when every weight of the model moves by at most 0.1% of its value (fixed input)
  verifier bounds examples/data/lirpa_mnist_fc_3layer.onnx --input examples/data/mnist_sample.npy \
      --label examples/data/mnist_label.npy --weights '*.weight' --weight-eps 0.001 --relative"""


def bounds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx",
                   help="the network, an ONNX file (.onnx or .onnx.gz) with one input")
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
    box = p.add_argument_group("input set, form 2: a box (exclusive with form 1)")
    box.add_argument("--lower", metavar="XL.npy",
                     help="lower corner(s) of the box, shaped like --input")
    box.add_argument("--upper", metavar="XU.npy",
                     help="upper corner(s) of the box; needs --lower, and lower <= upper")
    q = p.add_argument_group("what to bound and how")
    q.add_argument("--method", choices=("ibp", "crown", "crown-ibp", "alpha-crown"), default="crown",
                   help="ibp: interval bounds (fast, loose); crown: backward linear bounds with "
                        "CROWN intermediate bounds; crown-ibp: CROWN on the output with IBP "
                        "intermediate bounds; alpha-crown: CROWN with the output bound's ReLU "
                        "lower slopes optimized (tightest, slower) (default: crown)")
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
    if a.input is not None:
        norm = {"inf": "L-inf", "2": "L2", "1": "L1"}[a.norm or "inf"]
        clip = "" if a.clip is None else f" clipped to [{a.clip[0]:g}, {a.clip[1]:g}]"
        return f"{norm} ball eps={a.eps:g}{clip} around {a.input} ({n} sample{s})"
    return f"box [{a.lower}, {a.upper}] ({n} sample{s})"


def _print_table(a, lower, upper, labels, verified, n_out, time_s) -> None:
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
            word = "yes" if verified[i] else "no"
            print(f"  verified: {word} (smallest margin lower bound {lo[k]:.6g} at j={rows[k]})")
    if verified is not None:
        print(f"\nverified: {sum(verified)} of {len(verified)} samples")
    print(f"time: {time_s:.4f} s bounding (not counting model loading)")


def cmd_bounds(a: argparse.Namespace) -> int:
    import json
    import time

    _check_bounds_args(a)
    if a.per_layer and (not a.json or a.weights):
        raise CliError("--per-layer needs --json and no --weights")
    # cheap checks on the files first, before paying for torch and the model
    if a.input is not None:
        x = load_npy(a.input, "input file")
        check_finite(x, f"input file {a.input}")
    else:
        xl, xu = load_npy(a.lower, "lower-bound file"), load_npy(a.upper, "upper-bound file")
        check_finite(xl, f"lower-bound file {a.lower}")
        check_finite(xu, f"upper-bound file {a.upper}")

    import torch

    from .api import BoundedModel, margin_spec
    from .perturbation import Box, LpBall

    torch.set_num_threads(a.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[a.dtype]
    model = BoundedModel.from_onnx(a.model, dtype=dtype)

    weights = cw.make_weights(a, a.weight_eps) if a.weights else None
    if a.input is not None:
        center = model.check_input(torch.from_numpy(x), f"input file {a.input}")
        if a.eps is None:  # a fixed input (weights perturbed)
            pert = Box(center, center)
        else:
            pert = LpBall(center, a.eps, a.norm or "inf", None if a.clip is None else tuple(a.clip))
    else:
        lo = model.check_input(torch.from_numpy(xl), f"lower-bound file {a.lower}")
        up = model.check_input(torch.from_numpy(xu), f"upper-bound file {a.upper}")
        check_box(lo.numpy(), up.numpy(), f"lower-bound file {a.lower}",
                  f"upper-bound file {a.upper}")
        pert = Box(lo, up)
    n = pert.batch_size
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
    lower, upper = lower.tolist(), upper.tolist()
    if a.json:
        d = {"lower": lower, "upper": upper, "verified": verified, "time_s": time_s}
        if a.per_layer:
            d["method"] = a.method
            d["per_layer"] = rp.per_layer_widths(model, pert, spec)
        print(json.dumps(d))
    else:
        _print_table(a, lower, upper, labels, verified, n_out, time_s)
    return EXIT_OK


# ================================================================================================
# registry and entry point
# ================================================================================================

SUBCOMMANDS: list[Subcommand] = [
    Subcommand("bounds", "bound a model's outputs or margins over an input set (IBP, CROWN)",
               BOUNDS_DESCRIPTION, BOUNDS_EPILOG, bounds_arguments, cmd_bounds),
    Subcommand("flatness", "certified worst-case loss of a classifier when its weights move",
               cw.FLATNESS_DESCRIPTION, cw.FLATNESS_EPILOG, cw.flatness_arguments, cw.cmd_flatness),
    Subcommand("sensitivity", "certified loss increase per module under weight perturbations",
               cw.SENSITIVITY_DESCRIPTION, cw.SENSITIVITY_EPILOG, cw.sensitivity_arguments,
               cw.cmd_sensitivity),
    Subcommand("delta", "certify models between a base and another (fine-tuned, merged, quantized)",
               cw.DELTA_DESCRIPTION, cw.DELTA_EPILOG, cw.delta_arguments, cw.cmd_delta),
    Subcommand("train", "train a certifiably robust classifier (IBP, CROWN-IBP) and report on it",
               ct.TRAIN_DESCRIPTION, ct.TRAIN_EPILOG, ct.train_arguments, ct.cmd_train),
    Subcommand("lipschitz", "a model's certified L2 Lipschitz constant, per layer and overall",
               cl.LIPSCHITZ_DESCRIPTION, cl.LIPSCHITZ_EPILOG, cl.lipschitz_arguments,
               cl.cmd_lipschitz),
    Subcommand("verify", "decide a VNN-LIB property on an ONNX model (sat/unsat/unknown/timeout)",
               cv.VERIFY_DESCRIPTION, cv.VERIFY_EPILOG, cv.verify_arguments, cv.cmd_verify),
    Subcommand("batch", "run a VNN-COMP instances.csv, results to a csv, with a summary",
               cv.BATCH_DESCRIPTION, cv.BATCH_EPILOG, cv.batch_arguments, cv.cmd_batch),
    Subcommand("vnncomp-run", "one VNN-COMP instance to a results file (used by vnncomp/)",
               "Write the VNN-COMP results file of one instance.", "", cv.vnncomp_arguments,
               cv.cmd_vnncomp_run),
    Subcommand("report", "an HTML report (tables, plots) of results, bounds and training files",
               rp.REPORT_DESCRIPTION, rp.REPORT_EPILOG, rp.report_arguments, rp.cmd_report),
]


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("verifier")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def build_parser() -> ArgParser:
    parser = ArgParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Certified robustness of neural networks by bound propagation.",
        epilog=f"Run '{PROG} COMMAND --help' for the options and examples of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an internal error, print the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for c in SUBCOMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description, epilog=c.epilog,
                           formatter_class=HelpFormatter, parents=[common])
        c.add_arguments(p)
        p.set_defaults(run=c.run)
    return parser


def _error(msg: str) -> None:
    print(msg, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CliError as e:
        _error(f"error: {e}")
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from .runtime import tune_allocator
    tune_allocator()

    from .errors import VerifierError
    try:
        return args.run(args)
    except (CliError, VerifierError) as e:
        _error(f"error: {e}")
        return EXIT_USAGE
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _error(f"error: {where}{e.strerror or e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("error: interrupted")
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        _error(f"internal error: {type(e).__name__}: {e}"
               + ("" if args.debug else " (run again with --debug for the traceback)"))
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
