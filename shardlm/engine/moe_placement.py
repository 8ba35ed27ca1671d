"""Which expert parallel rank holds which experts: round-robin, or balanced on a measured load.

Pure Python, run on the driver; the workers get the result (one list of experts per rank, per MoE
layer) and load exactly those experts. A rank may hold a copy of an expert another rank holds
too ("redundant" copies of hot experts); the dispatch then splits that expert's tokens between
its copies.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..common.config import ConfigError, ModelConfig

PLACEMENTS = ("round_robin", "balanced")


def round_robin(num_experts: int, ep: int) -> list[list[int]]:
    """Expert e on rank e % ep (uneven counts allowed: the first E % ep ranks get one more)."""
    return [[e for e in range(num_experts) if e % ep == r] for r in range(ep)]


def balanced(load: list[float], ep: int, redundant: int = 0) -> list[list[int]]:
    """Place experts so the ranks' summed load is as even as a greedy pass can make it.

    `redundant` extra copies go, one at a time, to the expert with the highest load per copy (an
    expert never has two copies on one rank). Every rank then holds ceil((E + redundant) / ep)
    slots at most; copies are placed heaviest first on the least-loaded rank with a free slot
    (longest-processing-time first), each copy carrying load / copies.
    """
    n = len(load)
    if redundant < 0:
        raise ConfigError(f"num_redundant_experts must be >= 0, got {redundant}")
    if redundant > n * (ep - 1):
        raise ConfigError(f"num_redundant_experts={redundant} is more than {n * (ep - 1)} copies: with ep={ep} "
                          f"an expert can have at most {ep} copies (one per rank)")
    copies = [1] * n
    for _ in range(redundant):
        e = max((e for e in range(n) if copies[e] < ep), key=lambda e: (load[e] / copies[e], -e))
        copies[e] += 1
    slots = -(-(n + redundant) // ep)
    items = sorted(((load[e] / copies[e], e) for e in range(n) for _ in range(copies[e])), key=lambda t: (-t[0], t[1]))
    held: list[list[int]] = [[] for _ in range(ep)]
    rank_load = [0.0] * ep
    for share, e in items:
        free = [r for r in range(ep) if len(held[r]) < slots and e not in held[r]]
        r = min(free, key=lambda r: (rank_load[r], len(held[r]), r))
        held[r].append(e)
        rank_load[r] += share
    return [sorted(h) for h in held]


def rank_loads(placement: list[list[int]], load: list[float]) -> list[float]:
    """Load each rank would carry, splitting an expert's load evenly over its copies."""
    copies = [0] * len(load)
    for experts in placement:
        for e in experts:
            copies[e] += 1
    return [sum(load[e] / copies[e] for e in experts) for experts in placement]


def read_load(path: str, cfg: ModelConfig) -> dict[int, list[float]]:
    """Tokens per expert per MoE layer from a file written by LLM.save_expert_load / --save-expert-load."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"expert_load file {path} does not exist; write one with LLM.save_expert_load(path) "
                          f"or `shardlm generate ... --save-expert-load {path}`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"expert_load file {path} is not readable JSON: {exc}") from None
    layers = data.get("tokens_per_expert") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise ConfigError(f"expert_load file {path} has no 'tokens_per_expert' object ({{layer: [count per expert]}})")
    out: dict[int, list[float]] = {}
    for key, counts in layers.items():
        layer = int(key) if str(key).isascii() and str(key).isdecimal() else -1
        if str(layer) != key or layer >= cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
            raise ConfigError(f"expert_load file {path}: layer {key!r} is not an MoE layer of this model")
        if not isinstance(counts, list) or len(counts) != cfg.num_experts or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ConfigError(f"expert_load file {path}: layer {key} must list {cfg.num_experts} non-negative counts "
                              f"(one per expert)")
        out[layer] = [float(c) for c in counts]
    return out


def plan_placement(cfg: ModelConfig, ep: int, strategy: str = "round_robin", load_path: str | None = None,
                   redundant: int = 0) -> list[list[list[int]] | None]:
    """For every decoder layer: None (dense) or, per EP rank, the experts it holds."""
    if strategy not in PLACEMENTS:
        raise ConfigError(f"expert_placement={strategy!r} is unknown; use one of {', '.join(PLACEMENTS)}")
    if strategy == "round_robin" and (load_path or redundant):
        raise ConfigError("expert_load and num_redundant_experts need expert_placement='balanced'")
    if strategy == "balanced" and not load_path:
        raise ConfigError("expert_placement='balanced' needs a measured load: pass expert_load=<file> written by "
                          "LLM.save_expert_load / `shardlm generate ... --save-expert-load FILE`")
    loads = read_load(load_path, cfg) if load_path else {}
    out: list[list[list[int]] | None] = []
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            out.append(None)
        elif strategy == "balanced":
            # a layer missing from the file counts as evenly loaded
            out.append(balanced(loads.get(i, [1.0] * cfg.num_experts), ep, redundant))
        else:
            out.append(round_robin(cfg.num_experts, ep))
    return out

