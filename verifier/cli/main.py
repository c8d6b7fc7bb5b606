"""The ``verifier`` command line (also ``python -m verifier``): the registry of subcommands and
the entry point ``main``.

One function per subcommand, ``cmd_<name>(args) -> exit status``, plus its argument builder and
one line in ``SUBCOMMANDS``; they live in one module per family (``bounds``, ``weights``,
``train``, ``lipschitz``, ``verify``, ``report``). Exit status: 0 done, 2 a usage or input error
(``error: ...`` on stderr), 1 an internal error (``internal error: ...``; the traceback with
``--debug``).

torch (and numpy) are imported inside the command functions only, so ``verifier --help`` and
argument errors answer at once.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import version
from typing import Callable

from ..errors import VerifierError
from ..runtime import tune_allocator
from . import bounds as cb
from . import lipschitz as cl
from . import report as rp
from . import train as ct
from . import verify as cv
from . import weights as cw
from .util import (EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ArgParser, CliError, HelpFormatter,
                   resolve_cli_device)

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
# registry and entry point
# ================================================================================================

SUBCOMMANDS: list[Subcommand] = [
    Subcommand("bounds", "bound a model's outputs or margins over an input set (IBP, CROWN)",
               cb.BOUNDS_DESCRIPTION, cb.BOUNDS_EPILOG, cb.bounds_arguments, cb.cmd_bounds),
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
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named here, so that the hint is the subcommand's --help
            where = f"{PROG} {args.command}" if getattr(args, "command", None) else PROG
            raise CliError(f"unrecognized arguments: {' '.join(unknown)} (see '{where} --help')")
    except CliError as e:
        _error(f"error: {e}")
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    tune_allocator()

    try:
        resolve_cli_device(args)   # --device cuda without a GPU: exit 2 before any work
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
