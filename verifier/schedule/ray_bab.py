"""``RayDomainPool``: branch and bound (input- or ReLU-split) with its batches of domains
bounded on Ray actors.

The coordinator stays ``complete.bab.branch_and_bound`` (the frontier, the deadline, candidates
and their replay in ``verify``); this module only implements its expander seam (``start`` /
``submit`` / ``collect`` / ``cancel``, see ``bab.LocalExpander``). Each actor loads the ONNX
model once and keeps it, with the current run's ``Prepared`` problem (``Problem.prepare``: the
spec; for ReLU splits also the box's intermediate bounds), for every batch it is handed; one
batch per actor is in flight at a time, so ``actors`` batches are bounded at once. The same pool
serves both split strategies (the problem prepares itself and its ``Prepared`` expands a batch).
Times cross processes as durations (remaining seconds), never as clock values.

Stopping: when the coordinator returns (a candidate, the deadline, an error) it calls
``cancel``: no batch is handed out any more, and every batch out is cancelled with
``ray.cancel``: one not yet started never runs; one running sees Ray's cancellation flag
(``is_canceled``, passed to ``Prepared.expand`` as ``stop``), which the ReLU-split expansion
polls between optimization steps and PGD steps, so it ends within one step; its result is
dropped. (Stopping early only skips optimization steps and attacks, never a child: a stopped
expansion is still sound.) The input-split expansion does not poll it: its batch is one CROWN
pass, its attacks stop at the deadline it was given. An actor that dies is restarted once by Ray
and its batch run again (an expansion depends only on its input); a second death is an error,
never a closed domain.
"""
from __future__ import annotations

import itertools
import time

from ..api import BoundedModel
from ..complete.bab import Problem
from ..runtime import tune_allocator
from .base import SchedulerError, import_ray
from .ray_batch import check_gpu_share, init_ray


def _cancel_flag():
    """A callable that is true once Ray cancelled the running actor call (None on a Ray
    without ``RuntimeContext.is_canceled``)."""
    ctx = import_ray("a branch and bound worker").get_runtime_context()
    return getattr(ctx, "is_canceled", None)


class _DomainActor:
    """One worker: the model, loaded once, and the current run's prepared problem."""

    def __init__(self, onnx_path: str, device: str = "cpu"):
        import torch
        torch.set_num_threads(1)
        tune_allocator()
        # "cuda" is the GPU share Ray gave this actor (its CUDA_VISIBLE_DEVICES)
        self.model = BoundedModel.from_onnx(onnx_path, device=device)
        self.run_id, self.prepared = None, None

    def expand(self, run_id, problem, batch, seed, deadline_in, attack_in):
        now = time.perf_counter()
        deadline, attack_after = now + deadline_in, now + attack_in
        if run_id != self.run_id:
            self.run_id, self.prepared = run_id, problem.prepare(self.model)
        return self.prepared.expand(batch, seed, deadline, attack_after, stop=_cancel_flag())

    def pid(self) -> int:
        import os
        return os.getpid()


class RayDomainPool:
    """An expander for ``bab.branch_and_bound`` (``input_split_bab``, ``relu_split_bab``) and
    ``verify(..., expander=)``
    whose batches run on ``actors`` Ray actors holding the model of ``onnx_path`` (the same
    model the caller verifies). Local Ray with ``actors`` CPUs when ``address`` is None.
    ``device``: where each actor bounds, the caller's model's device (batches and results
    cross as tensors on it); ``gpus_per_worker``: the GPU share Ray reserves for each actor
    (e.g. 0.5: two actors per GPU), needed for a CUDA device."""

    _runs = itertools.count()

    def __init__(self, onnx_path: str, actors: int = 2, address: str | None = None,
                 device: str = "cpu", gpus_per_worker: float = 0.0):
        if actors < 1:
            raise SchedulerError(f"actors must be >= 1, got {actors}")
        check_gpu_share(str(device), gpus_per_worker)
        self._ray, self._own = init_ray(actors, address, "distributed branch and bound")
        remote = self._ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=1,
                                  max_task_retries=1)(_DomainActor)
        self.actors = [remote.remote(str(onnx_path), str(device)) for _ in range(actors)]
        try:  # wait until every actor holds the model (a bad file is an error here, at once)
            self.pids()
        except Exception as e:
            self.close()
            msg = str(e).replace("\n", " ")[-500:]
            raise SchedulerError(f"branch and bound workers could not load {onnx_path}: "
                                 f"{msg}") from None
        self.slots = actors
        self._free = list(self.actors)
        self._pending: dict = {}        # ObjectRef -> actor
        self._problem = None

    # -- the expander seam ------------------------------------------------------------------
    def start(self, problem) -> None:
        """A new run: ``problem`` is a ``bab.Problem`` (``InputProblem`` or ``ReluProblem``)."""
        if not isinstance(problem, Problem):
            raise SchedulerError(f"RayDomainPool cannot run a {type(problem).__name__}: it "
                                 "takes a complete.bab.Problem (InputProblem or ReluProblem)")
        self.cancel()
        self._run = next(self._runs)
        self._problem = self._ray.put(problem)

    def submit(self, batch: dict, seed: int, deadline: float, attack_after: float) -> None:
        actor = self._free.pop()
        now = time.perf_counter()
        ref = actor.expand.remote(self._run, self._problem, batch, seed, deadline - now,
                                  attack_after - now)
        self._pending[ref] = actor

    def collect(self, deadline: float):
        RayError = self._ray.exceptions.RayError
        wait = max(0.0, deadline - time.perf_counter())
        done, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=wait)
        if not done:
            return None
        ref = done[0]
        self._free.append(self._pending.pop(ref))
        try:
            return self._ray.get(ref)
        except RayError as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise SchedulerError(f"a branch and bound worker failed: {type(e).__name__}: "
                                 f"{msg}") from None

    def cancel(self) -> None:
        """Stop every batch out: not started ones never run, running ones see the flag."""
        for ref in self._pending:
            self._ray.cancel(ref)
        self._pending.clear()
        self._free = list(self.actors)

    # -- lifetime ---------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """The actors' process ids (for tests and monitoring)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        self.cancel()
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._own and self._ray.is_initialized():
            self._ray.shutdown()
        self._own = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
