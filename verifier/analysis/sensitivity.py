"""Per-module sensitivity: the certified (and attacked) loss rise when only one module's
parameters move, for every module of a model, ranked.

    ranked = sensitivity(model, (x, y), eps=0.01)
    ranked[0].label, ranked[0].certified_increase   # the most sensitive module

Each module's figure is a ``flatness`` result under a ball around that module's parameters only.
"""
from __future__ import annotations

from ..errors import VerifierError
from ..graph.params import parameter_uses
from ..weights import WeightPerturbation
from .flatness import FlatnessResult, flatness, pyplot


def sensitivity(model, data, eps: float, norm="inf", relative: bool = False,
                params: str = "weight", modules: list[str] | None = None, **kw) -> list[FlatnessResult]:
    """Per module, the certified (and attacked) loss increase when only that module's
    parameters move (``params``: "weight", "bias" or "both"); ranked by certified increase,
    largest first. A module is the layer that uses the parameters, named by their common prefix
    (``fc1`` for ``fc1.weight``, ``fc1.bias``) or else by the layer's node name."""
    if params not in ("weight", "bias", "both"):
        raise VerifierError(f"params must be weight, bias or both, got {params!r}")
    by_node: dict[str, list[str]] = {}
    for name, uses in parameter_uses(model.graph).items():
        node, role, _ = uses[0]
        if params == "both" or role == params:
            by_node.setdefault(node, []).append(name)
    groups: dict[str, list[str]] = {}
    for node, names in by_node.items():
        prefixes = {n.rpartition(".")[0] for n in names}
        label = prefixes.pop() if len(prefixes) == 1 and "" not in prefixes else node
        groups[label] = names
    if modules is not None:
        unknown = [m for m in modules if m not in groups]
        if unknown:
            raise VerifierError(f"unknown module(s) {unknown}; modules: {sorted(groups)}")
        groups = {m: groups[m] for m in modules}
    if not groups:
        raise VerifierError(f"no {params} parameters to perturb")
    out = [flatness(model, data, WeightPerturbation(names, eps, norm, relative), label=mod, **kw)
           for mod, names in groups.items()]
    return sorted(out, key=lambda r: -r.certified_increase)


def plot_sensitivity(results: list[FlatnessResult], path, title: str = "") -> None:
    """Bars: certified and attacked loss increase per module."""
    plt = pyplot()
    labels = [r.label for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 2), 3.8))
    idx = range(len(labels))
    ax.bar([i - 0.2 for i in idx], [r.certified_increase for r in results], 0.4, label="certified")
    ax.bar([i + 0.2 for i in idx], [r.attack_increase for r in results], 0.4, label="attack")
    ax.set_xticks(list(idx))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("loss increase")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(title or "per-module sensitivity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
