"""``make_scheduler``: the scheduler that the command-line flags ask for, in this process or on
Ray. It sits above both implementations (``base.py``, ``ray_batch.py``), which import nothing
from here."""
from __future__ import annotations

from typing import Callable

from .base import InProcessScheduler, Scheduler, SchedulerError
from .ray_batch import RayScheduler


def make_scheduler(workers: int = 1, address: str | None = None, max_retries: int = 2,
                   hard_limit: Callable[[tuple], float] | None = None,
                   gpus_per_worker: float = 0.0) -> Scheduler:
    """In-process for one worker and no address; otherwise Ray (local with ``workers`` CPUs
    when ``address`` is None, else the cluster at ``address``: "auto", "HOST:PORT" or
    "ray://HOST:PORT"). Asking for Ray without it installed is an error, not a silent fall
    back to one process: the user asked for parallel work. ``max_retries``: how many times a
    task whose worker died is run again before it is reported as an error. ``hard_limit(args)``
    : seconds after which a running task is killed (reported as an error, not retried).
    ``gpus_per_worker``: the GPU share Ray reserves for each task (Ray only)."""
    if workers < 1:
        raise SchedulerError(f"workers must be >= 1, got {workers}")
    if max_retries < 0:
        raise SchedulerError(f"max_retries must be >= 0, got {max_retries}")
    if workers == 1 and address is None:
        return InProcessScheduler()
    return RayScheduler(workers, address, max_retries=max_retries, hard_limit=hard_limit,
                        gpus_per_worker=gpus_per_worker)
