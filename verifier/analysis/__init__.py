"""Analyses built on the bound engine:

* ``flatness``: certified worst-case loss of a classifier when its weights move in a set;
* ``sensitivity``: that figure per module, ranked;
* ``deltas``: parameter differences between models and quantization grids, as weight sets.

Import from the modules, e.g. ``from verifier.analysis.flatness import flatness``.
"""
