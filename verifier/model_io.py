"""Load a model for the command line: an ONNX file, or a PyTorch checkpoint (a state dict, read
with ``torch.load(weights_only=True)``) plus the architecture that holds it.

The architecture is a zoo entry (``--arch mlp``: ``models/architectures.py``'s ``ZOO``, which
also gives the input shape) or an importable callable (``--arch package.module:function`` with
keyword arguments as JSON and ``--input-shape``). Checkpoints never unpickle arbitrary objects;
JSON is parsed, never evaluated.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

from .api import BoundedModel
from .errors import ModelLoadError
from .files import TORCH_SUFFIXES, sniff_format


def _zoo():
    try:
        from models import architectures
    except ImportError:
        root = Path(__file__).resolve().parents[1]  # a source checkout: models/ beside verifier/
        if not (root / "models" / "architectures.py").exists():
            return None
        sys.path.insert(0, str(root))
        from models import architectures
    return architectures


def build_architecture(arch: str, kwargs: str | None, input_shape):
    """-> (nn.Module, per-sample input shape)."""
    if ":" in arch:
        mod_name, _, fn_name = arch.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"--arch {arch}: cannot import it ({type(e).__name__}: {e})") from None
        try:
            kw = json.loads(kwargs) if kwargs else {}
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"--arch-kwargs is not valid JSON: {e}") from None
        if not isinstance(kw, dict):
            raise ModelLoadError("--arch-kwargs must be a JSON object of keyword arguments")
        if not input_shape:
            raise ModelLoadError(f"--arch {arch} needs --input-shape (the per-sample input shape)")
        return fn(**kw), tuple(input_shape)
    zoo = _zoo()
    if zoo is None or arch not in zoo.ZOO:
        names = sorted(zoo.ZOO) if zoo is not None else []
        raise ModelLoadError(f"--arch {arch}: not a zoo model ({', '.join(names) or 'zoo not found'}) "
                             "and not of the form package.module:function")
    fn, kw, shape = zoo.ZOO[arch]
    if kwargs:
        try:
            kw = {**kw, **json.loads(kwargs)}
        except (json.JSONDecodeError, TypeError) as e:
            raise ModelLoadError(f"--arch-kwargs is not a valid JSON object: {e}") from None
    return fn(**kw), tuple(input_shape) if input_shape else shape


def zoo_names() -> list[str]:
    """The zoo's architecture names (``--arch NAME``), or [] without the zoo."""
    zoo = _zoo()
    return sorted(zoo.ZOO) if zoo is not None else []


def zoo_flags(path: str) -> str | None:
    """The --arch flags of a checkpoint shipped in the zoo (``models/zoo.json``), else None."""
    zoo = _zoo()
    if zoo is None:
        return None
    listing = Path(zoo.__file__).resolve().parent / "zoo.json"
    try:
        entries = json.loads(listing.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    here = Path(path).resolve()
    for e in entries:
        if isinstance(e, dict) and e.get("state_dict") and \
                (listing.parents[1] / e["state_dict"]).resolve() == here:
            kw = json.dumps(e.get("arch_kwargs") or {})
            return f"--arch {e['arch']}" + (f" --arch-kwargs '{kw}'" if kw != "{}" else "")
    return None


def model_kind(path: str) -> str:
    """"onnx", "torch" or "vnnlib": the file's content where its first bytes say (a checkpoint
    named .onnx, a VNN-LIB file given as the model), else its suffix."""
    if path.endswith((".vnnlib", ".vnnlib.gz")):
        return "vnnlib"
    kind = sniff_format(path)
    if kind == "onnx" and path.endswith(TORCH_SUFFIXES):
        return "torch"  # unreadable as either: the checkpoint reader says why
    return kind


def load_model(path: str, arch: str | None = None, arch_kwargs: str | None = None,
               input_shape=None, dtype=None, device=None):
    """A ``BoundedModel`` from an ONNX file or a PyTorch state dict (see the module doc) on
    ``device`` (default: the CPU); the format is read from the file's first bytes, the suffix
    deciding only when they do not."""
    dtype = dtype or torch.float32
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a folder, expected a model file")
    kind = model_kind(path)
    if kind == "vnnlib":
        raise ModelLoadError(f"{path} is a VNN-LIB property, not a model (MODEL and SPEC "
                             "swapped? the model comes first)")
    if kind == "onnx":
        if arch is not None:
            raise ModelLoadError(f"--arch is for PyTorch checkpoints; {path} is an ONNX file "
                                 "(it holds its architecture): drop --arch")
        model = BoundedModel.from_onnx(path, dtype=dtype, device=device)
    else:
        if arch is None:
            flags = zoo_flags(path)
            if flags is not None:
                raise ModelLoadError(f"{path} is a PyTorch checkpoint: add {flags} (its entry "
                                     "in models/zoo.json)")
            names = ", ".join(zoo_names())
            raise ModelLoadError(f"{path} is a PyTorch checkpoint: add --arch NAME to say which "
                                 f"architecture holds it (a zoo model: {names or 'no zoo found'}; "
                                 "or package.module:function)")
        module, shape = build_architecture(arch, arch_kwargs, input_shape)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: "
                                 "torch.load(weights_only=True) refused it; a corrupt file, or one "
                                 "that pickles objects other than tensors)") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{path}: expected a state dict (parameter name -> tensor)")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            msg = " ".join(str(e).split())
            flags = zoo_flags(path)
            hint = f" (its entry in models/zoo.json says: {flags})" if flags else ""
            raise ModelLoadError(f"{path} does not fit --arch {arch}{hint}: {msg[:400]}") from None
        model = BoundedModel(module, input_shape=shape, dtype=dtype, device=device or "cpu")
        model.source_path = path
    for name, v in model.parameters().items():
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ModelLoadError(f"{path}: parameter {name} holds {bad} NaN or infinite values")
    return model
