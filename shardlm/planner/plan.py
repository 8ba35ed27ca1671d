"""Enumerate every (TP, PP, EP, DP) layout for a GPU count, predict each, reject with reasons,
recommend one; render as a table, JSON-ready dict, or a PNG of TPOT vs throughput. (Past 400 lines:
the enumeration, the constraints and the SLO search share the Workload and LayoutResult types and
read as one procedure.)

Workload: requests of input_len prompt tokens and output_len generated tokens (by default half
and half of --max-model-len). KV capacity is counted for whole sequences of input+output tokens;
decode runs at the mean context input + output/2. Throughput is output tokens/s in steady state and
pays for each request's prefill on the busiest stage: dp * B * out / (B * prefill + out * TPOT(B)).
The operating batch B is the most sequences the KV cache holds (capped by max_num_seqs), lowered
until the TPOT / TTFT SLOs hold. The recommendation is the layout with the highest throughput
among those that fit and meet the SLOs (within 3%, the lower batch-1 TPOT wins).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..common.defaults import MAX_NUM_SEQS
from ..common.layout import ParallelLayout
from . import PlanError
from .cost import CostModel, Efficiency, StageShard, stage_shards
from .hardware import Cluster
from .models import ModelSpec
from .profile import Profile

TIE = 0.03  # throughputs within 3% count as equal; then latency decides


@dataclass(frozen=True)
class Workload:
    """What the deployment must serve."""

    max_model_len: int = 8192
    """Longest sequence (prompt + output) the server accepts."""
    input_len: int = 0
    """Prompt tokens per request (0: half of max_model_len)."""
    output_len: int = 0
    """Generated tokens per request (0: the rest of max_model_len)."""
    max_num_seqs: int = MAX_NUM_SEQS
    """Most sequences one replica batches (the engine's cap)."""
    slo_tpot_ms: float | None = None
    """Time-per-output-token target, ms."""
    slo_ttft_ms: float | None = None
    """Time-to-first-token target, ms."""
    kv_bytes: int = 2
    """Bytes per KV element (2 bf16, 1 fp8)."""

    def resolved(self) -> "Workload":
        if self.max_model_len < 2:
            raise PlanError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        inp = self.input_len or self.max_model_len // 2
        out = self.output_len or max(1, self.max_model_len - inp)
        if inp + out > self.max_model_len:
            raise PlanError(f"--input-len {inp} + --output-len {out} exceed --max-model-len {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise PlanError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        return Workload(self.max_model_len, inp, out, self.max_num_seqs, self.slo_tpot_ms, self.slo_ttft_ms,
                        self.kv_bytes)

    @property
    def seq_len(self) -> int:
        return self.input_len + self.output_len

    @property
    def mean_context(self) -> float:
        return self.input_len + self.output_len / 2


@dataclass
class LayoutResult:
    """Predictions for one layout (None where the layout was rejected before they could be made)."""

    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline stages."""
    ep: int
    """Expert-parallel degree (1, or tp*dp for MoE models)."""
    dp: int
    """Data-parallel replicas."""
    quantization: str | None = None
    """the weights' format: None (bf16) or 'fp8' (ModelSpec.quantization)"""
    ok: bool = False
    """Fits, meets the constraints and the SLOs."""
    reasons: list[str] = field(default_factory=list)
    """Why it was rejected."""
    weights_gb: float | None = None
    """Weights on the fullest GPU, GB (1e9)."""
    kv_kib_per_token: float | None = None
    """KV bytes per token on the fullest GPU, KiB."""
    kv_room_gb: float | None = None
    """Memory left for KV on the tightest GPU, GB."""
    max_seqs: int | None = None
    """Concurrent sequences of seq_len tokens, all replicas."""
    ttft_ms_b1: float | None = None
    """TTFT of one request alone, ms."""
    ttft_ms_full: float | None = None
    """TTFT with the operating batch decoding alongside (chunked prefill), ms."""
    tpot_ms_b1: float | None = None
    """TPOT at batch 1, ms."""
    tpot_ms_full: float | None = None
    """TPOT at the most sequences the KV cache holds, ms."""
    batch: int | None = None
    """Operating batch per replica (max_seqs/dp, lowered to meet the SLO)."""
    tpot_ms: float | None = None
    """TPOT at the operating batch, ms."""
    throughput_tok_s: float | None = None
    """Output tokens/s of all replicas at the operating batch."""
    comm_share: float | None = None
    """Share of a decode step spent in collectives and stage transfers at the operating batch."""
    bubble_share: float | None = None
    """Pipeline bubble at the operating batch: (p-m)/p, the stages' idle share (cost.pipeline_bubble)."""
    micro_batches: int | None = None
    """Micro-batches the engine keeps in flight through the pipeline: ceil(batch / ceil(batch / p)), <= p."""
    curve: list[list[float]] = field(default_factory=list)
    """[batch, TPOT ms, tokens/s] points for the plot."""

    @property
    def name(self) -> str:
        return f"tp={self.tp} pp={self.pp} ep={self.ep} dp={self.dp}" + (" fp8" if self.quantization == "fp8" else "")

    @property
    def fits(self) -> bool:
        return self.max_seqs is not None and self.max_seqs > 0


@dataclass
class Plan:
    """Every layout's prediction and the recommendation."""

    model: ModelSpec
    """The model planned for."""
    cluster: Cluster
    """The GPUs and links."""
    workload: Workload
    """The resolved workload."""
    results: list[LayoutResult]
    """One per layout, in enumeration order."""
    recommended: LayoutResult | None
    """The chosen layout, or None if none meets the SLOs."""
    reason: str
    """One sentence on why."""
    assumptions: dict[str, Any]
    """Efficiency factors, overheads and the source of hardware numbers."""
    notes: list[str] = field(default_factory=list)
    """Remarks about the inputs."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


DEGREES = ("tp", "pp", "dp", "ep")


def check_degrees(degrees: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a list of parallelism degrees (a subset of DEGREES)."""
    bad = [d for d in degrees if d not in DEGREES]
    if bad or isinstance(degrees, str):
        raise PlanError(f"supported degrees must be a list drawn from {', '.join(DEGREES)}, got {degrees!r}")
    return tuple(degrees)


def enumerate_layouts(model: ModelSpec, n_gpus: int, degrees: tuple[str, ...] = DEGREES) -> list[ParallelLayout]:
    """Every tp*pp*dp == n_gpus; MoE models also get ep = tp*dp (experts over a stage's ranks). Degrees not
    in `degrees` stay 1."""
    out = []
    for tp in divisors(n_gpus):
        for pp in divisors(n_gpus // tp):
            dp = n_gpus // (tp * pp)
            if any(v > 1 and d not in degrees for d, v in (("tp", tp), ("pp", pp), ("dp", dp))):
                continue
            out.append(ParallelLayout(tp=tp, pp=pp, dp=dp))
            if model.is_moe and tp * dp > 1 and "ep" in degrees:
                out.append(ParallelLayout(tp=tp, pp=pp, dp=dp, ep=tp * dp))
    return out


def constraint_reasons(model: ModelSpec, lay: ParallelLayout) -> list[str]:
    r = []
    if lay.tp > model.n_heads:
        r.append(f"heads: tp={lay.tp} > {model.n_heads} attention heads (each rank needs one)")
    if lay.pp > model.n_layers:
        r.append(f"layers: pp={lay.pp} > {model.n_layers} layers")
    if lay.ep > 1 and lay.ep > model.n_experts:
        r.append(f"experts: ep={lay.ep} > {model.n_experts} experts (each EP rank needs one)")
    return r


def _fit(cm: CostModel, lay: ParallelLayout, shards: list[StageShard], wl: Workload) -> tuple[int, float]:
    """(sequences per replica the tightest stage holds, its KV room in bytes)."""
    seqs, room_min = None, math.inf
    for sh in shards:
        room = cm.kv_room(lay, sh, wl.max_num_seqs)
        room_min = min(room_min, room)
        n = max(0, int(room // (cm.kv_per_token(sh) * wl.seq_len))) if room > 0 else 0
        seqs = n if seqs is None else min(seqs, n)
    return min(seqs or 0, wl.max_num_seqs), room_min


class _Evaluator:
    """Decode / prefill times of one layout, cached by batch."""

    def __init__(self, cm: CostModel, lay: ParallelLayout, shards: list[StageShard], wl: Workload):
        self.cm, self.lay, self.shards, self.wl = cm, lay, shards, wl
        self._cache: dict[int, tuple[float, float, float, int]] = {}
        # prefills of many requests pipeline: they cost the slowest stage each; a served request's first token
        # also waits on the server (the probe's serving_overhead_us, where measured)
        ttft_s, self.prefill_cost_s = cm.prefill_step(lay, shards, wl.input_len)
        self.ttft_s = ttft_s + cm.serving_overhead_s

    def decode(self, batch: int) -> tuple[float, float, float, int]:
        """(TPOT s, comm share, bubble share, micro-batches) at `batch` sequences per replica."""
        if batch not in self._cache:
            self._cache[batch] = self.cm.decode_step(self.lay, self.shards, batch, self.wl.mean_context)
        return self._cache[batch]

    def throughput(self, batch: int) -> float:
        out = self.wl.output_len
        tpot = self.decode(batch)[0]
        return self.lay.dp * batch * out / (batch * self.prefill_cost_s + out * tpot)

    def ttft_at(self, batch: int) -> float:
        chunks = math.ceil(self.wl.input_len / self.cm.eff.chunk_tokens)
        return self.ttft_s + (chunks * self.decode(batch)[0] if batch > 1 else 0.0)


def evaluate(cm: CostModel, lay: ParallelLayout, wl: Workload) -> LayoutResult:
    res = LayoutResult(lay.tp, lay.pp, lay.ep, lay.dp)
    res.reasons = constraint_reasons(cm.model, lay)
    if res.reasons:
        return res
    shards = stage_shards(cm.model, lay)
    res.quantization = cm.model.quantization
    res.weights_gb = max(sh.weight_bytes for sh in shards) / 1e9
    res.kv_kib_per_token = max(cm.kv_per_token(sh) for sh in shards) / 1024
    seqs, room = _fit(cm, lay, shards, wl)
    res.kv_room_gb = room / 1e9
    res.max_seqs = seqs * lay.dp
    if seqs < 1:
        need = max(cm.kv_per_token(sh) for sh in shards) * wl.seq_len / 1e9
        res.reasons.append(f"does not fit: {res.weights_gb:.1f} GB weights + runtime leave {room / 1e9:.1f} GB "
                           f"per GPU, one {wl.seq_len}-token sequence needs {need:.2f} GB of KV")
        return res
    ev = _Evaluator(cm, lay, shards, wl)
    res.ttft_ms_b1 = ev.ttft_s * 1e3
    res.tpot_ms_b1 = ev.decode(1)[0] * 1e3
    res.tpot_ms_full = ev.decode(seqs)[0] * 1e3
    res.ttft_ms_full = ev.ttft_at(seqs) * 1e3

    def meets(batch: int) -> bool:
        ok_tpot = wl.slo_tpot_ms is None or ev.decode(batch)[0] * 1e3 <= wl.slo_tpot_ms
        ok_ttft = wl.slo_ttft_ms is None or ev.ttft_at(batch) * 1e3 <= wl.slo_ttft_ms
        return ok_tpot and ok_ttft

    if wl.slo_tpot_ms is not None and res.tpot_ms_b1 > wl.slo_tpot_ms:
        res.reasons.append(f"misses the SLO: TPOT {res.tpot_ms_b1:.1f} ms at batch 1 > {wl.slo_tpot_ms:g} ms")
    if wl.slo_ttft_ms is not None and res.ttft_ms_b1 > wl.slo_ttft_ms:
        res.reasons.append(f"misses the SLO: TTFT {res.ttft_ms_b1:.0f} ms at batch 1 > {wl.slo_ttft_ms:g} ms")
    batch = seqs
    if not res.reasons and not meets(seqs):
        lo, hi = 1, seqs  # largest batch that meets the SLOs (TPOT grows with the batch)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if meets(mid) else (lo, mid - 1)
        batch = lo
    tpot, comm, bubble, m = ev.decode(batch)
    res.batch, res.tpot_ms, res.micro_batches = batch, tpot * 1e3, m
    res.throughput_tok_s = ev.throughput(batch)
    res.comm_share, res.bubble_share = comm, bubble
    points = sorted({2**i for i in range(int(math.log2(seqs)) + 1)} | {seqs, batch})
    res.curve = [[bb, ev.decode(bb)[0] * 1e3, ev.throughput(bb)] for bb in points]
    res.ok = not res.reasons
    return res


_FABRIC = {"nvlink": "NVLink", "pcie": "PCIe", "pcie-cross-socket": "PCIe"}


def _placement(cluster: Cluster, lay: ParallelLayout) -> list[str]:
    """Where the layout's groups sit, as clauses ("its TP groups stay inside one socket", ...)."""
    parts = []
    if lay.tp > 1:
        spans = [cluster.span(g) for g in lay.tp_groups()]
        nodes = max(sp.nodes for sp in spans)
        if nodes > 1:
            parts.append(f"its TP groups span {nodes} nodes over {cluster.network.name}")
        elif any(sp.cross_socket for sp in spans):
            parts.append("its TP groups cross the socket boundary")
        elif cluster.cross_socket is not None:
            parts.append("its TP groups stay inside one socket")
        else:
            parts.append(f"its TP groups stay on the {_FABRIC[cluster.interconnect]} links of one node")
    if lay.pp > 1:
        hops = sum(cluster.span([lay.rank(0, s, 0), lay.rank(0, s + 1, 0)]).nodes > 1 for s in range(lay.pp - 1))
        parts.append(f"only {hops} pipeline boundar{'y crosses' if hops == 1 else 'ies cross'} the network" if hops
                     else "its pipeline stays inside a node")
    if lay.ep > 1:
        parts.append(f"each expert lives on one of {lay.ep} GPUs instead of being sliced")
    if lay.tp == lay.pp == lay.ep == 1:
        parts.append("every GPU serves a whole replica with no communication" if lay.dp > 1
                     else "one GPU holds the whole model, with no communication")
    return parts


def _why(plan_results: list[LayoutResult], rec: LayoutResult, cluster: Cluster, wl: Workload) -> str:
    others = sorted((r for r in plan_results if r.ok and r is not rec), key=lambda r: -r.throughput_tok_s)
    slo = [f"{v:g} ms {k}" for k, v in (("TPOT", wl.slo_tpot_ms), ("TTFT", wl.slo_ttft_ms)) if v is not None]
    lay = ParallelLayout(tp=rec.tp, pp=rec.pp, dp=rec.dp, ep=rec.ep)
    head = (f"{rec.name}: the highest predicted throughput ({rec.throughput_tok_s:,.0f} tok/s with "
            f"{rec.batch} sequences per replica at {rec.tpot_ms:.1f} ms TPOT"
            + (f", within the {' and '.join(slo)} SLO" if slo else "") + ")")
    causes = _placement(cluster, lay)
    if others:
        ru = others[0]
        if rec.throughput_tok_s >= (1 + TIE) * ru.throughput_tok_s:
            head += f", {rec.throughput_tok_s / ru.throughput_tok_s:.2f}x the runner-up {ru.name}"
        else:  # a tie on throughput, decided by latency
            best = "the highest" if rec.throughput_tok_s >= ru.throughput_tok_s else f"within {TIE:.0%} of the best"
            head = head.replace("the highest predicted throughput", f"{best} predicted throughput")
            head += f", level with {ru.name}"
            causes.append(f"it is faster alone than {ru.name} ({rec.tpot_ms_b1:.1f} vs {ru.tpot_ms_b1:.1f} ms "
                          "TPOT at batch 1)")
        # Sequences decoding at once, all replicas: what the throughput follows. With both batches at the KV
        # cache's capacity (no SLO cut them) that is the seqs column; an SLO lowers a batch below seqs/dp, and
        # then the clause names batch x dp, the quantity it compares, so it cannot contradict the column.
        live, ru_live = rec.batch * rec.dp, ru.batch * ru.dp
        if live >= 1.2 * ru_live:
            if (live, ru_live) == (rec.max_seqs, ru.max_seqs):
                causes.append(f"it runs {live / ru_live:.1f}x as many sequences at once (seqs {live} vs {ru_live})")
            else:
                causes.append(f"within the SLO it runs {live / ru_live:.1f}x as many sequences at once "
                              f"(batch x dp: {rec.batch} x {rec.dp} vs {ru.batch} x {ru.dp}, of seqs {rec.max_seqs} "
                              f"vs {ru.max_seqs})")
        if (ru.comm_share or 0) - (rec.comm_share or 0) >= 0.05:
            causes.append(f"communication takes {rec.comm_share:.0%} of a step, not {ru.comm_share:.0%}")
        if (ru.bubble_share or 0) - (rec.bubble_share or 0) >= 0.05:
            causes.append(f"its pipeline bubble is {rec.bubble_share:.0%}, not {ru.bubble_share:.0%}")
    text = causes[0] if len(causes) == 1 else ", ".join(causes[:-1]) + " and " + causes[-1]
    return f"{head}, because {text}."


def model_layers_note(cm: CostModel, tps: set[int]) -> str | None:
    """Whether the profile's timed model layers (profile.py, model_layers) apply to these TP sizes (a dense
    model with a measured host floor; where none apply, how to time them)."""
    if not cm.host_calibrated or cm.model.is_moe:
        return None
    ml = cm.profile.model_layers
    # without them a layer's small kernels are costed as the probe's tiny layer runs them: shorter than a wide
    # model's (Llama-3-8B's decode steps came out 2-22% short on 4 x H100; docs/PERFORMANCE.md, session 7)
    advice = "`shardlm probe --model` with this model (random:<preset> or its config.json) times them"
    if ml is None:
        return f"this model's own layers not timed: its layers take the tiny model's floor, which may predict short; {advice}"
    if not cm.model_layers_apply:
        return (f"the profile timed the layers of {ml.model}, of another layer shape or dtype: its layers take the "
                f"tiny model's floor, which may predict short; {advice}")
    timed = sorted(t for t in tps if t in ml.decode)
    others = sorted(t for t in tps if t not in ml.decode)
    text = f"layers of this shape timed by the probe ({ml.model})"
    text += f", used at tp={','.join(map(str, timed))}" if timed else ""
    replayed = sorted(t for t in timed if t in (ml.graphs or {}))
    if replayed and cm.profile.cuda_graphs is not False:
        batches = sorted(set().union(*(ml.graphs[t] for t in replayed)))
        fp8 = ", bf16 and FP8 weights" if any(t in (ml.graphs_fp8 or {}) for t in replayed) else ""
        text += (f" (decode graphs replayed at batch {', '.join(map(str, batches))}{fp8}: a graph layer's "
                 f"correction taken at its batch)")
    return text + (f"; tp={','.join(map(str, others))} not timed: the tiny model's floor" if others else "")


def _host_notes(cm: CostModel, layouts: list[ParallelLayout], cluster: Cluster) -> list[str]:
    prof = cm.profile
    notes = []
    if cm.host_calibrated:
        graphs = {True: ", decode as CUDA graphs", False: ", eager (no CUDA graphs)"}.get(prof.cuda_graphs, "")
        per_tp = "; ".join(f"tp={t}: {prof.step_overhead.at(t):.0f} us per step"
                           + (f" ({prof.prefill_overhead.at(t):.0f} prefilling)" if prof.prefill_overhead else "")
                           + f" + {prof.layer_floor.at(t):.0f} us per layer"
                           + (f" ({cm.layer_floor_s(t, eager=True) * 1e6:.0f} eager)" if prof.eager_layer_floor else "")
                           for t in sorted({lay.tp for lay in layouts}))
        notes.append(f"host time measured{graphs}: {per_tp} (a layer costs the larger of that floor and its "
                     "GPU work + collectives)")
        timed = model_layers_note(cm, {lay.tp for lay in layouts})
        if timed:
            notes.append(timed)
        if prof.serving_overhead_us is not None:
            notes.append(f"TTFT holds {prof.serving_overhead_us / 1e3:.1f} ms of the server's own (HTTP, streaming: "
                         "the profile's serving_overhead_us)")
    else:
        e = cm.eff
        notes.append(f"no measured host time: assumes graph-captured decode ({e.layer_floor_us:g} us floor per "
                     f"layer, {e.step_overhead_us:g} us per step); an eager engine is host-bound, a profile "
                     "from `shardlm probe` with step_overhead_us/layer_floor_us measures it")
    topo = prof.topology if prof is not None else None
    expect = {"nvlink": ("nvlink",), "pcie": ("pcie", "pcie-cross-socket"), "cpu": ("pcie-cross-socket",)}
    if topo in expect and cluster.interconnect not in expect[topo]:
        notes.append(f"the profile measured a {topo!r} link between GPUs but --interconnect is "
                     f"{cluster.interconnect!r}; links not measured by the profile use --interconnect")
    return notes


def candidate_layouts(model: ModelSpec, n_gpus: int, degrees: tuple[str, ...] = DEGREES,
                      fewer_gpus: bool = False) -> list[ParallelLayout]:
    """Layouts on exactly n_gpus GPUs, or (fewer_gpus) on any 1..n_gpus of them."""
    counts = range(1, n_gpus + 1) if fewer_gpus else [n_gpus]
    return [lay for g in counts for lay in enumerate_layouts(model, g, degrees)]


def make_plan(model: ModelSpec, cluster: Cluster, workload: Workload | None = None,
              profile: Profile | None = None, eff: Efficiency | None = None,
              degrees: tuple[str, ...] = DEGREES, fewer_gpus: bool = False, allow_fp8: bool = False) -> Plan:
    """Predict every layout of `model` on `cluster`; raise PlanError if none fits at all.

    degrees: the parallelism degrees layouts may use (others stay 1). fewer_gpus: also consider layouts
    that leave some of the cluster's GPUs idle (useful when the degrees cannot fill them). allow_fp8: every
    layout also with FP8 weights (ModelSpec.quantization), rows of their own that may be recommended."""
    wl = (workload or Workload()).resolved()
    degrees = check_degrees(degrees)
    cm = CostModel(model, cluster, profile, eff, kv_bytes=wl.kv_bytes, max_num_seqs=wl.max_num_seqs)
    layouts = candidate_layouts(model, cluster.n_gpus, degrees, fewer_gpus)
    if not layouts:
        raise PlanError(f"no layout of {cluster.n_gpus} GPUs uses only {', '.join(degrees) or 'no'} parallelism; "
                        "allow more degrees or change the GPU count")
    results = [evaluate(cm, lay, wl) for lay in layouts]
    if allow_fp8 and model.quantization != "fp8":
        cm_fp8 = CostModel(replace(model, quantization="fp8"), cluster, profile, eff, kv_bytes=wl.kv_bytes,
                           max_num_seqs=wl.max_num_seqs)
        results += [evaluate(cm_fp8, lay, wl) for lay in layouts]
    notes = list(model.notes)
    if model.max_position and wl.max_model_len > model.max_position:
        notes.append(f"max-model-len {wl.max_model_len} exceeds the model's {model.max_position} positions")
    if profile is not None:
        notes.append(f"hardware numbers measured on {profile.device} ({profile.source})")
        if cluster.gpu.name.split("-")[0] not in profile.device.lower().replace(" ", ""):
            notes.append(f"the profile's device {profile.device!r} does not look like --gpu {cluster.gpu.name}; "
                         "its measured numbers are used")
        measured = max(profile.allreduce.curves) if profile.allreduce is not None else 1
        if measured == 1 and max(lay.tp for lay in layouts) > 1:
            notes.append("the profile measured no all-reduce (one GPU); TP collectives use the --interconnect preset")
        elif measured < min(cluster.gpus_per_node, max(lay.tp for lay in layouts)):
            notes.append(f"all-reduce measured up to {measured} GPUs; larger groups are extrapolated")
    notes += _host_notes(cm, layouts, cluster)
    if (model.quantization == "fp8" or allow_fp8) and not (profile and profile.gemv_fp8):
        notes.append("fp8: without a probe of the FP8 kernels (gemv_fp8) their decode GEMMs are assumed to read at "
                     "the bf16 rate; the engine's averaged ~2.9 TB/s on an H200 (docs/PERFORMANCE.md), so FP8 TPOT "
                     "predictions are optimistic")
    if not any(r.fits for r in results):
        raise PlanError(_no_fit_message(cm, wl, degrees))
    ok = [r for r in results if r.ok]
    rec = None
    if ok:
        top = max(r.throughput_tok_s for r in ok)
        close = [r for r in ok if r.throughput_tok_s >= (1 - TIE) * top]
        rec = min(close, key=lambda r: (r.tpot_ms_b1, r.pp, r.tp))
        reason = _why(results, rec, cluster, wl)
    else:
        fastest = min((r for r in results if r.fits), key=lambda r: r.tpot_ms_b1)
        reason = (f"No layout meets the SLO; the fastest that fits is {fastest.name} at "
                  f"{fastest.tpot_ms_b1:.1f} ms TPOT and {fastest.ttft_ms_b1:.0f} ms TTFT at batch 1.")
    e = cm.eff
    assumptions = {
        "hardware_source": "profile" if profile else "datasheet",
        "hbm_gbps_effective": cm.hbm_bps / 1e9, "tflops_effective": cm.flops_ps / 1e12,
        "memory_gib": cm.memory_bytes / 2**30, **asdict(e),
        "pipeline": "synchronous steps: (m+p-1) beats of the slowest stage + (p-1) transfers",
        "host_model": ("measured: per stage step_overhead[tp] + sum of max(layer_floor[tp], layer GPU + comm)"
                       if cm.host_calibrated else "graph-captured: step_overhead_us + max(roofline, layer_floor_us)"),
        "degrees": list(degrees),
    }
    if cm.host_calibrated:
        tps = sorted({lay.tp for lay in layouts})
        assumptions["step_overhead_us_by_tp"] = {str(t): profile.step_overhead.at(t) for t in tps}
        assumptions["layer_floor_us_by_tp"] = {str(t): profile.layer_floor.at(t) for t in tps}
        assumptions["prefill_overhead_us_by_tp"] = {str(t): cm.prefill_overhead_s(t) * 1e6 for t in tps}
        assumptions["eager_layer_floor_us_by_tp"] = {str(t): cm.layer_floor_s(t, eager=True) * 1e6 for t in tps}
    assumptions["decode_cuda_graphs"] = cm.graph_decode and not model.is_moe
    assumptions["attention"] = ("paged kernels: K/V read once through the block tables" if cm.paged_kernels
                                else "gather + SDPA: each step copies every context out of the cache first")
    return Plan(model, cluster, wl, results, rec, reason, assumptions, notes)


def _no_fit_message(cm: CostModel, wl: Workload, degrees: tuple[str, ...] = DEGREES) -> str:
    m, c = cm.model, cm.cluster
    found: list[tuple[int, ParallelLayout]] = []
    for g in range(c.n_gpus + 1, 4097):
        fits = []
        for lay in enumerate_layouts(m, g, degrees):
            if not constraint_reasons(m, lay):
                seqs, _ = _fit(cm, lay, stage_shards(m, lay), wl)
                if seqs >= 1:
                    fits.append((seqs, lay))
        if fits and (not found or g & (g - 1) == 0):
            found.append((g, max(fits, key=lambda x: (x[0], -x[1].pp))[1]))  # most KV room, fewest stages
            if g & (g - 1) == 0:
                break
    only = "" if set(degrees) == set(DEGREES) else f" using only {'/'.join(degrees)} parallelism"
    head = (f"{m.name} ({m.total_params() * m.bytes_per_param / 1e9:.1f} GB of weights) does not fit on "
            f"{c.n_gpus} x {c.gpu.name} in any layout{only} with room for one {wl.seq_len}-token sequence")
    if not found:
        return head + ", nor on up to 4096 GPUs"
    msg = f"{head}; the smallest GPU count that fits is {found[0][0]} ({found[0][1]})"
    if len(found) > 1:
        msg += f", the smallest power of two {found[1][0]} ({found[1][1]})"
    return msg
