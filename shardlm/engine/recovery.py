"""Replacing a failed worker group: the bookkeeping (which group this is, how many restarts in a row, who
to tell). The engine does the work (LLMEngine._replace_workers): kill the group, start a fresh one, put
every live sequence back in the queue to resume by recomputation.

A restart is bounded: `max_worker_restarts` groups in a row that fail before completing a step mean a
crash loop (a GPU that keeps failing, a model that cannot load), and the engine gives up with the last
cause. Any completed step resets the count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .executor import WorkerError, WorkerHung

log = logging.getLogger("shardlm.engine")


@dataclass(frozen=True)
class Restart:
    cause: str
    """'hung' (a step missed its deadline) or 'died' (a rank exited, was killed, or reported an error)"""
    message: str
    """what the executor reported"""
    seconds: float
    """from the failure being noticed to the new group being ready"""
    generation: int
    """the new group's number (the first group is 0)"""


class Recovery:
    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.generation = 0
        """the current worker group (0: the first)"""
        self.in_a_row = 0
        self.recovering = False
        self.history: list[Restart] = []
        self.listeners: list[Callable[[Restart], None]] = []
        """called (in the engine's thread) after each replacement: metrics, logs"""
        self._started = 0.0
        self._cause: WorkerError | None = None

    def begin(self, cause: WorkerError) -> None:
        """A group failed: count a restart, or raise WorkerError when the budget is spent."""
        if self.in_a_row >= self.max_restarts:
            raise WorkerError(f"gave up replacing the worker group after {self.in_a_row} restarts in a row "
                              f"without a completed step (max_worker_restarts={self.max_restarts}); last failure: "
                              f"{cause}") from cause
        self.in_a_row += 1
        self.generation += 1
        self.recovering = True
        self._started, self._cause = time.monotonic(), cause
        log.warning("worker group %d failed (%s); starting group %d", self.generation - 1, cause, self.generation)

    def end(self) -> None:
        """The replacement group is ready (or failed to start: then begin() comes again)."""
        self.recovering = False
        cause = self._cause
        restart = Restart("hung" if isinstance(cause, WorkerHung) else "died", str(cause),
                          time.monotonic() - self._started, self.generation)
        self.history.append(restart)
        log.warning("worker group %d ready after %.1f s", self.generation, restart.seconds)
        for listener in self.listeners:
            listener(restart)

    def step_completed(self) -> None:
        self.in_a_row = 0
