"""Lipschitz-constrained training and certified L2 Lipschitz constants (the per-layer norm
bounds are in ``verifier.ops.norms``, where each rule's ``lipschitz`` reads them).

* ``constraints``: weight constraints applied after each optimizer step (spectral
  normalization, hammer, soft cap, hard cap, SVD clipping; weight decay as the baseline);
* the certificates (re-exported here from ``verifier.analysis.lipschitz``): the model's
  certified constant composed through the graph, margin certificates, and CROWN's L2
  verification beside them;
* ``train``: the training loop (Muon or AdamW, any constraint).
"""
from ..analysis.lipschitz import (LipschitzError, LipschitzReport, certified_radius, crown_l2,
                                  lipschitz_certify, lipschitz_constant, margins)
from ..ops.norms import gram_norm_bound
from .constraints import CONSTRAINTS, apply_constraint

__all__ = ["CONSTRAINTS", "LipschitzError", "LipschitzReport", "apply_constraint",
           "certified_radius", "crown_l2", "gram_norm_bound", "lipschitz_certify",
           "lipschitz_constant", "margins"]
