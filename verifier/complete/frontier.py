"""The input-split strategy's frontier: open sub-boxes waiting, the most open first.

``BestFirstFrontier`` holds the batches of children that expansions returned, each domain keyed
by its parent's margin on its most open conjunction (lower is more open); ``pop(k)`` hands out
the ``k`` lowest keys, or the newest batch's domains (depth first) while the waiting domains
take more than ``FRONTIER_MEMORY`` bytes.
"""
from __future__ import annotations

import torch

from .bab import Expansion, Frontier

# bytes of waiting domains above which the frontier hands out its newest domains first
FRONTIER_MEMORY = 2 ** 30


class BestFirstFrontier(Frontier):
    """Domains waiting to be bounded, each with a ``key``: its parent's margin on its most open
    conjunction (lower is more open; children of one parent share it). Held as the batches of
    children pushed (dicts of tensors with the same leading size), never copied when more is
    pushed; each keeps its keys sorted and the order of its rows by key.

    ``pop(k)`` is best first: the ``k`` lowest keys of all parts (ties: the older part first).
    Best first can hold far more domains than depth first, so while the parts take more than
    ``max_bytes``, ``pop`` hands out the newest part's domains instead (depth first, as a
    stack: then each round adds at most one batch, and the subtrees being closed are the
    newest). ``bytes`` counts the parts' whole blocks; a part three quarters handed out is
    compacted (its rows left are copied), so the blocks hold at most four times the bytes of
    the domains waiting. Which domains get bounded never depends on the order (a domain's
    expansion depends only on itself); the order decides how soon a counterexample turns up
    and how much memory waits."""

    def __init__(self, first: dict, max_bytes: int = FRONTIER_MEMORY):
        # per part: its tensors, its keys left (sorted), their rows, its rows in all, row bytes
        self.parts, self.keys, self.rows, self.size, self.row_bytes = [], [], [], [], []
        self.n = self.bytes = 0
        self.max_bytes = max_bytes
        self.worst = float("nan")
        self.push(first)

    def __len__(self) -> int:
        return self.n

    def push(self, part: dict) -> None:
        """``part``: a batch with a ``key: [m]`` entry (taken out and kept beside it)."""
        part = dict(part)
        if "key" not in part:
            raise ValueError("a batch of children has no 'key' (its parents' margins): "
                             "the expander must return expand_input_domains' children")
        key = torch.nan_to_num(part.pop("key"), nan=-torch.inf)
        m = key.shape[0]
        if m == 0:
            return
        key, rows = torch.sort(key, stable=True)
        row = sum(v[0].numel() * v.element_size() for v in part.values()) + key.element_size()
        for lst, v in ((self.parts, part), (self.keys, key), (self.rows, rows),
                       (self.size, m), (self.row_bytes, row)):
            lst.append(v)
        self.n += m
        self.bytes += m * row

    def add(self, e: Expansion) -> None:
        """Push ``e``'s children; ``worst``: the lowest key waiting, else the lowest margin of
        ``e``'s open domains (when it had some)."""
        if e.children is not None:
            self.push(e.children)
        if self.n:
            self.worst = self.lowest()
        elif e.open:
            self.worst = e.worst

    def lowest(self) -> float:
        """The lowest key waiting (inf when empty)."""
        return min((float(k[0]) for k in self.keys), default=float("inf"))

    def _counts(self, k: int) -> dict:
        """How many domains to take from each part (the first of its sorted rows)."""
        if self.bytes > self.max_bytes:       # depth first: the newest parts
            counts, size = {}, 0
            for i in reversed(range(len(self.parts))):
                if size >= k:
                    break
                counts[i] = min(self.keys[i].shape[0], k - size)
                size += counts[i]
            return counts
        heads = [key[:k] for key in self.keys]
        sizes = [h.shape[0] for h in heads]
        if sum(sizes) <= k:
            return dict(enumerate(sizes))
        # each part is sorted, so the k lowest keys are prefixes of the parts: all keys below
        # the k-th lowest, then the keys equal to it, older parts first
        t = torch.kthvalue(torch.cat(heads), k).values
        counts, need = {}, k
        below = [int(torch.searchsorted(h, t)) for h in heads]
        need -= sum(below)
        for i, h in enumerate(heads):
            extra = min(int(torch.searchsorted(h, t, right=True)) - below[i], need)
            need -= extra
            if below[i] + extra:
                counts[i] = below[i] + extra
        return counts

    def pop(self, k: int) -> dict:
        """Up to ``k`` domains: the lowest keys (best first), or, above ``max_bytes``, the
        newest part's (depth first). Their order within the batch is not the keys' order."""
        if not self.n or k < 1:
            raise IndexError(f"pop({k}) from a frontier of {self.n} domains")
        counts = self._counts(k)
        names = [name for name in self.parts[next(iter(counts))]
                 if all(name in self.parts[i] for i in counts)]
        whole = [i for i, c in counts.items() if c == self.size[i]]   # untouched parts
        if len(counts) == 1 and whole:
            i = whole[0]
            out = {name: self.parts[i][name] for name in names}
        else:
            total = sum(counts.values())
            first = self.parts[next(iter(counts))]
            out = {name: first[name].new_empty(total, *first[name].shape[1:])
                   for name in names}
            at = 0
            for i, c in counts.items():
                sel = self.rows[i][:c]
                for name in names:
                    torch.index_select(self.parts[i][name], 0, sel, out=out[name][at:at + c])
                at += c
        for i, c in counts.items():
            self.keys[i], self.rows[i] = self.keys[i][c:], self.rows[i][c:]
            self.n -= c
            left = self.keys[i].shape[0]
            if left and 4 * left < self.size[i]:
                # the rest is a small share of a big block: copy it, so the block can go
                self.parts[i] = {name: v.index_select(0, self.rows[i])
                                 for name, v in self.parts[i].items()}
                self.rows[i] = torch.arange(left, device=self.keys[i].device)
                self.bytes -= (self.size[i] - left) * self.row_bytes[i]
                self.size[i] = left
            elif not left:
                self.bytes -= self.size[i] * self.row_bytes[i]
        keep = [i for i, key in enumerate(self.keys) if key.shape[0]]
        if len(keep) < len(self.keys):
            for lst in (self.parts, self.keys, self.rows, self.size, self.row_bytes):
                lst[:] = [lst[i] for i in keep]
        return out
