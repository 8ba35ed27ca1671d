"""Layout planner: predict memory, KV capacity, TTFT, TPOT and throughput for every (TP, PP, EP, DP)
layout of a model on a cluster, and recommend one.

Pure Python (no torch): it runs anywhere the CLI runs. Modules:
  models   model shapes from a preset or a Hugging Face config.json
  hardware GPU, interconnect and network presets; which link a group of ranks uses
  profile  measured cluster numbers (written by `shardlm probe`) that replace datasheet ones
  cost     the formulas: weights/KV per GPU, decode and prefill time, collectives, bubbles
  plan     enumerate layouts, reject with reasons, recommend
  report   the plan as a table, JSON-ready data or a PNG
  validate compare predictions with `shardlm bench latency --json` measurements (`plan --validate`)
  auto     recommend_for_engine: `--parallel auto`, restricted to the degrees the engine runs
  cli      `shardlm plan` argument parsing
"""

from __future__ import annotations


class PlanError(ValueError):
    """Bad planner input (unknown preset, incomplete config, malformed profile, ...) with what to change."""


def read_json(path: str, what: str):
    """Parse a JSON file, turning a missing file or bad JSON into a PlanError that names `what`."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise PlanError(f"{what} {path!r} not found") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: {what} is not valid JSON ({exc})") from None


# Defined before the submodule imports below on purpose: they import PlanError from this package.
from .auto import recommend_for_engine  # noqa: E402
from .hardware import (  # noqa: E402
    Cluster,
    GPUSpec,
    gpu_preset_from_name,  # noqa: E402
    make_cluster,
)
from .models import ModelSpec, load_model  # noqa: E402
from .plan import Plan, Workload, make_plan  # noqa: E402
from .profile import Profile, load_profile  # noqa: E402

__all__ = [
    "PlanError", "ModelSpec", "load_model", "Cluster", "GPUSpec", "make_cluster",
    "Profile", "load_profile", "Plan", "Workload", "make_plan", "gpu_preset_from_name", "recommend_for_engine",
]
