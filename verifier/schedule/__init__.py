"""Where the work runs: in this process (the default) or on Ray (``pip install '.[ray]'``).

* ``make_scheduler(workers, address)`` -> a ``Scheduler`` for independent tasks (``verifier
  batch``): ``InProcessScheduler`` or ``RayScheduler``;
* ``verifier.schedule.ray_bab.RayDomainPool``: Ray actors that expand batches of branch and
  bound domains (input or ReLU splits) for ``verify(..., expander=...)`` (not imported here:
  it needs the bound engine, and this package stays light for the command line's start-up);
* ``ResultsFile``: the resumable results CSV of ``verifier batch``.

Ray is imported only inside the Ray implementations, when they run (so this package imports
without it); nothing in the core imports this package.
"""
from .base import InProcessScheduler, Scheduler, SchedulerError, TaskOutcome
from .factory import make_scheduler
from .results import ResultsFile


__all__ = ["InProcessScheduler", "Scheduler", "SchedulerError", "TaskOutcome", "make_scheduler",
           "ResultsFile"]
