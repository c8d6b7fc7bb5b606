"""The scheduler interface: run independent tasks (one verification instance each) and yield
their outcomes as they finish. ``InProcessScheduler`` runs them one after another in the
current process (the default, no dependency); ``RayScheduler`` (``ray_batch.py``) runs them as
Ray tasks on a local or remote Ray cluster; ``make_scheduler`` (``factory.py``) picks one from
the command-line flags. Nothing in ``verifier.bounds`` or ``verifier.complete`` imports this
package.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..deps import require
from ..errors import VerifierError


class SchedulerError(VerifierError):
    """A scheduler could not start: Ray missing, an unreachable cluster address, bad settings."""


@dataclass
class TaskOutcome:
    """What became of one task: its return ``value``, or ``error`` (the reason it has none:
    the task raised, or its worker died ``attempts`` times)."""
    value: Any = None
    error: str | None = None
    attempts: int = 1


class Scheduler(ABC):
    """Runs ``fn(*args)`` for each ``args`` of a list; at most ``workers`` at a time."""

    workers: int = 1

    @abstractmethod
    def run(self, fn: Callable, tasks: list[tuple]) -> Iterator[tuple[int, TaskOutcome]]:
        """Yield ``(index into tasks, outcome)`` as each task finishes (any order)."""

    def close(self) -> None:
        """Release the workers (a no-op in-process)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcessScheduler(Scheduler):
    """Every task in the current process, in order. A task's exception becomes its outcome's
    ``error``; KeyboardInterrupt stops the run."""

    workers = 1

    def run(self, fn, tasks):
        for i, args in enumerate(tasks):
            try:
                yield i, TaskOutcome(fn(*args))
            except Exception as e:  # a task's failure is its outcome, not the run's
                yield i, TaskOutcome(error=f"{type(e).__name__}: {e}".replace("\n", " "))


def import_ray(why: str):
    """``import ray``, or a MissingDependencyError that names the extra to install."""
    return require("ray", why)

