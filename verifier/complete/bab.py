"""Branch and bound: one coordinator, two split strategies.

A run decides whether some ``x`` of a box has an output ``y`` satisfying one of the conjunctions
``C_k y <= d_k``. It keeps a **frontier** of open *domains* (parts of the problem that together
cover every counterexample the box may hold) and hands batches of them (a ``DomainBatch``) to an
**expander**, which *expands* each batch: splits its domains, bounds the pieces, tries
counterexamples, and returns an ``Expansion`` (the open children, or a candidate). The frontier
takes the children back. The run ends

* ``unsat`` when the frontier is empty **and every batch handed out has come back**: every
  domain was closed by a sound bound (a row with ``lower(C_r y) > d_r`` in each conjunction);
* ``candidate`` when an expansion found a point satisfying a conjunction (the caller replays it
  on the original model before it reports ``sat``);
* ``timeout`` at the deadline (checked before every batch handed out and by ``collect``);
* ``unknown`` when the frontier says it is stuck (ReLU splits: no neuron left to split, or the
  domain limit reached).

The two **split strategies** differ only in their pieces, never in this loop:

=============  ==============================  ==============================================
               input splits (``input_bab``)    ReLU splits (``relu_bab``)
=============  ==============================  ==============================================
``Problem``    ``InputProblem``                ``ReluProblem``
``Prepared``   ``InputPrepared``               ``ReluPrepared``
a domain       a sub-box ``lo, hi`` with its   the box with split signs ``sg`` and refined
               parent's intermediate bounds    pre-activation bounds ``lo, up``
expansion      ``expand_input_domains``        ``expand_relu_domains``
``Frontier``   ``BestFirstFrontier``           ``ReluFrontier``
=============  ==============================  ==============================================

The **expander seam**: ``start(problem)`` once per run (``problem``: a picklable ``Problem``;
the expander prepares it once, ``Problem.prepare(model) -> Prepared``), then up to ``slots``
batches ``submit(batch, seed, deadline, attack_after)`` before each ``collect(deadline)`` (one
finished ``Expansion`` in any order, or None if the deadline passed first), and ``cancel()``
when the run ends (batches still out are dropped). ``LocalExpander`` (the default) expands each
batch in this process; ``schedule.ray_bab.RayDomainPool`` on Ray actors. Times are
``time.perf_counter()`` values.
"""
from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

log = logging.getLogger(__name__)

# A batch of ``n`` domains: name -> tensor ``[n, ...]`` (ReLU splits also nest {node: [n, ...]}
# dicts). Each strategy names its entries (see its module).
DomainBatch = dict[str, Any]


@dataclass
class Expansion:
    """What expanding one batch returned: ``parents`` domains of the batch handed out,
    ``bounded`` domains bounded (input splits: the batch's own; ReLU splits: the ``2 parents``
    children), ``children`` the open ones to queue (None when all closed), or a ``candidate``
    ``(x, disjunct, how it was found)`` to replay. Input splits also report ``open`` (domains
    of the batch not refuted), ``worst`` (their lowest margin) and ``attack_s`` (seconds of
    PGD)."""
    bounded: int = 0
    parents: int = 0
    children: DomainBatch | None = None
    candidate: tuple | None = None
    open: int = 0
    worst: float = float("nan")
    attack_s: float = 0.0


class Prepared(ABC):
    """A problem prepared on one process (the model's graph and the spec's tensors it needs)."""

    @abstractmethod
    def expand(self, batch: DomainBatch, seed: int, deadline: float, attack_after: float,
               stop: Callable[[], bool] | None = None) -> Expansion:
        """Split, bound and attack ``batch``; PGD only when ``perf_counter() >= attack_after``.
        ``stop()`` true (or the deadline) may cut optimization steps and attacks short, never
        a child: the expansion stays sound. ``seed``: the round (expansions are deterministic)."""


class Problem(ABC):
    """What every batch of one run shares: a picklable description, cheap to send to a worker."""

    @abstractmethod
    def prepare(self, model) -> Prepared:
        """-> the ``Prepared`` problem a worker keeps for every batch of the run."""


class Frontier(ABC):
    """The open domains waiting to be handed out; ``worst``: the lowest refutation margin
    the run reports (``nan`` while unknown)."""

    worst: float = float("nan")

    @abstractmethod
    def __len__(self) -> int:
        """Domains waiting."""

    @abstractmethod
    def pop(self, k: int) -> DomainBatch:
        """Up to ``k`` domains, in the strategy's order."""

    @abstractmethod
    def add(self, e: Expansion) -> None:
        """Take an expansion's children (if any) and update ``worst``."""

    def ready(self) -> bool:
        """Whether a batch can be handed out now."""
        return len(self) > 0

    def stuck(self, inflight: int) -> str | None:
        """Why the run cannot go on (-> ``unknown``), or None."""
        return None


class Expander(Protocol):
    """Where batches are expanded (the seam above): ``LocalExpander`` or ``RayDomainPool``."""

    slots: int

    def start(self, problem: Problem) -> None: ...

    def submit(self, batch: DomainBatch, seed: int, deadline: float,
               attack_after: float) -> None: ...

    def collect(self, deadline: float) -> Expansion | None: ...

    def cancel(self) -> None: ...


class LocalExpander:
    """The default expander: each batch expanded in this process when it is collected."""

    slots = 1

    def __init__(self, model):
        self.model = model
        self.prepared = None
        self._job = None

    def start(self, problem: Problem) -> None:
        self.prepared = problem.prepare(self.model)

    def submit(self, batch: DomainBatch, seed: int, deadline: float, attack_after: float) -> None:
        self._job = (batch, seed, deadline, attack_after)

    def collect(self, deadline: float) -> Expansion | None:
        job, self._job = self._job, None
        return self.prepared.expand(*job)

    def cancel(self) -> None:
        self._job = None


@dataclass
class BabResult:
    status: str                  # "unsat", "candidate", "timeout", "unknown"
    x: torch.Tensor | None = None
    disjunct: int | None = None
    domains: int = 0             # domains bounded in all
    rounds: int = 0
    worst: float = float("nan")  # the worst (lowest) refutation margin still open
    reason: str = ""
    left: Any = None             # ``unknown``: the frontier it was stuck with (another split
                                 # strategy may take its domains over)


def branch_and_bound(problem: Problem, frontier: Frontier, expander: Expander, deadline: float,
                     *, batch: int, attack_after: Callable[[int, float], float], proof: str,
                     progress=None, t0: float | None = None, domains: int = 0,
                     name: str = "bab") -> BabResult:
    """Run branch and bound until a verdict (see the module docstring).

    ``batch``: domains per batch handed out; ``attack_after(round, attack_s)``: the
    ``perf_counter()`` time from which the round's expansion may attack (``attack_s``: PGD
    seconds so far); ``proof``: the bounds that close domains, for the reason of ``unsat``;
    ``progress(domains_left, worst_margin, elapsed)`` after every batch that bounded domains;
    ``t0``, ``domains``: the run's start and the domains bounded before the loop (a root)."""
    t0 = time.perf_counter() if t0 is None else t0
    total, rounds, inflight, out, attack_s = domains, 0, 0, 0, 0.0

    def result(status, reason, candidate=(None, None)):
        log.info("%s: %s after %d domains, %d rounds, %.1fs (%s)", name, status, total, rounds,
                 time.perf_counter() - t0, reason)
        return BabResult(status, candidate[0], candidate[1], total, rounds, frontier.worst,
                         reason)

    def timeout():
        return result("timeout", f"budget ran out with {len(frontier) + out} domains open "
                                 f"(worst margin {frontier.worst:.4g}, {total} bounded)")

    expander.start(problem)
    try:
        while True:
            if not len(frontier) and not inflight:
                return result("unsat", f"every subdomain refuted by {proof} bounds "
                                       f"({total} domains)")
            if time.perf_counter() > deadline:
                return timeout()
            why = frontier.stuck(inflight)
            if why is not None:
                r = result("unknown", why)
                r.left = frontier
                return r
            while inflight < expander.slots and frontier.ready():
                if time.perf_counter() > deadline:
                    return timeout()
                rounds += 1
                waiting = len(frontier)
                expander.submit(frontier.pop(batch), rounds, deadline,
                                attack_after(rounds, attack_s))
                inflight += 1
                out += waiting - len(frontier)
            e = expander.collect(deadline)
            if e is None:
                return timeout()
            inflight -= 1
            out -= e.parents
            total += e.bounded
            attack_s += e.attack_s
            frontier.add(e)
            if e.candidate is not None:
                return result("candidate", e.candidate[2], e.candidate)
            if progress is not None and e.bounded:
                progress(len(frontier), frontier.worst, time.perf_counter() - t0)
            log.debug("round %d: %d domains open, worst margin %.4g", rounds, len(frontier),
                      frontier.worst)
    finally:
        expander.cancel()   # a verdict, the deadline or an error: batches out are dropped


def every_kth_round(k: int) -> Callable[[int, float], float]:
    """An attack schedule: PGD in every ``k``-th round (ReLU splits)."""
    return lambda rounds, attack_s: -math.inf if rounds % k == 0 else math.inf


def time_share(t0: float, share: float) -> Callable[[int, float], float]:
    """An attack schedule: PGD while attacks took at most ``share`` of the time since ``t0``
    (input splits): from ``t0 + attack_s / share`` on."""
    return lambda rounds, attack_s: t0 + attack_s / share
