"""Shape arithmetic without torch's symbolic-shape machinery.

``torch.broadcast_shapes`` imports ``torch.fx.experimental.symbolic_shapes`` (and sympy) the
first time it runs: 0.3-0.7 s of every command's start-up, for a rule a few lines long.
"""
from __future__ import annotations


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """numpy's broadcast of the given shapes; ``RuntimeError`` (as torch's) when they do not
    broadcast."""
    n = max((len(s) for s in shapes), default=0)
    out = [1] * n
    for s in shapes:
        s = tuple(int(d) for d in s)
        for i, d in enumerate((1,) * (n - len(s)) + s):
            if d == out[i] or d == 1:
                continue
            if out[i] != 1:
                raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
            out[i] = d
    return tuple(out)
