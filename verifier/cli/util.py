"""Argument parsing and validation helpers of the ``verifier`` command line.

Everything a user can get wrong is checked here and raised as :class:`CliError`, whose message
names the flag or the file at fault; ``verifier.cli.main`` prints it as ``error: <message>`` and
exits with status 2. numpy is imported inside the functions that need it, torch never.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile

from ..device_names import check_device_name
from ..errors import DeviceError
from ..files import write_atomically

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A usage or input error: printed as ``error: <message>``, exit status 2."""


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`CliError` instead of printing usage and exiting,
    so that every error reaches the user as one ``error: ...`` line."""

    def error(self, message):
        raise CliError(f"{message} (see '{self.prog} --help')")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's and the epilog's line breaks (examples); the help strings state
    their defaults themselves."""


# -- argparse ``type=`` callables: their ValueError/ArgumentTypeError becomes a usage error --------

def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def nonneg_float(text: str) -> float:
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _int_at_least(text: str, lowest: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < lowest:
        raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {text}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    return _int_at_least(text, 0)


_INT = re.compile(r"^[+-]?\d+$")


def int_or_path(text: str) -> int | str:
    """``--label``: an integer, or else the path of a ``.npy`` file."""
    return int(text) if _INT.match(text.strip()) else text


# -- the model: one positional argument and the same flags in every command that takes one --------

def model_arguments(p: argparse.ArgumentParser, what: str = "the network") -> None:
    """MODEL and the flags of a PyTorch checkpoint (--arch, --arch-kwargs, --input-shape)."""
    p.add_argument("model", metavar="MODEL",
                   help=f"{what}: an ONNX file (.onnx or .onnx.gz) with one input, or a PyTorch "
                        "state dict (.pt, .pth, .ckpt; read with weights_only=True) with --arch")
    g = p.add_argument_group("PyTorch checkpoints (MODEL a .pt state dict)")
    g.add_argument("--arch", metavar="NAME",
                   help="the architecture that holds the state dict: a zoo model (mlp, mlp_tanh, "
                        "small_cnn, ... of models/architectures.py) or package.module:function")
    g.add_argument("--arch-kwargs", metavar="JSON",
                   help="keyword arguments of the architecture, a JSON object (e.g. "
                        "'{\"hidden\": [128]}')")
    g.add_argument("--input-shape", type=positive_int, nargs="+", metavar="D",
                   help="the per-sample input shape (zoo models know theirs; needed with "
                        "package.module:function)")


def load_cli_model(a: argparse.Namespace, dtype=None):
    """The ``BoundedModel`` of MODEL and its checkpoint flags (``verifier.model_io``), on
    ``--device`` (the CPU for a command without the flag)."""
    from ..model_io import load_model
    return load_model(a.model, a.arch, a.arch_kwargs, a.input_shape, dtype=dtype,
                      device=getattr(a, "device", None))


# -- the device: --device on every command that computes -----------------------------------------

DEVICE_HELP = ("where the model and every bound live: cpu, cuda (the first visible GPU), cuda:N, "
               "or auto (a GPU when one is visible, else the CPU) (default: cpu); results are "
               "printed from CPU copies")


def device_name(text: str) -> str:
    """argparse ``type=`` of ``--device``: the spelling only (no torch import); whether a GPU is
    there is checked by ``resolve_cli_device`` once the flags are read."""
    try:
        return check_device_name(text)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_arguments(p: argparse.ArgumentParser, ray: bool = False) -> None:
    """``--device`` (and, for commands with Ray workers, ``--gpus-per-worker``)."""
    p.add_argument("--device", type=device_name, default="cpu", metavar="DEV", help=DEVICE_HELP)
    if ray:
        p.add_argument("--gpus-per-worker", type=nonneg_float, default=0.0, metavar="G",
                       help="with --workers or --ray-address: the GPU share Ray reserves for "
                            "each worker (e.g. 1, or 0.5 for two workers per GPU); needed with "
                            "--device cuda on Ray workers (default: 0)")


def resolve_cli_device(a: argparse.Namespace) -> None:
    """Replace ``a.device`` by the device it resolves to (``auto`` -> cuda:0 or cpu); a
    ``DeviceError`` (exit status 2) for a GPU that is not there. Run by ``main`` after the flags
    are read and before the command starts; torch is imported only for a device other than
    cpu."""
    name = getattr(a, "device", None)
    if name is None or name == "cpu":
        return
    from ..devices import resolve_device
    a.device = str(resolve_device(name))


# -- output paths: checked when the flags are read, written atomically after the work -------------

def _folder_problem(folder: str) -> str | None:
    """Why files cannot be created in ``folder`` (None: they can)."""
    shown = folder or "."
    if not os.path.exists(folder or "."):
        return f"folder {shown} does not exist (create it first)"
    if not os.path.isdir(folder or "."):
        return f"{shown} is not a folder"
    if not os.access(folder or ".", os.W_OK | os.X_OK):
        return f"folder {shown} is not writable"
    return None


def output_file(text: str) -> str:
    """argparse ``type=`` of every flag that names a file to write: its folder must exist and be
    writable, and the path must not be a folder. Checked while the flags are read, so a bad path
    is an error before any work; nothing is created."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty file name")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    problem = _folder_problem(os.path.dirname(text))
    if problem is not None:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {problem}")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the file is not writable")
    return text


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".eps", ".ps")


def plot_file(text: str) -> str:
    """``output_file`` for a plot: also a file type matplotlib writes, by its suffix."""
    if not text.lower().endswith(PLOT_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text}: a plot is written as {', '.join(PLOT_SUFFIXES)}"
                                         "; give a file name with one of these suffixes")
    return output_file(text)


def output_dir(text: str) -> str:
    """argparse ``type=`` of a flag that names a folder to write into (created by the command
    when missing): not an existing file, and its nearest existing ancestor writable."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty folder name")
    if os.path.exists(text):
        if not os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
        if not os.access(text, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"folder {text} is not writable")
        return text
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: folder {parent} is not writable")
    return text


def _error_text(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def save_output(path: str, write, what: str) -> tuple[str, str | None]:
    """Write an output file after the work (``write(tmp)`` as in ``files.write_atomically``);
    when ``path`` cannot be written after all (the disk filled up, the folder went away), the
    file is saved in the system's temporary folder instead, so the work is not lost.
    -> (the path written, None) or (the fallback path or None, the error line to report)."""
    try:
        write_atomically(path, write)
        return path, None
    except OSError as e:
        reason = f"cannot write {what} {path}: {_error_text(e)}"
    base = os.path.basename(path) or "output"
    stem, suffix = os.path.splitext(base)
    try:
        fd, fallback = tempfile.mkstemp(prefix=f"verifier-{stem}-", suffix=suffix)
        os.close(fd)
        write(fallback)
    except OSError:
        return None, reason
    return fallback, f"{reason}; saved to {fallback} instead"


# -- files ---------------------------------------------------------------------------------------

def load_npy(path: str, what: str):
    """A numeric array from a ``.npy`` file (never unpickles); ``what`` names it in errors."""
    import numpy as np
    if not os.path.exists(path):
        raise CliError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{what} {path}: is a directory, expected a .npy file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CliError(f"{what} {path}: not a readable .npy file ({first})") from None
    if not isinstance(arr, np.ndarray):       # an .npz archive
        arr.close()
        raise CliError(f"{what} {path}: is an .npz archive, expected a single .npy array")
    if arr.dtype.kind not in "biuf":
        raise CliError(f"{what} {path}: expected numbers, got an array of dtype {arr.dtype}")
    if arr.size == 0:
        raise CliError(f"{what} {path}: the array is empty (shape {list(arr.shape)})")
    return arr


def npz_member_dtype(path: str, name: str):
    """The dtype array ``name`` of the .npz file ``path`` is stored with, read from its header
    only; None when it cannot be read."""
    import zipfile

    import numpy as np
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            return read(f)[2]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def check_finite(arr, what: str) -> None:
    import numpy as np
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CliError(f"{what} holds NaN or infinite values ({int(bad.sum())} of {arr.size} "
                       f"entries; the first at flat index {i}: {arr.reshape(-1)[i]})")


def check_input_scale(arr, what: str, clip=None, eps: float = 0.0, dtype=None) -> None:
    """Inputs on another scale than the model's, such as a uint8 image (0-255) for a model of
    [0, 1] inputs. With ``clip`` (the valid range the user declared, ``--clip LO HI``) a center
    farther than ``eps`` outside it is an error: the clipped ball is empty there. Integers above 1
    get a warning on stderr (not an error: some models take raw 0-255 pixels, normalizing
    inside) that says how to scale them. ``dtype``: the dtype the values were stored with, when
    ``arr`` is a converted copy."""
    if clip is not None:
        lo, hi = clip
        out = (arr - eps > hi) | (arr + eps < lo)
        if out.any():
            hint = ("; a 0-255 image? save it as x.astype('float32') / 255"
                    if arr.max() > 1 and hi <= 1 else "")
            raise CliError(f"{what}: {int(out.sum())} of {arr.size} values lie farther than eps "
                           f"outside --clip [{lo:g}, {hi:g}] (min {arr.min():g}, max "
                           f"{arr.max():g}), where the clipped ball is empty{hint}")
    dtype = arr.dtype if dtype is None else dtype
    if dtype.kind in "iu" and arr.max() > 1:
        print(f"warning: {what} holds {dtype} integers ({arr.min():g} to {arr.max():g}), given "
              "to the model unscaled; if the model expects inputs in [0, 1] (a 0-255 image), "
              "save them as x.astype('float32') / 255 (and give --eps on that scale)",
              file=sys.stderr)


def check_box(lower, upper, what_lower: str, what_upper: str) -> None:
    """``lower <= upper`` entry-wise; both are arrays of the same shape."""
    import numpy as np
    if lower.shape != upper.shape:
        raise CliError(f"{what_lower} and {what_upper} differ in shape: {list(lower.shape)} vs "
                       f"{list(upper.shape)}")
    bad = lower > upper
    if bad.any():
        n = lower.shape[0]
        i = int(np.flatnonzero(bad)[0])
        per = lower.size // n
        raise CliError(f"{what_lower} > {what_upper} at {int(bad.sum())} entries; the first in "
                       f"sample {i // per} at index {i % per}: {lower.reshape(-1)[i]} > "
                       f"{upper.reshape(-1)[i]}")


def labels_for(label, n_samples: int, n_classes: int):
    """``--label`` (an int, or a .npy path) -> an int64 array of ``n_samples`` labels in
    ``[0, n_classes)``; one label is broadcast to every sample."""
    import numpy as np
    if isinstance(label, int):
        what, arr = "--label", np.array([label])
    else:
        what = f"label file {label}"
        arr = load_npy(label, "label file").reshape(-1)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
                bad = arr[~np.isfinite(arr) | (arr != np.round(arr))][0]
                raise CliError(f"{what}: labels must be integers, found {bad}")
        elif arr.dtype.kind == "b":
            raise CliError(f"{what}: labels must be integers, got an array of booleans")
        arr = arr.astype(np.int64)
    if n_classes < 2:
        raise CliError(f"--label needs a model with at least 2 outputs; this one has {n_classes}")
    out = (arr < 0) | (arr >= n_classes)
    if out.any():
        raise CliError(f"{what}: label {int(arr[out][0])} is out of range for a model with "
                       f"{n_classes} outputs (valid labels: 0 to {n_classes - 1})")
    if arr.size == 1:
        return np.repeat(arr, n_samples)
    if arr.size != n_samples:
        raise CliError(f"{what}: {arr.size} labels for {n_samples} sample"
                       f"{'' if n_samples == 1 else 's'} (give one label per sample, or a single "
                       "label for all)")
    return arr
