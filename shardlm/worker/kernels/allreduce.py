"""The tensor-parallel all-reduce: which path a message takes, and the torch reference of the fused one.

Paths: `one_shot` and `two_shot` over peer memory (kernels/triton_allreduce.py: one kernel launch, no NCCL,
capturable in CUDA graphs), else `nccl` (or gloo on the CPU). One-shot reads every peer's whole message:
the least latency for small ones (decode: a 16 KiB row per token of Llama-3-8B). Two-shot has each rank
sum 1/world of it and gather the sums: less traffic per rank from 4 GPUs up, one more barrier. Past the
two-shot limit NCCL's ring wins.

The limits are per group size: `shardlm probe` times the three paths over the message sizes and saves
where each custom path stops beating NCCL (`save_limits`); the workers read that file (`load_limits`) and
fall back to DEFAULT_LIMITS where no probe ran on this kind of GPU. All ranks of a group compute the same
path for the same message, so their kernels always meet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...common import envs
from .norm_act import add_rms_norm_torch

ONE_SHOT, TWO_SHOT, NCCL = "one_shot", "two_shot", "nccl"

DEFAULT_LIMITS: dict[int, tuple[int, int]] = {2: (1 << 20, 1 << 20), 4: (256 << 10, 1 << 20)}
"""group size -> (largest one-shot message, largest two-shot message) in bytes, used until the probe has
measured this GPU (with 2 GPUs two-shot moves as many bytes over NVLink as one-shot: it is never picked);
larger groups take the last entry"""


PEER_BUFFER_MIN = 4 << 20
"""each rank's peer buffer holds at least this much (whatever the limits), so the probe can time the custom
paths past the default limits"""


@dataclass(frozen=True)
class AllReduceLimits:
    one_shot_max: int
    two_shot_max: int
    source: str = "built-in defaults"
    """where the limits came from (said in the start-up line)"""

    @property
    def max_bytes(self) -> int:
        """the largest message a custom path takes: the peer buffer's size"""
        return max(self.one_shot_max, self.two_shot_max)

    def path(self, nbytes: int) -> str:
        if nbytes <= self.one_shot_max:
            return ONE_SHOT
        if nbytes <= self.two_shot_max:
            return TWO_SHOT
        return NCCL


def default_limits(world: int) -> AllReduceLimits:
    key = max((k for k in DEFAULT_LIMITS if k <= world), default=min(DEFAULT_LIMITS))
    return AllReduceLimits(*DEFAULT_LIMITS[key])


def limits_file(device_name: str, world: int) -> Path:
    """Where the probe saves the limits it measured for groups of `world` GPUs of this kind."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return envs.cache_root() / "allreduce" / f"{slug}-tp{world}.json"


def save_limits(device_name: str, world: int, limits: AllReduceLimits) -> Path:
    path = limits_file(device_name, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"one_shot_max_bytes": limits.one_shot_max, "two_shot_max_bytes": limits.two_shot_max}))
    return path


def load_limits(device_name: str, world: int) -> AllReduceLimits:
    """The probe's limits for this GPU and group size if it saved any (a file that does not parse is said and
    ignored), else the defaults."""
    path = limits_file(device_name, world)
    if not path.is_file():
        return default_limits(world)
    try:
        data = json.loads(path.read_text())
        one, two = int(data["one_shot_max_bytes"]), int(data["two_shot_max_bytes"])
        if one < 0 or two < 0:
            raise ValueError("negative size")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        d = default_limits(world)
        return AllReduceLimits(d.one_shot_max, d.two_shot_max, f"built-in defaults ({path} unreadable: {exc})")
    return AllReduceLimits(one, two, f"measured by shardlm probe ({path})")


def measured_limits(times: dict[str, list[list[float]]]) -> AllReduceLimits:
    """From the probe's sweep {path: [[bytes, us], ...]} over the same sizes, ascending: the largest size up to
    which one-shot beats both others at every size, then the largest up to which one-shot or two-shot
    beats NCCL (0: never)."""
    sizes = sorted(int(b) for b, _ in times[NCCL])
    at = {p: {int(b): us for b, us in pts} for p, pts in times.items()}
    inf = float("inf")
    one = two = 0
    one_leads = True
    for b in sizes:
        o, t = at.get(ONE_SHOT, {}).get(b, inf), at.get(TWO_SHOT, {}).get(b, inf)
        if min(o, t) >= at[NCCL][b]:
            break  # the custom paths end at the first size NCCL wins
        two = b
        one_leads = one_leads and o <= t
        if one_leads:
            one = b
    return AllReduceLimits(one, two, "measured")


def all_reduce_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                                  group) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused sequence the peer kernel fuses: x summed over the group (in place), then add_rms_norm."""
    import torch.distributed as dist

    dist.all_reduce(x, group=group)
    return add_rms_norm_torch(x, residual, weight, eps)
