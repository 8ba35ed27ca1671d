"""`--parallel auto` for the engine: pick a layout among those the engine can run today.

    recommend_for_engine(model_config, gpus, gpu, interconnect, max_model_len, profile_path=None,
                         supported=("tp",)) -> {"tp", "pp", "dp", "ep", "reason", "table"}

Only layouts whose degrees are all in `supported` are considered (the others stay 1). When "dp" is not
supported, layouts on fewer than `gpus` GPUs are candidates too: without data parallelism the extra GPUs
can only join the TP group, and for a small or host-bound model a smaller group can be the better one.
The choice is the planner's (make_plan): highest predicted throughput with the KV cache full; within 3%,
the lower batch-1 TPOT.
"""

from __future__ import annotations

from typing import Any

from ..common.defaults import MAX_NUM_SEQS
from . import PlanError
from .hardware import GPUS, default_interconnect, gpu_preset_from_name, make_cluster
from .models import model_from_dict
from .plan import DEGREES, Workload, check_degrees, make_plan
from .profile import Profile, load_profile
from .report import format_table

__all__ = ["recommend_for_engine", "gpu_preset_from_name"]

# a probe's measured topology -> the --interconnect preset that describes it
TOPOLOGY_TO_INTERCONNECT = {"nvlink": "nvlink", "pcie": "pcie", "cpu": "pcie-cross-socket"}


def local_gpu_name() -> str:
    """Name of CUDA device 0 as torch reports it (torch is imported only here)."""
    try:
        import torch
    except ImportError:
        raise PlanError(f"gpu=None needs torch to read the device name; pass gpu (one of {', '.join(GPUS)})") from None
    if not torch.cuda.is_available():
        raise PlanError(f"gpu=None but no CUDA device is visible; pass gpu (one of {', '.join(GPUS)})")
    return torch.cuda.get_device_name(0)


def _interconnect(interconnect: str | None, gpu: str, profile: Profile | None) -> tuple[str, str]:
    """(interconnect preset, where it came from)."""
    if interconnect is not None:
        return interconnect, "given"
    if profile is not None and profile.topology in TOPOLOGY_TO_INTERCONNECT:
        return TOPOLOGY_TO_INTERCONNECT[profile.topology], f"the profile's measured {profile.topology!r} topology"
    link = default_interconnect(GPUS[gpu])
    return link, "default" if link == "nvlink" else f"default ({gpu} has no NVLink)"


def recommend_for_engine(model_config: dict, gpus: int, gpu: str | None, interconnect: str | None,
                         max_model_len: int, profile_path: str | None = None, supported=("tp",),
                         *, max_num_seqs: int = MAX_NUM_SEQS, model_name: str | None = None) -> dict[str, Any]:
    """Recommend a layout the engine can run.

    model_config: the engine's ModelConfig.to_dict() (or a Hugging Face config dict).
    gpus: GPUs available. gpu: a preset or a device name ("NVIDIA H100 80GB HBM3"); None reads the
    profile's device, else torch's device 0. interconnect: a preset; None takes the profile's measured
    topology, else nvlink (pcie for GPUs without NVLink). max_model_len: the engine's limit; requests are
    taken as half prompt, half output. profile_path: a `shardlm probe` profile. supported: degrees the
    engine runs ("tp", "pp", "dp", "ep"). Keyword-only: max_num_seqs (the engine's cap per replica),
    model_name (shown in the table).

    Returns {"tp", "pp", "dp", "ep", "reason", "table"}. Raises PlanError on bad input, and when no layout
    fits, naming the smallest GPU count that would."""
    if hasattr(model_config, "to_dict") and not isinstance(model_config, dict):
        model_config = model_config.to_dict()
    if not isinstance(model_config, dict):
        raise PlanError(f"model_config must be a dict (ModelConfig.to_dict()), got {type(model_config).__name__}")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise PlanError(f"gpus must be a positive integer, got {gpus!r}")
    degrees = check_degrees(tuple(supported))
    model = model_from_dict(model_config, model_name or str(model_config.get("_name_or_path") or "model"))
    profile = load_profile(profile_path) if profile_path else None
    if gpu is None:
        name = profile.device if profile is not None else local_gpu_name()
        preset = gpu_preset_from_name(name)
    else:
        preset = gpu_preset_from_name(gpu)
    link, link_from = _interconnect(interconnect, preset, profile)
    cluster = make_cluster(preset, gpus, link)
    wl = Workload(max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    plan = make_plan(model, cluster, wl, profile, degrees=degrees, fewer_gpus="dp" not in degrees)
    rec = plan.recommended
    if rec is None:  # no SLO is set, so only an unusual model lands here
        raise PlanError(plan.reason)
    reason = plan.reason
    off = [d for d in DEGREES if d not in degrees and (d != "ep" or model.is_moe)]  # ep only matters for MoE
    if off:
        reason += (f" Only layouts with {'/'.join(degrees) or 'no'} parallelism were considered (what the engine "
                   f"runs today); {', '.join(off)} = 1.")
    used = rec.tp * rec.pp * rec.dp
    if used < gpus:
        reason += f" It uses {used} of the {gpus} GPUs."
    reason += f" GPU preset {preset}, interconnect {link} ({link_from})."
    return {"tp": rec.tp, "pp": rec.pp, "dp": rec.dp, "ep": rec.ep, "reason": reason, "table": format_table(plan)}
