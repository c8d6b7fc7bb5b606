"""The branch-and-bound coordinator on its own, with a toy split strategy: a domain is a node
``(depth, index)`` of a binary tree, closed at ``depth == leaves_at``; the expansion of a batch
returns the children of its open nodes (or a candidate at one chosen node). Batches come back
in any order from a several-slot expander. Pins the coordinator's contract: ``unsat`` only once
every batch handed out came back (every node of the tree expanded exactly once), a candidate
ends the run with its reason, a stuck frontier is ``unknown``, a passed deadline ``timeout``."""
import random
import time
from dataclasses import dataclass

import pytest
import torch

from verifier.complete.bab import (Expansion, Frontier, LocalExpander, Prepared, Problem,
                                   branch_and_bound, every_kth_round)


@dataclass
class TreeProblem(Problem):
    leaves_at: int
    hit: tuple | None = None          # the node whose expansion finds a candidate

    def prepare(self, model):
        return TreePrepared(self, model)


class TreePrepared(Prepared):
    def __init__(self, p, log):
        self.p, self.log = p, log

    def expand(self, batch, seed, deadline, attack_after, stop=None):
        nodes = list(zip(batch["depth"].tolist(), batch["index"].tolist()))
        self.log.extend(nodes)
        n = len(nodes)
        if self.p.hit in nodes:
            return Expansion(bounded=n, parents=n, candidate=(torch.zeros(1), 0, "toy hit"))
        kids = [(d + 1, 2 * i + j) for d, i in nodes if d < self.p.leaves_at for j in (0, 1)]
        if not kids:
            return Expansion(bounded=n, parents=n)
        d, i = zip(*kids)
        return Expansion(bounded=n, parents=n,
                         children={"depth": torch.tensor(d), "index": torch.tensor(i)})


class ListFrontier(Frontier):
    def __init__(self, splittable=True):
        self.items, self.splittable = [(0, 0)], splittable

    def __len__(self):
        return len(self.items)

    def ready(self):
        return bool(self.items) and self.splittable

    def stuck(self, inflight):
        return None if self.splittable or inflight else "nothing to split"

    def pop(self, k):
        take, self.items = self.items[:k], self.items[k:]
        d, i = zip(*take)
        return {"depth": torch.tensor(d), "index": torch.tensor(i)}

    def add(self, e):
        if e.children is not None:
            self.items += list(zip(e.children["depth"].tolist(), e.children["index"].tolist()))
        self.worst = -float(len(self.items))


class Shuffled(LocalExpander):
    """Up to ``slots`` batches out, collected in a random order."""

    def __init__(self, log, slots, seed):
        super().__init__(log)
        self.slots, self.jobs, self.rng = slots, [], random.Random(seed)

    def submit(self, batch, seed, deadline, attack_after):
        self.jobs.append((batch, seed, deadline, attack_after))

    def collect(self, deadline):
        return self.prepared.expand(*self.jobs.pop(self.rng.randrange(len(self.jobs))))

    def cancel(self):
        self.left = len(self.jobs)
        self.jobs = []


def _run(problem, frontier, slots=3, seed=0, deadline=None, batch=3):
    log = []
    ex = Shuffled(log, slots, seed)
    deadline = time.perf_counter() + 30 if deadline is None else deadline
    r = branch_and_bound(problem, frontier, ex, deadline, batch=batch,
                         attack_after=every_kth_round(2), proof="toy")
    return r, log, ex


@pytest.mark.parametrize("seed", range(3))
def test_unsat_only_once_every_batch_came_back_and_every_node_was_expanded_once(seed):
    r, log, ex = _run(TreeProblem(leaves_at=5), ListFrontier(), seed=seed)
    assert r.status == "unsat" and "refuted by toy bounds" in r.reason
    assert ex.left == 0
    assert sorted(log) == sorted((d, i) for d in range(6) for i in range(2 ** d))
    assert r.domains == 2 ** 6 - 1


def test_a_candidate_ends_the_run_with_its_reason():
    r, log, ex = _run(TreeProblem(leaves_at=6, hit=(3, 5)), ListFrontier())
    assert r.status == "candidate" and r.reason == "toy hit" and r.disjunct == 0
    assert (3, 5) in log


def test_a_stuck_frontier_is_unknown_and_a_passed_deadline_a_timeout():
    r, log, _ = _run(TreeProblem(leaves_at=3), ListFrontier(splittable=False))
    assert r.status == "unknown" and r.reason == "nothing to split" and not log
    r, log, _ = _run(TreeProblem(leaves_at=3), ListFrontier(), deadline=time.perf_counter() - 1)
    assert r.status == "timeout" and not log
