"""Analyses built on the bound engine:

* ``flatness``: certified worst-case loss of a classifier when its weights move in a set;
* ``sensitivity``: that figure per module, ranked;
* ``deltas``: parameter differences between models and quantization grids, as weight sets;
* ``lora``: LoRA adapters (``add_lora``), their flatness and sensitivity, and certificates for
  merging them at a scale t in an interval;
* ``lipschitz``: certified L2 Lipschitz constants composed through the graph and the margin
  certificates they give (``verifier.lipschitz`` re-exports them beside Lipschitz training).

Import from the modules, e.g. ``from verifier.analysis.flatness import flatness``.
"""
