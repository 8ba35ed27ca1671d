"""Parallel layout: pure rank arithmetic shared by the launcher, the planner and the tests.

Rank order is dp outermost, then pp, then tp innermost, so the ranks of one TP group are
neighbours (same node, same NVLink island). EP reuses the tp (x dp) ranks of a stage.
Nothing here touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot work, with a message that says what to change."""


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into `parts` contiguous [start, end) runs whose sizes differ by at most one.

    The first n % parts runs get the extra element. Runs may be empty when parts > n.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class RankCoord:
    """Coordinates of one global rank in the layout."""

    dp: int
    pp: int
    tp: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of data (dp), pipeline (pp), tensor (tp) and expert (ep) parallelism."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if self.ep > 1 and self.ep != self.tp * self.dp:
            raise LayoutError(
                f"ep={self.ep} must equal tp*dp={self.tp * self.dp}: expert parallelism reuses the "
                f"tensor-parallel (x data-parallel) ranks of a stage"
            )

    @property
    def world_size(self) -> int:
        """Number of ranks (processes, one per GPU) the layout needs."""
        return self.dp * self.pp * self.tp

    def coord(self, rank: int) -> RankCoord:
        """Map a global rank to its (dp, pp, tp) coordinates."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside world of size {self.world_size}")
        tp = rank % self.tp
        pp = (rank // self.tp) % self.pp
        dp = rank // (self.tp * self.pp)
        return RankCoord(dp=dp, pp=pp, tp=tp)

    def rank(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        """Map (dp, pp, tp) coordinates back to a global rank."""
        if not (0 <= dp < self.dp and 0 <= pp < self.pp and 0 <= tp < self.tp):
            raise LayoutError(f"coordinates dp={dp} pp={pp} tp={tp} outside layout {self}")
        return (dp * self.pp + pp) * self.tp + tp

    def tp_groups(self) -> list[list[int]]:
        """Ranks of every tensor-parallel group (one per (dp, pp) pair)."""
        return [
            [self.rank(d, p, t) for t in range(self.tp)] for d in range(self.dp) for p in range(self.pp)
        ]

    def pp_groups(self) -> list[list[int]]:
        """Ranks of every pipeline group (one per (dp, tp) pair), in stage order."""
        return [
            [self.rank(d, p, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Ranks of every data-parallel group (one per (pp, tp) pair)."""
        return [
            [self.rank(d, p, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)
        ]

    def ep_groups(self) -> list[list[int]]:
        """Ranks of every expert-parallel group: the tp x dp ranks of one pipeline stage."""
        return [
            [self.rank(d, p, t) for d in range(self.dp) for t in range(self.tp)] for p in range(self.pp)
        ]

    def output_ranks(self) -> list[int]:
        """For each dp replica, the rank that returns sampled tokens (tp rank 0 of the last stage)."""
        return [self.rank(d, self.pp - 1, 0) for d in range(self.dp)]

    def check_world(self, available: int, what: str = "processes") -> None:
        """Raise if the layout needs more ranks than `available`."""
        if self.world_size > available:
            raise LayoutError(
                f"tp={self.tp} x pp={self.pp} x dp={self.dp} needs {self.world_size} {what}, "
                f"only {available} available; lower a degree so the product is <= {available}"
            )

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} ep={self.ep}"


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank owns.

    q heads [q_start, q_end) are contiguous; kv heads [kv_start, kv_end) are exactly the KV heads
    those q heads read (GQA), so a KV head is replicated on several ranks when tp > n_kv_heads or
    when a group of q heads is split across ranks.
    """

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    # for each local q head, the index of its kv head among the local kv heads
    kv_index: tuple[int, ...]

    @property
    def n_q(self) -> int:
        return self.q_end - self.q_start

    @property
    def n_kv(self) -> int:
        return self.kv_end - self.kv_start


def shard_heads(n_heads: int, n_kv_heads: int, tp: int, tp_rank: int) -> HeadShard:
    """Assign query heads to a TP rank as evenly as possible and list the KV heads it needs."""
    if n_heads % n_kv_heads:
        raise LayoutError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
    if tp > n_heads:
        raise LayoutError(
            f"tensor_parallel_size={tp} exceeds num_attention_heads={n_heads}: every rank needs at "
            f"least one attention head; use tensor_parallel_size <= {n_heads} (add pipeline stages instead)"
        )
    group = n_heads // n_kv_heads
    q_start, q_end = split_evenly(n_heads, tp)[tp_rank]
    kv_start, kv_end = q_start // group, (q_end - 1) // group + 1
    kv_index = tuple(h // group - kv_start for h in range(q_start, q_end))
    return HeadShard(q_start, q_end, kv_start, kv_end, kv_index)


def split_layers(num_layers: int, pp: int, layer_weight: float = 1.0, first_extra: float = 0.0,
                 last_extra: float = 0.0, user_split: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) decoder layers for each pipeline stage.

    Balances the weight of each stage, counting the embedding (`first_extra`, first stage) and the
    LM head and final norm (`last_extra`, last stage) in units of parameters, like `layer_weight`.
    `user_split` (e.g. [10, 14]) overrides the balance; it must name every stage and sum to num_layers.
    """
    if pp < 1:
        raise LayoutError(f"pipeline_parallel_size must be >= 1, got {pp}")
    if pp > num_layers:
        raise LayoutError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} layers: every stage "
                          f"needs at least one layer; use pipeline_parallel_size <= {num_layers}")
    if user_split is not None:
        if len(user_split) != pp:
            raise LayoutError(f"pp_layer_split {user_split} names {len(user_split)} stages, pipeline_parallel_size is {pp}")
        if any(not isinstance(n, int) or n < 1 for n in user_split):
            raise LayoutError(f"pp_layer_split {user_split} leaves a stage without layers: every entry must be >= 1")
        if sum(user_split) != num_layers:
            raise LayoutError(f"pp_layer_split {user_split} sums to {sum(user_split)}, the model has {num_layers} layers")
        counts = list(user_split)
    else:
        counts = _balanced_counts(num_layers, pp, layer_weight, first_extra, last_extra)
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


def _balanced_counts(num_layers: int, pp: int, w: float, first: float, last: float) -> list[int]:
    # minimise the heaviest stage: try every cap on the first and last stages' layer counts and
    # spread the rest evenly over the middle stages (pp <= 128 and layers <= a few hundred: cheap)
    if pp == 1:
        return [num_layers]
    best: tuple[float, list[int]] | None = None
    for n_first in range(1, num_layers - pp + 2):
        for n_last in range(1, num_layers - n_first - (pp - 2) + 1):
            rest = num_layers - n_first - n_last
            if pp == 2 and rest:
                continue
            middle = [hi - lo for lo, hi in split_evenly(rest, pp - 2)] if pp > 2 else []
            if any(m < 1 for m in middle):
                continue
            counts = [n_first, *middle, n_last]
            loads = [c * w for c in counts]
            loads[0] += first
            loads[-1] += last
            key = (max(loads), [-c for c in counts])  # ties: more layers early
            if best is None or key < (best[0], [-c for c in best[1]]):
                best = (max(loads), counts)
    return best[1]
