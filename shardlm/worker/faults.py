"""Fault injection for tests: make one rank die or stall at a chosen step and point.

    SHARDLM_FAULT_INJECT="rank=1,step=5,point=step,action=kill"

The worker of `rank` counts the step plans it receives (the first is step 1); in step `step`, when it
reaches `point`, it sends itself SIGKILL (`kill`: as if the OOM killer or a GPU fault took it) or
SIGSTOP (`stall`: alive but silent, as a rank hung in a driver call or a collective looks). Points:

- `step`: the start of the step, before the model runs
- `stage_send`: just before sending activations to the next pipeline stage (ParallelContext.send_next_stage)
- `all_to_all`: just before an expert-parallel MoE dispatch's first all-to-all (layers/moe.py)

The driver passes the variable only to its first worker group (Executor's generation 0), so the group
that replaces a failed one runs clean. Unset, `armed` is None and each hook costs one attribute check.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from ..common import envs

POINTS = ("step", "stage_send", "all_to_all")
ACTIONS = {"kill": signal.SIGKILL, "stall": signal.SIGSTOP}
FORMAT = "rank=R,step=N,point=step|stage_send|all_to_all,action=kill|stall"


@dataclass
class Fault:
    rank: int
    step: int
    point: str
    action: str
    steps_seen: int = 0
    """step plans this worker has received"""
    fired: bool = False
    """it fires once: a stalled rank that is continued (SIGCONT) runs on"""

    def step_started(self) -> None:
        """Call at the start of every StepPlan (counts it, then passes the `step` point)."""
        self.steps_seen += 1
        self.reached("step")

    def reached(self, point: str) -> None:
        if point == self.point and self.steps_seen == self.step and not self.fired:
            self.fired = True
            os.kill(os.getpid(), ACTIONS[self.action])


armed: Fault | None = None
"""this worker's fault, when SHARDLM_FAULT_INJECT names its rank"""


def parse(spec: str) -> Fault:
    """A Fault from SHARDLM_FAULT_INJECT's text; ValueError naming what is wrong."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() in fields:
            raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r}: {part!r} is not key=value (or repeats a key); "
                             f"expected {FORMAT}")
        fields[key.strip()] = value.strip()
    if sorted(fields) != ["action", "point", "rank", "step"]:
        raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r} must name exactly rank, step, point and action: {FORMAT}")
    try:
        rank, step = int(fields["rank"]), int(fields["step"])
    except ValueError:
        raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r}: rank and step must be integers ({FORMAT})") from None
    if rank < 0 or step < 1:
        raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r}: rank must be >= 0 and step >= 1 (steps count from 1)")
    if fields["point"] not in POINTS:
        raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r}: point must be one of {', '.join(POINTS)}")
    if fields["action"] not in ACTIONS:
        raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r}: action must be one of {', '.join(ACTIONS)}")
    return Fault(rank, step, fields["point"], fields["action"])


def arm(rank: int, world_size: int) -> None:
    """Read SHARDLM_FAULT_INJECT once, at worker start; arm the fault if it names this rank."""
    global armed
    spec = envs.fault_inject()
    fault = parse(spec) if spec else None
    if fault is not None and fault.rank >= world_size:
        raise ValueError(f"SHARDLM_FAULT_INJECT={spec!r} names rank {fault.rank}, but the world has {world_size} "
                         f"ranks (0 .. {world_size - 1})")
    armed = fault if fault is not None and fault.rank == rank else None
