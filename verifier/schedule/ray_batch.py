"""``RayScheduler``: tasks as Ray tasks, at most ``workers`` in flight, outcomes yielded as they
finish. A task whose worker process dies (killed, crashed, out of memory, node lost) is run again
up to ``max_retries`` times, then reported as an error naming what killed it; a task that raised
is not retried (it would raise again). Ray is imported here only.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import deque

from ..runtime import tune_allocator
from .base import Scheduler, SchedulerError, TaskOutcome, import_ray

log = logging.getLogger(__name__)


def _run_task(fn, *args):
    """The body of every Ray task: one torch thread (each task has one CPU), the allocator
    settings of the command line, then ``fn(*args)``."""
    import torch  # in the Ray worker only: the driver's scheduler does not need it

    torch.set_num_threads(1)
    tune_allocator()
    return fn(*args)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A SchedulerError unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP connection:
    ``ray.init`` would otherwise wait for minutes on an address where nothing listens."""
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise SchedulerError(f"bad Ray address {address!r}: the port {port!r} is not a number "
                             "(expected HOST:PORT, ray://HOST:PORT or auto)") from None
    try:
        with socket.create_connection((host, port_n), timeout=timeout):
            pass
    except OSError as e:
        raise SchedulerError(f"cannot reach the Ray cluster at {address}: "
                             f"{e.strerror or e}") from None


def init_ray(workers: int, address: str | None, why: str):
    """``ray`` connected to ``address``, or to a new local Ray of ``workers`` CPUs.
    -> (ray module, whether we started it and must shut it down)."""
    ray = import_ray(why)
    if ray.is_initialized():
        return ray, False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    try:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, **quiet)
        else:
            check_reachable(address)
            ray.init(address=address, **quiet)
    except SchedulerError:
        raise
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = "a local Ray" if address is None else f"the Ray cluster at {address}"
        raise SchedulerError(f"cannot start or join {where}: {e}") from None
    return ray, True


def check_gpu_share(device: str, gpus_per_worker: float) -> None:
    """A SchedulerError for a GPU share Ray cannot give (< 0, or a fraction above 1 that is not
    a whole number) or a CUDA device without one (Ray hides the GPUs from a worker that
    reserved none)."""
    if not gpus_per_worker >= 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker)):
        raise SchedulerError(f"--gpus-per-worker must be >= 0, a fraction up to 1 or a whole "
                             f"number, got {gpus_per_worker:g}")
    if device.startswith("cuda") and gpus_per_worker == 0:
        raise SchedulerError(f"--device {device} on Ray workers needs --gpus-per-worker (e.g. 1, "
                             "or 0.5 for two workers per GPU)")


class RayScheduler(Scheduler):
    def __init__(self, workers: int, address: str | None = None, max_retries: int = 2,
                 hard_limit=None, gpus_per_worker: float = 0.0):
        why = f"--ray-address {address}" if address else f"--workers {workers}"
        check_gpu_share("cpu", gpus_per_worker)
        self._ray, self._own = init_ray(workers, address, why)
        self.workers = workers
        self.max_retries = max_retries
        # the clock of a task starts at its submission; on a cluster a task may wait for a
        # free CPU first, so the limit applies only on the local Ray of ``workers`` CPUs
        self.hard_limit = hard_limit if self._own and address is None else None
        self._remote = self._ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_retries=0)(_run_task)

    def run(self, fn, tasks):
        ray = self._ray
        RayError, RayTaskError = ray.exceptions.RayError, ray.exceptions.RayTaskError
        TaskCancelledError = ray.exceptions.TaskCancelledError
        fn_ref = ray.put(fn)
        todo = deque(range(len(tasks)))
        attempts = [0] * len(tasks)
        pending: dict = {}          # ObjectRef -> (task index, submit time)
        killed: set = set()         # refs cancelled for running past their hard limit
        try:
            while todo or pending:
                while todo and len(pending) < self.workers:
                    i = todo.popleft()
                    attempts[i] += 1
                    pending[self._remote.remote(fn_ref, *tasks[i])] = (i, time.monotonic())
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    i, t0 = pending.pop(ref)
                    try:
                        yield i, TaskOutcome(ray.get(ref), attempts=attempts[i])
                    except TaskCancelledError:
                        limit = self.hard_limit(tasks[i]) if self.hard_limit else 0
                        why = (f"killed after running {limit:g} s, past its timeout"
                               if ref in killed else "cancelled")
                        yield i, TaskOutcome(error=why, attempts=attempts[i])
                    except RayTaskError as e:  # the task itself raised: not retried
                        cause = e.cause if getattr(e, "cause", None) is not None else e
                        msg = f"{type(cause).__name__}: {cause}".replace("\n", " ")
                        yield i, TaskOutcome(error=msg, attempts=attempts[i])
                    except RayError as e:      # the worker died: run it again, a few times
                        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        if attempts[i] <= self.max_retries:
                            log.warning("task %d lost its worker (%s); retry %d of %d", i, reason,
                                        attempts[i], self.max_retries)
                            todo.appendleft(i)
                        else:
                            yield i, TaskOutcome(
                                error=f"its worker died {attempts[i]} times (retried "
                                      f"{self.max_retries}); last: {reason}",
                                attempts=attempts[i])
                if self.hard_limit is not None:
                    now = time.monotonic()
                    for ref, (i, t0) in pending.items():
                        if ref not in killed and now - t0 > self.hard_limit(tasks[i]):
                            killed.add(ref)
                            ray.cancel(ref, force=True)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._own and self._ray.is_initialized():
            self._ray.shutdown()
        self._own = False
