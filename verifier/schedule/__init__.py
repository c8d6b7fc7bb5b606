"""Where the work runs: in this process (the default) or on Ray (``pip install '.[ray]'``).

* ``make_scheduler(workers, address)`` -> a ``Scheduler`` for independent tasks (``verifier
  batch``): ``InProcessScheduler`` or ``RayScheduler``;
* ``RayDomainPool`` (``ray_bab.py``): Ray actors that expand batches of branch and bound
  domains (input or ReLU splits) for ``verify(..., expander=...)``;
* ``ResultsFile``: the resumable results CSV of ``verifier batch``.

Ray is imported only inside the Ray implementations; nothing in the core imports this package.
"""
from .base import InProcessScheduler, Scheduler, SchedulerError, TaskOutcome, make_scheduler
from .results import ResultsFile


def __getattr__(name):  # RayDomainPool without importing its module (and ray) up front
    if name == "RayDomainPool":
        from .ray_bab import RayDomainPool
        return RayDomainPool
    raise AttributeError(name)


__all__ = ["InProcessScheduler", "Scheduler", "SchedulerError", "TaskOutcome", "make_scheduler",
           "ResultsFile", "RayDomainPool"]
