"""The trained models of ``models/zoo.json``, loaded safely (``torch.load(weights_only=True)``).

    from models import trained, zoo_entries
    net, entry = trained("cert_mnist_01")      # nn.Module in eval mode, and its zoo.json entry
    entry["measured"]["certified_acc"]          # what was measured, and how (see docs/models.md)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import architectures

ROOT = Path(__file__).resolve().parents[1]
ZOO_JSON = Path(__file__).resolve().parent / "zoo.json"


def zoo_entries() -> list[dict]:
    """Every entry of ``models/zoo.json`` (name, files, architecture, training, measurements)."""
    return json.loads(ZOO_JSON.read_text())["models"]


def trained(name: str) -> tuple[torch.nn.Module, dict]:
    """``(model, entry)``: the zoo model ``name`` built from its architecture with its shipped
    weights, in eval mode. Unknown names raise KeyError listing the known ones."""
    entries = {e["name"]: e for e in zoo_entries()}
    if name not in entries:
        raise KeyError(f"no zoo model {name!r}; models/zoo.json has {sorted(entries)}")
    e = entries[name]
    net = getattr(architectures, e["arch"])(**e["arch_kwargs"])
    state = torch.load(ROOT / e["state_dict"], map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval(), e
