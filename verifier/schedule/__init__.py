"""Where the work runs: in this process (the default) or on Ray (``pip install '.[ray]'``).

* ``make_scheduler(workers, address)`` -> a ``Scheduler`` for independent tasks (``verifier
  batch``): ``InProcessScheduler`` or ``RayScheduler``;
* ``RayDomainPool`` (``ray_bab.py``): Ray actors that bound batches of input-split branch and
  bound domains for ``verify(..., expander=...)``;
* ``ResultsFile``: the resumable results CSV of ``verifier batch``.

Ray is imported only inside the Ray implementations, when they run (so this package imports
without it); nothing in the core imports this package.
"""
from .base import InProcessScheduler, Scheduler, SchedulerError, TaskOutcome
from .factory import make_scheduler
from .ray_bab import RayDomainPool
from .results import ResultsFile


__all__ = ["InProcessScheduler", "Scheduler", "SchedulerError", "TaskOutcome", "make_scheduler",
           "ResultsFile", "RayDomainPool"]
