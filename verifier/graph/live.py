"""A traced graph bound to a module's live parameters, so that bounds carry gradients.

The graph builder stores detached copies of the weights (a graph is a snapshot). Certified
training needs the bounds as a differentiable function of the parameters: ``live_graph`` returns
a copy of the graph whose linear and convolution nodes hold the module's current parameter
tensors themselves (autograd flows from any bound computed on it back to the module), and whose
BatchNorm nodes (``nn.BatchNorm1d/2d`` modules, folded into ``y = x * w + b``) are folded again
from the live parameters:

    w = gamma / sqrt(var + eps),   b = beta - mean * w

with ``mean, var`` the running statistics (eval mode) or, for a module in training mode, the
statistics of the clean batch (``batch_stats``, captured by ``BatchStats`` during the clean
forward pass). Using the clean batch's statistics makes the bounded function the same affine map
for every point of the perturbation set, which is what the network computes on the clean batch;
the bounds are then bounds of that (fixed-statistics) network, and gradients flow through the
statistics as they do in the natural loss. At evaluation time (eval mode) the running statistics
are used, as in any other graph.

Each node's rule makes its live params (``BoundRule.live_params``; the BatchNorm fold is
``ElementwiseAffine``'s). Every traversal in ``verifier.bounds`` runs unchanged on the returned
graph: nothing here propagates bounds.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from ..errors import VerifierError
from ..ops import RULES
from .nodes import Graph


class BatchStats:
    """Forward hooks on a module's BatchNorm layers that record the mean and the (biased)
    variance of their input over the batch (and spatial) dims while the module is in training
    mode: ``stats[module_name] = (mean [C], var [C])``, kept in the autograd graph.

        with BatchStats(net) as stats:
            logits = net(x)              # the clean forward pass
        graph = live_graph(bm.graph, net, stats)
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> dict:
        for name, m in self.module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self._handles.append(m.register_forward_hook(self._hook(name)))
        return self.stats

    def _hook(self, name):
        def hook(mod, args, out):
            if not mod.training:
                return
            x = args[0]
            dims = [0] + list(range(2, x.ndim))
            self.stats[name] = (x.mean(dims), x.var(dims, unbiased=False))
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def live_graph(graph: Graph, module: nn.Module, batch_stats: dict | None = None,
               strict: bool = True) -> Graph:
    """A copy of ``graph`` (traced from ``module``) whose parameters are ``module``'s live tensors.

    ``batch_stats``: ``{BatchNorm module name: (mean, var)}`` for BatchNorm modules in training
    mode (see ``BatchStats``). ``strict``: raise when a trainable parameter of ``module`` is not
    read by any node (it would silently get no gradient from the bounds: e.g. the weight of a
    transposed convolution or of a functional ``F.batch_norm``, which stay constants).
    The original graph is not modified; the dtype is the graph's.
    """
    named = dict(module.named_parameters())
    mods = dict(module.named_modules())
    used: set[str] = set()
    nodes = []
    for node in graph:
        if node.op == "input":
            nodes.append(node)
            continue
        params, names = RULES[node.op].live_params(node, named, mods, batch_stats)
        used |= names
        nodes.append(replace(node, params=params))
    if strict:
        missing = [n for n, p in named.items() if p.requires_grad and n not in used]
        if missing:
            raise VerifierError(f"trainable parameters not read by the bound graph (they would "
                                f"get no gradient from the bounds): {missing}")
    return Graph(nodes, output=graph.output, leaves=graph.leaves)
