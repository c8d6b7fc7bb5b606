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

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


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


def load_model(path: str, arch: str | None = None, arch_kwargs: str | None = None,
               input_shape=None, dtype=None):
    """A ``BoundedModel`` from an ONNX file or a PyTorch state dict (see the module doc)."""
    dtype = dtype or torch.float32
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if not path.endswith(TORCH_SUFFIXES):
        if arch is not None:
            raise ModelLoadError(f"--arch is for PyTorch checkpoints ({', '.join(TORCH_SUFFIXES)}); "
                                 f"{path} is read as ONNX")
        model = BoundedModel.from_onnx(path, dtype=dtype)
    else:
        if arch is None:
            raise ModelLoadError(f"{path}: a PyTorch checkpoint needs --arch (a zoo name such as "
                                 "mlp, or package.module:function) to know the architecture")
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
            raise ModelLoadError(f"{path} does not fit --arch {arch}: {msg[:400]}") from None
        model = BoundedModel(module, input_shape=shape, dtype=dtype)
        model.source_path = path
    for name, v in model.parameters().items():
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ModelLoadError(f"{path}: parameter {name} holds {bad} NaN or infinite values")
    return model
