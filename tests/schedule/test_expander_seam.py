"""The seam between branch and bound's coordinator (input and ReLU splits) and where batches
are bounded (no Ray needed): several batches in flight, coming back in any order, give the same
verdicts; every domain is still bounded before unsat; a failing expander is an error, never a
verdict; the default expander bounds exactly the domains it did before the seam."""
import random
import time

import pytest
import torch
import torch.nn as nn
from support import least_output

from verifier import BoundedModel
from verifier.complete.bab import LocalExpander
from verifier.complete.input_bab import input_split_bab
from verifier.complete.relu_bab import relu_split_bab


class _Shuffled:
    """Up to ``slots`` batches in flight, each collected in a random order (as workers of
    different speeds would return them); counts the domains it bounded."""

    def __init__(self, model, slots, seed=0):
        super().__init__(model)
        self.slots, self.jobs, self.rng, self.bounded = slots, [], random.Random(seed), 0

    def submit(self, cur, seed, deadline, attack_after):
        self.jobs.append((cur, seed, deadline, attack_after))

    def collect(self, deadline):
        e = self.prepared.expand(*self.jobs.pop(self.rng.randrange(len(self.jobs))))
        self.bounded += e.bounded
        return e

    def cancel(self):
        self.left_at_end = len(self.jobs)   # batches still out when the run ended
        self.jobs = []


class ShuffledExpander(_Shuffled, LocalExpander):
    """Input-split or ReLU-split batches in flight, collected in a random order."""


class Broken(LocalExpander):
    def collect(self, deadline):
        raise RuntimeError("worker lost")


def _problem(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    bm = BoundedModel(net, input_shape=(3,))
    lo, hi = -torch.ones(3), torch.ones(3)
    g = torch.Generator().manual_seed(0)
    x = lo + torch.rand(100_000, 3, generator=g) * (hi - lo)
    with torch.no_grad():
        y = net(x)
    return net, bm, lo, hi, float((y[:, 0] - y[:, 1]).min())


@pytest.mark.parametrize("seed", range(4))
def test_batches_in_flight_in_any_order_give_the_same_verdicts(seed):
    net, bm, lo, hi, m = _problem(seed)
    C = [torch.tensor([[1.0, -1.0]])]
    for d in (m - 0.05, m + 0.05):
        ref = input_split_bab(bm, lo, hi, C, [torch.tensor([d])], time.perf_counter() + 30, batch=8)
        ex = ShuffledExpander(bm, slots=3, seed=seed)
        got = input_split_bab(bm, lo, hi, C, [torch.tensor([d])], time.perf_counter() + 30,
                              batch=8, expander=ex)
        if d > m:      # a sampled point violates it: never unsat, in any order
            assert got.status != "unsat" and ref.status != "unsat"
        else:
            assert ref.status == "unsat" and got.status == "unsat"
            assert ex.left_at_end == 0           # unsat only once every batch came back
            # the same tree of domains, visited in another order, every one bounded
            assert got.domains == ref.domains == ex.bounded
        if got.status == "candidate":
            y = net(got.x.reshape(1, 3)).detach()
            assert float(y[0, 0] - y[0, 1]) <= d + 1e-5


def test_a_failing_expander_is_an_error_not_a_verdict():
    _, bm, lo, hi, m = _problem(0)
    with pytest.raises(RuntimeError, match="worker lost"):
        input_split_bab(bm, lo, hi, [torch.tensor([[1.0, -1.0]])], [torch.tensor([m - 0.05])],
                        time.perf_counter() + 30, expander=Broken(bm))


def test_default_expander_bounds_the_same_domains_as_an_explicit_local_one():
    _, bm, lo, hi, m = _problem(1)
    args = (bm, lo, hi, [torch.tensor([[1.0, -1.0]])], [torch.tensor([m - 0.05])])
    a = input_split_bab(*args, time.perf_counter() + 30, batch=8)
    b = input_split_bab(*args, time.perf_counter() + 30, batch=8, expander=LocalExpander(bm))
    assert a.status == b.status == "unsat"
    assert (a.domains, a.rounds) == (b.domains, b.rounds)


# -- the same seam in ReLU-split branch and bound --------------------------------------------

def _relu_problem(seed):
    """A 20-input ReLU net (input splitting would not do), its box, and the least output found
    by sampling and PGD (an upper estimate of the true minimum)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 1))
    bm = BoundedModel(net, input_shape=(20,))
    lo, hi = -0.5 * torch.ones(20), 0.5 * torch.ones(20)
    return net, bm, lo, hi, least_output(net, 20)


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_relu_batches_in_flight_in_any_order_give_the_same_verdicts(seed):
    net, bm, lo, hi, m = _relu_problem(seed)
    C = [torch.tensor([[1.0]])]
    for d in (m - 0.03, m + 0.01):
        args = (bm, lo, hi, C, [torch.tensor([d])])
        ref = relu_split_bab(*args, time.perf_counter() + 30, batch=8)
        ex = ShuffledExpander(bm, slots=3, seed=seed)
        got = relu_split_bab(*args, time.perf_counter() + 30, batch=8, expander=ex)
        assert got.domains == ex.bounded + 1          # the root is bounded by the coordinator
        if d > m:      # a sampled point violates it: never unsat, in any order
            assert got.status != "unsat" and ref.status != "unsat"
        else:
            assert ref.status == got.status == "unsat", (ref, got)
            assert ex.left_at_end == 0           # unsat only once every batch came back
        if got.status == "candidate":
            with torch.no_grad():
                assert float(net(got.x.reshape(1, 20))) <= d + 1e-5


class BrokenRelu(LocalExpander):
    def collect(self, deadline):
        raise RuntimeError("worker lost")


def test_a_failing_relu_expander_is_an_error_not_a_verdict():
    _, bm, lo, hi, m = _relu_problem(1)
    with pytest.raises(RuntimeError, match="worker lost"):
        relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([m - 0.03])],
                       time.perf_counter() + 30, expander=BrokenRelu(bm))


def test_default_relu_expander_bounds_the_same_domains_as_an_explicit_local_one():
    _, bm, lo, hi, m = _relu_problem(2)
    args = (bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([m - 0.03])])
    a = relu_split_bab(*args, time.perf_counter() + 30, batch=8)
    b = relu_split_bab(*args, time.perf_counter() + 30, batch=8, expander=LocalExpander(bm))
    assert a.status == b.status == "unsat"
    assert (a.domains, a.rounds, a.worst) == (b.domains, b.rounds, b.worst)
