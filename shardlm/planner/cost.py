"""Cost model: memory per GPU, KV capacity, decode step and prefill time of one layout.

(One module past 400 lines on purpose: every term of the step is here, each beside the formula below
that it implements and the calibration that corrects it, so a prediction can be audited in one read.)

The formulas (h hidden, L layers, n_h / n_kv heads, d head dim, f ffn, V vocab, b bytes, t = TP,
p = PP, e = EP; see shared/seed/CORRECTIONS.md):
  weights/GPU   per rank: its q heads and the KV heads they need (a KV head is replicated when
                t > n_kv or a GQA group is split), 1/t of the MLP and of the vocab rows (embedding on
                the first stage, LM head on the last), whole norms. Uneven splits use the busiest rank.
  KV/token/GPU  2 * (L/p) * kv_heads_on_rank * d * b_kv  (stops shrinking once t > n_kv)
  decode step   max(HBM bytes / BW, FLOPs / peak) + collectives; 2 all-reduces of B*h*b per layer,
                one for the vocab-parallel embedding, an all-gather of the logits; each costs
                alpha + 2(n-1)/n * bytes / busbw.
  pipeline      the engine keeps p micro-batches of batch/p sequences in flight: a token every p
                beats of the slowest stage plus p-1 activation transfers; below p sequences the
                stages idle for the missing micro-batches (bubble (p-m)/p).
  MoE           distinct experts read per layer E(1-(1-k/E)^B); all-to-all dispatch + combine
                2*k*h*b*(e-1)/e bytes per layer per token.
  prefill       2*N*s + 2*L*n_h*d*s^2 FLOPs (causal), logits only for the sampled token.
  elementwise   the kernels between the GEMMs (two RMSNorms, two residual adds, rotary on q and k,
                the K/V cache write and the per-sequence gather of the context, SwiGLU) move
                per token and layer ~28h + 30q + 26kv + 10f bytes on a rank (q, kv, f: the rank's
                query, KV and MLP widths; bf16) plus twice the context's KV bytes (gathered, then
                read); this time adds to the layer's roofline (separate kernels). It matters for
                prefill (4096 tokens of an 8B model: ~18 ms next to ~85 ms of GEMMs) and long contexts.
  host          with a profile's measured host floor (profile.py): per stage, step_overhead[tp]
                (prefill_overhead[tp] for a prefill, if measured) + sum over layers of
                max(layer_floor[tp], layer GPU time + its collectives) + the non-layer GPU work
                (eager_layer_floor[tp] for a step run eagerly, if measured); without it,
                graph-captured decode: the roofline plus Efficiency's layer floor per layer (the small
                kernels between the GEMMs run one after another) and its step overhead.
  CUDA graphs   unless the profile says the engine ran eagerly, a decode step runs at its graph's
                padded shape (graph_shapes.py): batch up to the next captured size, every sequence's
                context gathered to the next captured length (the mean context stands for the longest);
                with the attention kernels a step with prompt chunks runs at its mixed-step graph's
                token count (`mixed_rows`: GEMMs, elementwise kernels and all-reduces over the padded
                rows, a logits row per sequence slot; attention and K/V over the real tokens).
  model layers  where the profile timed this model's own layers (`shardlm probe --model`), each layer
                adds (graphs) or is floored at (eager) what the timed layer held beyond these formulas,
                and the step overhead is the timed step's at zero layers less its predicted non-layer
                work (`CostModel.calibrated`); where the probe replayed the decode graphs at several
                batches (graph_us; graph_us_fp8 for FP8 weights), a graph layer's addition is found at
                each and taken at the step's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..common.defaults import MAX_NUM_SEQS, MAX_SEQ_LEN_TO_CAPTURE
from ..common.graph_shapes import (
    GRAPH_TOKENS,
    MIXED_MAX_CONTEXT,
    graph_pairs,
    mixed_size,
    padded_shape,
)
from ..common.layout import ParallelLayout, shard_heads, split_evenly
from .hardware import Cluster
from .models import ModelSpec
from .profile import Profile, around, curves_at

ACT_BYTES = 2  # activations travel in bf16


@dataclass(frozen=True)
class Efficiency:
    """Realistic fractions of the ceilings, and runtime overheads (all stated, all tunable)."""

    hbm: float = 0.85
    """Share of datasheet HBM bandwidth that decode GEMVs and attention reach (measured copy: ~0.9)."""
    flops: float = 0.65
    """Share of datasheet dense bf16 peak that a model's GEMMs reach (measured 8192^3 GEMM: ~0.79)."""
    hbm_measured: float = 0.95
    """Share of a profile's measured copy bandwidth that decode kernels reach."""
    flops_measured: float = 0.85
    """Share of a profile's measured large-GEMM rate that a model's smaller GEMMs reach."""
    layer_floor_us: float = 15.0
    """A decode layer's small kernels (norms, rotary + cache write, SiLU, split-K reductions, attention at a
    short context: ~2 us each in a CUDA graph, ~20 us a layer measured on an H200) run one after another
    with its GEMMs: with graphs this latency adds to the layer's roofline; eagerly it is the least a layer
    takes."""
    step_overhead_us: float = 500.0
    """Host work per engine step: scheduling, sampling, graph launch, returning tokens."""
    cuda_context_gb: float = 1.0
    """CUDA context and cuBLAS workspace per GPU, GB."""
    graph_pool_kv_factor: float = 1.5
    graph_pool_base_gb: float = 1.1
    """The decode graphs' memory pool: factor x the K/V bytes one layer gathers for GRAPH_TOKENS tokens on a
    rank, plus base GB (fit to the pools of Llama-3-8B at TP 1 and 2 on H100: 2.69 and 1.89 GB; the
    gather and its copies for attention, the logits of the largest batch)."""
    nccl_gb_per_group: float = 0.5
    """NCCL buffers per communicator (TP, PP, EP) a rank belongs to, GB."""
    fragmentation: float = 0.05
    """Share of device memory left unused (allocator fragmentation, safety margin)."""
    chunk_tokens: int = 2048
    """Most tokens one step processes (chunked prefill); sizes the activation workspace."""


def distinct_experts(n_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts hit when `tokens` tokens each pick top_k of n_experts: E(1-(1-k/E)^B)."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def ring_allreduce_us(alpha_us: float, busbw_gbps: float, n: int, nbytes: float) -> float:
    """alpha + 2(n-1)/n * bytes / busbw, in microseconds (GB/s = 1e3 bytes/us)."""
    return alpha_us + 2 * (n - 1) / n * nbytes / (busbw_gbps * 1e3)


def a2a_bytes_per_token(top_k: int, hidden: int, nbytes: int, ep: int) -> float:
    """Bytes one token sends across ranks per MoE layer, dispatch + combine: 2*k*h*b*(e-1)/e."""
    return 2 * top_k * hidden * nbytes * (ep - 1) / ep


def pipeline_bubble(p: int, m: int) -> float:
    """Idle share of each stage of a p-stage pipeline that keeps m micro-batches in flight, each sent on as
    soon as its tokens are back (the engine's decode): (p-m)/p, none once m >= p. (A pipeline that pushes
    m micro-batches through and then waits for all of them would idle (p-1)/(m+p-1).)"""
    return max(0, p - m) / p


def matmul_params(model: ModelSpec) -> int:
    """N: parameters used in matmuls per token (active experts, LM head; not the embedding lookup)."""
    return (model.n_layers * model.attn_params() + sum(model.mlp_params(i, True) for i in range(model.n_layers))
            + model.vocab * model.hidden)


def prefill_flops(model: ModelSpec, s: int, logits_tokens: int | None = None) -> float:
    """2*N*s + 2*L*n_h*d*s^2; logits_tokens < s counts the LM head only for those tokens."""
    head = model.vocab * model.hidden
    lt = s if logits_tokens is None else logits_tokens
    attn = 2 * model.n_layers * model.n_heads * model.head_dim * s * s  # causal: half of QK^T and PV
    return 2 * (matmul_params(model) - head) * s + 2 * head * lt + attn


def decode_flops_per_token(model: ModelSpec, context: int) -> float:
    """2*N + 4*L*n_h*d*c at context c."""
    return 2 * matmul_params(model) + 4 * model.n_layers * model.n_heads * model.head_dim * context


@dataclass(frozen=True)
class StageShard:
    """What the busiest rank of one pipeline stage holds (parameter counts; per-component maxima)."""

    stage: int
    """Pipeline stage index."""
    n_layers: int
    """Decoder layers in this stage."""
    n_moe: int
    """Of those, MoE layers."""
    q_heads: int
    """Most query heads on one TP rank."""
    kv_heads: int
    """Most KV heads on one TP rank (includes replicated ones)."""
    attn: int
    """Attention parameters per layer on the busiest rank."""
    norms: int
    """Norm parameters per layer (replicated)."""
    mlp: int
    """Dense MLP parameters per layer on the busiest rank."""
    experts_local: int
    """Routed experts a rank holds (all E, sliced 1/t, when ep == 1)."""
    expert: int
    """Parameters of one held expert (a 1/t slice when ep == 1)."""
    shared_router: int
    """Shared-expert slice + router parameters per MoE layer."""
    head_rows: int
    """LM head vocab rows on the busiest rank (last stage), else 0."""
    weight_params: int
    """Total parameters held by the busiest rank of the stage (exact, per-rank max)."""
    weight_bytes: float = 0.0
    """Bytes of weights on the stage's fullest rank (linear layers at model.linear_bytes, the rest at
    bytes_per_param)."""


def stage_shards(model: ModelSpec, layout: ParallelLayout) -> list[StageShard]:
    """Per-stage shard sizes. Heads split as evenly as possible (layout.shard_heads), MLP/vocab likewise."""
    t, h = layout.tp, model.hidden
    heads = [shard_heads(model.n_heads, model.n_kv_heads, t, r) for r in range(t)]
    attn_r = [h * model.head_dim * (2 * s.n_q + 2 * s.n_kv)
              + ((s.n_q + 2 * s.n_kv) * model.head_dim if model.attention_bias else 0) for s in heads]
    mlp_r = [3 * h * (e - s) for s, e in split_evenly(model.ffn, t)]
    vocab_r = [e - s for s, e in split_evenly(model.vocab, t)]
    shared_r = [3 * h * (e - s) + h * model.n_experts for s, e in split_evenly(model.shared_ffn, t)]
    if model.is_moe and layout.ep > 1:
        # EP rank j = d*tp + t (layout.ep_groups order) holds whole experts split_evenly(E, ep)[j]
        exp_count = [e - s for s, e in split_evenly(model.n_experts, layout.ep)]
        expert_of = lambda r, d: (exp_count[d * t + r], model.expert_params())  # noqa: E731
    else:
        ffn_e = [e - s for s, e in split_evenly(model.expert_ffn, t)]
        expert_of = lambda r, d: (model.n_experts, 3 * h * ffn_e[r])  # noqa: E731
    out = []
    for p, (lo, hi) in enumerate(split_evenly(model.n_layers, layout.pp)):
        n, n_moe = hi - lo, model.moe_layers_in(lo, hi)
        first, last = p == 0, p == layout.pp - 1
        # the LM head is its own matrix unless tied and on the embedding's stage (pp == 1) in the same format
        own_head = last and not (model.tied_embeddings and first and not model.fp8_lm_head)
        head_b = 1 if model.fp8_lm_head else model.bytes_per_param
        totals, nbytes = [], []
        for d in range(layout.dp if layout.ep > 1 else 1):
            for r in range(t):
                cnt, size = expert_of(r, d) if model.is_moe else (0, 0)
                linear = n * attn_r[r] + (n - n_moe) * mlp_r[r] + n_moe * (shared_r[r] + cnt * size)
                head = vocab_r[r] * h * int(own_head)
                other = n * model.norm_params() + vocab_r[r] * h * int(first) + (h if last else 0)
                totals.append(linear + head + other)
                nbytes.append(linear * model.linear_bytes + head * head_b + other * model.bytes_per_param)
        cnts = [expert_of(r, d) for d in range(layout.dp if layout.ep > 1 else 1) for r in range(t)]
        out.append(StageShard(
            stage=p, n_layers=n, n_moe=n_moe, q_heads=max(s.n_q for s in heads),
            kv_heads=max(s.n_kv for s in heads), attn=max(attn_r), norms=model.norm_params(),
            mlp=max(mlp_r) if n > n_moe else 0,
            experts_local=max(c for c, _ in cnts) if model.is_moe else 0,
            expert=max(s for _, s in cnts) if model.is_moe else 0,
            shared_router=max(shared_r) if model.is_moe else 0,
            head_rows=max(vocab_r) if last else 0, weight_params=max(totals), weight_bytes=max(nbytes)))
    return out


def weights_per_gpu(model: ModelSpec, tp: int, pp: int = 1, ep: int = 1, dp: int = 1) -> float:
    """Bytes of weights on the fullest GPU of the layout."""
    layout = ParallelLayout(tp=tp, pp=pp, dp=dp, ep=ep)
    return max(s.weight_bytes for s in stage_shards(model, layout))


def kv_bytes_per_token_per_gpu(model: ModelSpec, tp: int, pp: int = 1, kv_bytes: int = 2) -> float:
    """KV bytes one token costs on the fullest GPU: 2 * layers_on_stage * kv_heads_on_rank * d * b."""
    layers = max(hi - lo for lo, hi in split_evenly(model.n_layers, pp))
    kv = max(shard_heads(model.n_heads, model.n_kv_heads, tp, r).n_kv for r in range(tp))
    return 2 * layers * kv * model.head_dim * kv_bytes


@dataclass(frozen=True)
class StepCost:
    """Time of one stage's forward pass on its busiest rank."""

    compute_s: float
    """GPU kernel time: the roofline max(HBM bytes / BW, FLOPs / peak) (datasheet mode: at least the per-layer
    floor; host mode: summed layer by layer)."""
    comm_s: float
    """Collectives on the critical path (TP all-reduces, logits gather, EP all-to-all)."""
    hbm_bytes: float
    """Bytes of weights and KV cache read (and KV written)."""
    flops: float
    """Floating-point operations."""
    host_s: float = 0.0
    """Host mode only: time the GPU waits for the host, i.e. the step overhead plus, per layer, how much
    the measured layer floor exceeds the layer's GPU + collective time. 0 in datasheet mode."""
    act_bytes: float = 0.0
    """Bytes the elementwise kernels move (their time is in compute_s)."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.host_s


@dataclass(frozen=True)
class _Work:
    """One kind of layer (or the stage's non-layer part): count and per-instance cost."""

    count: int
    """How many such layers the stage has (1 for the non-layer part)."""
    nbytes: float
    """HBM bytes per instance."""
    flops: float
    """FLOPs per instance."""
    comm_s: float
    """Collective seconds per instance."""
    act_bytes: float = 0.0
    """Bytes the elementwise kernels between the GEMMs move per instance (module docstring); their
    time adds to the roofline of the GEMMs and weight reads."""
    kv_bytes: float = 0.0
    """Of nbytes, the KV cache's (the rest are weights)."""
    gemms: int = 1
    """Weight GEMMs per instance (a decode step reads each at the rate of its size, see decode_read_s)."""
    fp8_rows: float = 0.0
    """Where the instance's GEMMs are FP8 (the model's quantization): the rows each multiplies, which picks
    the profile's measured FP8 rate (decode_read_s); 0: weights in the model dtype."""
    rows: float = 0.0
    """The rows each of the instance's GEMMs multiplies: in a decode step a row per sequence, in a dense
    layer's prefill its tokens (priced by the measured curves where they reach that many rows); 0: prefill
    at the roofline."""
    gemm_flops: float = 0.0
    """Of flops, the weight GEMMs' (the rest: attention's), which a measured curve at the step's rows
    already times (decode_read_s)."""
    attention_s: float = 0.0
    """A decode step's attention as the profile timed it for this model (its KV read and math then come
    from here, not from kv_bytes and flops); 0: not timed."""
    timed_gemm_s: float = 0.0
    """The instance's four weight GEMMs at its rows as the profile timed them for this model (they then
    replace the weight reads and gemm_flops); 0: not timed."""


def elementwise_bytes(hidden: int, q_dims: int, kv_dims: int, ffn_dims: float, paged_kernels: bool = True) -> float:
    """Bytes one token's elementwise kernels move in one layer on one rank (bf16 activations).
    - With the engine's kernels (paged_kernels, the Triton path): 2 residual adds fused into their RMSNorms
      (read x and the residual, write the normed row and the sum: 8h each), SiLU x up in one kernel (read
      gate and up, write: 6 per MLP element), rotary of q and k in place (4 bytes per element) with the K/V
      cache write (k from registers, v read and written: 6 per KV element); attention reads q and writes its
      output where they are.
    - On the torch path: 2 RMSNorms (normalise in one kernel, then scale: ~8h each), 2 residual adds (6h
      each), SwiGLU (silu, then times up: 10 per MLP element), rotary on q and k (mul, roll, mul, add: 18
      bytes per element), the K/V cache write (8 per KV element), folding q for attention and unfolding its
      output (12 per q element)."""
    if paged_kernels:
        return 16 * hidden + 4 * q_dims + 10 * kv_dims + 6 * ffn_dims
    return 28 * hidden + 30 * q_dims + 26 * kv_dims + 10 * ffn_dims


FP8_GEMM_TIME = 0.6
"""an FP8 GEMM's FLOPs cost this much of bf16's: the tensor cores' double rate, less the activations'
quantisation and the FP8 kernels' efficiency (H200, session 14: FP8 prefill of Llama-3-8B took 0.63-0.67 of
bf16's time, attention included)"""


class CostModel:
    """Times and memory for layouts of one model on one cluster."""

    def __init__(self, model: ModelSpec, cluster: Cluster, profile: Profile | None = None,
                 eff: Efficiency | None = None, kv_bytes: int = 2, cuda_graphs: bool | None = None,
                 attention_backend: str | None = None, async_scheduling: bool = True,
                 max_num_seqs: int = MAX_NUM_SEQS):
        self.model, self.cluster, self.profile = model, cluster, profile
        self.max_num_seqs = max_num_seqs  # the engine's: its graphs' batch sizes and sequence slots
        self._cuda_graphs = cuda_graphs  # how the predicted engine runs decode, if not as the profile's did
        self._attention_backend = attention_backend  # likewise its attention path ('triton' or 'torch')
        # whether the engine overlaps a step's host work with the previous step (one stage; its default)
        self.async_scheduling = async_scheduling
        self.eff = eff or Efficiency()
        self.kv_bytes = kv_bytes
        self._calibrations: dict[tuple[int, bool, bool, str], tuple[float, float, float]] = {}
        self._graph_corrections: dict[tuple[int, str, bool], dict[int, float]] = {}
        if profile is not None:
            self.hbm_bps = profile.hbm_gbps * 1e9 * self.eff.hbm_measured
            self.flops_ps = profile.gemm_tflops * 1e12 * self.eff.flops_measured
            self.memory_bytes = (profile.memory_gib or cluster.gpu.memory_gib) * 2**30
        else:
            self.hbm_bps = cluster.gpu.hbm_gbps * 1e9 * self.eff.hbm
            self.flops_ps = cluster.gpu.bf16_tflops * 1e12 * self.eff.flops
            self.memory_bytes = cluster.gpu.memory_bytes

    @property
    def host_calibrated(self) -> bool:
        """Step and layer times come from the profile's measured host floor (see profile.py)."""
        return self.profile is not None and self.profile.host_calibrated

    def step_overhead_s(self, tp: int) -> float:
        """Host time per engine step outside the layers: measured (host mode) or Efficiency's."""
        if self.host_calibrated:
            return self.profile.step_overhead.at(tp) * 1e-6
        return self.eff.step_overhead_us * 1e-6

    def prefill_overhead_s(self, tp: int) -> float:
        """Host time of a prefill step outside the layers: measured if the profile has it, else the step's."""
        if self.host_calibrated and self.profile.prefill_overhead is not None:
            return self.profile.prefill_overhead.at(tp) * 1e-6
        return self.step_overhead_s(tp)

    def layer_floor_s(self, tp: int, eager: bool = False) -> float:
        """Least time one layer takes: the measured floor (host mode; of a step run eagerly if the profile
        has it) or Efficiency's graph floor."""
        if self.host_calibrated:
            table = self.profile.eager_layer_floor if eager and self.profile.eager_layer_floor else self.profile.layer_floor
            return table.at(tp) * 1e-6
        return self.eff.layer_floor_us * 1e-6

    @property
    def graph_decode(self) -> bool:
        """Decode steps replay CUDA graphs: as the constructor was told, else unless the profile's engine ran
        eagerly (graphs are the engine's default on GPU)."""
        if self._cuda_graphs is not None:
            return self._cuda_graphs
        return self.profile is None or self.profile.cuda_graphs is not False

    @property
    def paged_kernels(self) -> bool:
        """Attention reads K/V through the block tables (the engine's Triton kernels, its default on GPU):
        as the constructor was told, else as the profile's engine ran (a profile that does not say was
        measured before the kernels: the torch path's gather), else True."""
        if self._attention_backend is not None:
            return self._attention_backend == "triton"
        if self.profile is not None:
            return self.profile.attention_backend == "triton"
        return True

    def mixed_rows(self, tokens: float, context: float = 0.0) -> tuple[float, float | None]:
        """(rows its GEMMs, elementwise kernels and all-reduces run over, logits rows or None: the sampled
        ones) of a step with prompt chunks of `tokens` tokens whose longest sequence holds `context` tokens:
        where the engine replays such steps as CUDA graphs (graphs, the attention kernels, a dense model,
        contexts up to MIXED_MAX_CONTEXT: worker/step_graphs.py) its graph's padded token count and its
        sequence slots, min(size, max_num_seqs), every one of which gets a logits row; else as it is
        (eagerly: past the largest graph, a longer context). (The engine also replays MoE models' mixed steps
        where its grouped expert GEMM allows: the planner prices those eagerly, as it does their decode.)"""
        if self.graph_decode and self.paged_kernels and not self.model.is_moe and context <= MIXED_MAX_CONTEXT:
            size = mixed_size(math.ceil(tokens))
            if size is not None:
                return float(size), float(min(size, self.max_num_seqs))
        return tokens, None

    def decode_shape(self, batch: float, context: float) -> tuple[float, float, bool]:
        """(rows, context positions, replayed as a graph) of a decode step of `batch` sequences at `context`
        tokens each: its graph's padded shape, or as it is when no graph holds it (or the model is MoE: the
        engine captures no graphs for expert dispatch). The attention kernels read only the real context
        of a padded graph; the torch path gathers all of the graph's context positions."""
        if self.graph_decode and not self.model.is_moe:
            n = math.ceil(batch)
            max_ctx = max(math.ceil(context), MAX_SEQ_LEN_TO_CAPTURE) if self.paged_kernels else MAX_SEQ_LEN_TO_CAPTURE
            pairs = graph_pairs(max(n, self.max_num_seqs), max_ctx, self.paged_kernels)
            shape = padded_shape(pairs, n, math.ceil(context))
            if shape is not None:
                return shape[0], context if self.paged_kernels else shape[1], True
        return batch, context, False

    # -- collectives (seconds) -------------------------------------------------------------------

    def allreduce(self, ranks: list[int], nbytes: float, graphed: bool = False, nccl: bool = False) -> float:
        """Seconds of one all-reduce of nbytes per rank; graphed: inside a CUDA graph (the profile's in-graph
        sweep where it has one). Without a profile a group on one node pays its link's peer-memory latency
        (Link.peer_alpha_us, the engine's kernel there) unless nccl: NCCL's collective latency."""
        if len(ranks) <= 1:
            return 0.0
        c = self.cluster
        span = c.span(ranks)
        local, us = span.per_node, 0.0
        table = self.profile.allreduce if self.profile is not None else None
        if graphed and self.profile is not None and self.profile.allreduce_graph is not None:
            table = self.profile.allreduce_graph
        if local > 1:
            if table is not None:
                us += table.time_us(local, nbytes)
            else:
                link = c.node_link(span)
                alpha = (link.collective_alpha_us(local) if nccl or span.nodes > 1  # the peer kernel: one host
                         else link.allreduce_alpha_us(local))
                us += ring_allreduce_us(alpha, link.busbw_gbps, local, nbytes)
        if span.nodes > 1:
            # hierarchical: each GPU carries 1/local of the data over its share of the NICs
            net_bw = c.network.per_gpu_gbps(c.gpus_per_node)
            us += ring_allreduce_us(c.network.alpha_us, net_bw, span.nodes, nbytes / local)
        return us * 1e-6

    def allgather(self, ranks: list[int], total_bytes: float, graphed: bool = False) -> float:
        # a ring all-gather (NCCL's) moves (n-1)/n of the output: the cost of an all-reduce of half the bytes
        return self.allreduce(ranks, total_bytes / 2, graphed, nccl=True)

    def all_to_all(self, ranks: list[int], buffer_bytes: float) -> float:
        """Each rank sends buffer_bytes split evenly over the group (its own chunk stays)."""
        n = len(ranks)
        if n <= 1:
            return 0.0
        c = self.cluster
        span = c.span(ranks)
        link = c.node_link(span)
        if span.nodes == 1 and self.profile is not None and self.profile.all_to_all is not None:
            return self.profile.all_to_all.time_us(n, buffer_bytes) * 1e-6
        local = span.per_node
        intra_us = buffer_bytes * (local - 1) / n / (link.a2a_gbps * 1e3)
        us = link.collective_alpha_us(max(local, 2)) + intra_us
        if span.nodes > 1:
            inter_us = buffer_bytes * (n - local) / n / (c.network.per_gpu_gbps(c.gpus_per_node) * 1e3)
            us = link.collective_alpha_us(max(local, 2)) + c.network.alpha_us + max(intra_us, inter_us)
        return us * 1e-6

    def send_recv(self, src: int, dst: int, nbytes: float) -> float:
        c = self.cluster
        span = c.span([src, dst])
        if span.nodes > 1:
            return (c.network.p2p_alpha_us + nbytes / (c.network.per_gpu_gbps(c.gpus_per_node) * 1e3)) * 1e-6
        if self.profile is not None and self.profile.send_recv is not None:
            return self.profile.send_recv.time_us(nbytes) * 1e-6
        link = c.node_link(span)
        return (link.p2p_alpha_us + nbytes / (link.p2p_gbps * 1e3)) * 1e-6

    # -- one stage, one forward pass -------------------------------------------------------------

    def _work(self, layout: ParallelLayout, sh: StageShard, tokens: float, context: float, prefill: bool,
              prompts: int, graphed: bool = False) -> list[_Work]:
        """The stage's work split into its dense layers, its MoE layers and the non-layer part."""
        m, b, lb = self.model, self.model.bytes_per_param, self.model.linear_bytes
        lin_f = FP8_GEMM_TIME if m.quantization == "fp8" else 1.0
        # a dense layer's GEMMs (prefill MoE experts and the head keep the roofline), elementwise kernels and
        # all-reduces: a step with prompt chunks runs at its graph's padded rows (mixed_rows)
        rows, logits_rows = self.mixed_rows(tokens, context) if prefill else (tokens, None)
        graphed = graphed or logits_rows is not None  # (the all-reduces of a replayed mixed step)
        fp8_rows = rows if m.quantization == "fp8" else 0.0
        attn_s = 0.0 if prefill else self.timed_attention_s(layout.tp, tokens, context)
        gemm_s = self.timed_gemm_s(layout.tp, rows, m.quantization == "fp8")
        d, n_dense = m.head_dim, sh.n_layers - sh.n_moe
        kv_layer = 2 * sh.kv_heads * d * self.kv_bytes  # per token
        if prefill:  # `prompts` prompts of tokens/prompts tokens: KV written once, causal attention
            kv_b, attn_f = tokens * kv_layer, 2 * sh.q_heads * d * tokens * tokens / prompts
            gather = 3 * tokens * kv_layer  # each prompt's context read from the cache, gathered, read
        else:  # every sequence reads its whole context
            kv_b, attn_f = tokens * context * kv_layer, 4 * sh.q_heads * d * tokens * context
            gather = 2 * tokens * context * kv_layer  # written gathered, then read by attention
        paged = self.paged_kernels
        if paged:  # the kernels read K/V once, through the block tables (kv_b): no gather
            gather = 0.0
        q_dims, kv_dims = sh.q_heads * d, sh.kv_heads * d
        ar = act = 0.0
        if layout.tp > 1:
            tp_ranks = layout.tp_groups()[sh.stage]  # dp replica 0; the others are alike
            act = rows * m.hidden * ACT_BYTES
            ar = 2 * self.allreduce(tp_ranks, act, graphed)
        out = []
        if n_dense:
            act_b = rows * elementwise_bytes(m.hidden, q_dims, kv_dims, sh.mlp / (3 * m.hidden), paged) + gather
            gemm_f = lin_f * 2 * rows * (sh.attn + sh.mlp)
            out.append(_Work(n_dense, lb * (sh.attn + sh.mlp) + b * sh.norms + kv_b, gemm_f + attn_f, ar, act_b,
                             kv_b, gemms=4, fp8_rows=fp8_rows, rows=rows, gemm_flops=gemm_f,
                             attention_s=attn_s, timed_gemm_s=gemm_s))  # qkv o gate_up down
        if sh.n_moe:
            ep_tokens = tokens * (layout.dp if layout.ep > 1 and not prefill else 1)
            if layout.ep > 1:  # whole experts on this rank; each is hit with probability 1-(1-k/E)^T
                touched = sh.experts_local * (1 - (1 - m.top_k / m.n_experts) ** ep_tokens)
                expert_tok = ep_tokens * m.top_k * sh.experts_local / m.n_experts
            else:  # a 1/t slice of every expert; only the distinct experts hit are read
                touched = distinct_experts(m.n_experts, m.top_k, tokens)
                expert_tok = tokens * m.top_k
            a2a = 0.0
            if layout.ep > 1:
                # each TP rank dispatches its 1/t share of its replica's tokens, k copies each; with tp > 1
                # the combined slices are summed back by the layer's second all-reduce (counted in ar)
                buf = tokens / layout.tp * m.top_k * m.hidden * ACT_BYTES
                a2a = 2 * self.all_to_all(layout.ep_groups()[sh.stage], buf)
            # SwiGLU runs over every routed row (an expert's width on this rank) and the shared expert
            expert_width, shared_width = sh.expert / (3 * m.hidden), -(-m.shared_ffn // layout.tp)
            act_b = (tokens * elementwise_bytes(m.hidden, q_dims, kv_dims, shared_width, paged)
                     + 10 * expert_tok * expert_width + gather)
            gemm_f = lin_f * (2 * tokens * (sh.attn + sh.shared_router) + 2 * expert_tok * sh.expert)
            out.append(_Work(sh.n_moe, lb * (sh.attn + sh.shared_router + touched * sh.expert) + b * sh.norms + kv_b,
                             gemm_f + attn_f, ar + a2a, act_b, kv_b, gemms=4, fp8_rows=0.0 if prefill else fp8_rows,
                             rows=0.0 if prefill else rows, gemm_flops=gemm_f))  # qkv, o, router, experts
        # prefill samples only each prompt's last token (a mixed graph takes a row per sequence slot)
        logits_tokens = (logits_rows or prompts) if prefill else tokens
        head_comm = 0.0
        if layout.tp > 1:
            if sh.stage == 0:
                head_comm += self.allreduce(layout.tp_groups()[0], act, graphed)  # vocab-parallel embedding
            if sh.head_rows:
                head_comm += self.allgather(layout.tp_groups()[sh.stage], logits_tokens * m.vocab * ACT_BYTES, graphed)
        final_norm = m.hidden if sh.head_rows else 0
        head_f = 2 * logits_tokens * sh.head_rows * m.hidden * (FP8_GEMM_TIME if m.fp8_lm_head else 1.0)
        head_b = (1 if m.fp8_lm_head else b) * sh.head_rows * m.hidden + b * final_norm
        out.append(_Work(1, head_b, head_f, head_comm, fp8_rows=fp8_rows if m.fp8_lm_head and not prefill else 0.0,
                         rows=0.0 if prefill else rows, gemm_flops=head_f))
        return out

    def decode_read_s(self, weight_bytes: float, gemms: int, kv_bytes: float, fp8_rows: float = 0.0,
                      rows: float = 0.0) -> float:
        """Seconds a decode step's skinny GEMMs take over `weight_bytes` in `gemms` kernels of `rows` rows
        (FP8 weights: `fp8_rows`), plus the KV cache read: at the profile's GEMM curve for a GEMM of that
        average size (smaller ones stream slower) measured at the step's rows, interpolated linearly between
        the measured row counts (fewer than the fewest: theirs; more than the most: theirs, and _gemm_s adds
        the math of the rows past them); FP8 weights at the engine's FP8 path's curves (gemv_fp8) where the
        profile has them. Without curves: at the copy rate's share."""
        curves = self.profile.decode_gemm_curves(bool(fp8_rows)) if self.profile is not None else {}
        if not curves or weight_bytes <= 0:
            return (weight_bytes + kv_bytes) / self.hbm_bps
        us = curves_at(curves, max(1.0, fp8_rows or rows), weight_bytes / max(1, gemms))
        return gemms * us * 1e-6 + kv_bytes / self.hbm_bps

    def timed_attention_s(self, tp: int, batch: float, context: float) -> float:
        """One dense layer's decode attention for `batch` sequences of `context` tokens as the profile timed
        it for this model (model_layers' attention_us at tp, the engine's kernels, the KV cache in the
        timed model's dtype; attention_us_fp8 for an FP8 cache); 0 where it has none."""
        ml = self.profile.model_layers if self.model_layers_apply else None
        fp8 = self.kv_bytes == 1
        if ml is None or not self.paged_kernels or (self.kv_bytes != self.model.bytes_per_param and not fp8):
            return 0.0
        us = ml.attention_us(tp, batch, context, fp8)
        return 0.0 if us is None else us * 1e-6

    def timed_gemm_s(self, tp: int, rows: float, fp8: bool) -> float:
        """One dense layer's four weight GEMMs over `rows` rows as the profile timed them for this model
        (model_layers' gemm_us at tp, its own shapes, FP8 or the model dtype); 0 where it has none."""
        ml = self.profile.model_layers if self.model_layers_apply else None
        us = None if ml is None else ml.gemm_us(tp, rows, fp8)
        return 0.0 if us is None else us * 1e-6

    def decode_attention_s(self, layout: ParallelLayout, shards: list[StageShard], batch: float,
                           context: float) -> float:
        """The decode attention of `batch` sequences of `context` tokens over every stage's layers: the
        profile's timed attention where it has it (timed_attention_s), else their KV read at the copy rate;
        what a mixed step (prompt chunks and decodes) adds for its decodes."""
        if batch <= 0:
            return 0.0
        timed = self.timed_attention_s(layout.tp, batch, context)
        if timed:
            return timed * sum(sh.n_layers for sh in shards)
        return batch * context * sum(self.kv_per_token(sh) for sh in shards) / self.hbm_bps

    def measured_rows(self, fp8: bool) -> int:
        """The most rows the profile's GEMM curves for these weights were measured at (0: none)"""
        curves = self.profile.decode_gemm_curves(fp8) if self.profile is not None else {}
        return max(curves, default=0)

    @property
    def model_layers_apply(self) -> bool:
        """The profile timed this model's own layers (a dense model of the same layer shape; its weights or
        KV cache may be FP8: calibrated() then corrects by what the timed model's formulas missed)."""
        ml = self.profile.model_layers if self.host_calibrated else None
        return ml is not None and not self.model.is_moe and ml.shape == self.model.layer_shape

    def _as_timed(self, fp8: bool = False) -> CostModel:
        """This cost model for the model as the probe times it: weights (FP8 with `fp8`, as its FP8 graph
        replays ran them), LM head and KV cache in the model dtype"""
        quantization = self.model.quantization if fp8 else None
        if (self.model.quantization == quantization and not self.model.fp8_lm_head
                and self.kv_bytes == self.model.bytes_per_param):
            return self
        return CostModel(replace(self.model, quantization=quantization, fp8_lm_head=False), self.cluster, self.profile,
                         self.eff, self.model.bytes_per_param, self._cuda_graphs, self._attention_backend,
                         self.async_scheduling, self.max_num_seqs)

    def _pricing(self, w: _Work, prefill: bool) -> str:
        """How _gemm_s prices w's weight GEMMs: "timed" (this model's own, timed_gemm_s), "curves" (the
        measured curves at its rows; a decode step without curves: its reads at the copy rate) or "roofline"
        (a prefill past the curves' rows)."""
        if w.timed_gemm_s:
            return "timed"
        most = self.measured_rows(bool(w.fp8_rows))
        return "roofline" if prefill and (not w.rows or w.rows > most or most <= 1) else "curves"

    @staticmethod
    def _priced_as(w: _Work, pricing: str) -> _Work:
        """w to be priced as `pricing` says (calibrated: the timed shape priced the way the step it corrects is)"""
        if pricing == "timed":
            return w
        return replace(w, timed_gemm_s=0.0) if pricing == "curves" else replace(w, timed_gemm_s=0.0, rows=0.0)

    def calibrated(self, tp: int, prefill: bool, graphed: bool, pricing: str = "curves", batch: float = 1.0
                   ) -> tuple[float, float, float] | None:
        """(per-layer floor, per-layer GPU correction, step overhead), seconds, from the profile's timed layers
        of this model at `tp` (profile.py, model_layers); None where it has none: another shape, a TP size
        not timed, or a decode step run in the other mode (graph vs eager) than the timed one.

        The timed step is predicted at its own shape (batch 1 at the timed context, or the timed prompt):
        c = the measured per-layer time - the layer's predicted GPU work and collectives there, what the
        formulas miss (or, if negative, over-count). A graph-replayed layer adds c to every layer, as it
        does the graph floor. An eager layer takes the measured per-layer time as its floor (host-bound
        small steps) and, where c < 0, corrects its GPU work by c (GPU-bound ones). Either way a layer at
        the timed shape costs the measured time, and a larger step grows by what the formulas add. The
        step: the zero-layer time less the predicted non-layer work (embedding, LM head, collectives),
        at least 0. The probe times the model in its own dtype: for FP8 weights or KV c comes from that
        model's predicted work (`_as_timed`), and an eager floor is lowered by the GPU work FP8 saves. The
        timed shape is priced as the corrected step is (`pricing`, _pricing): a correction found where the
        curves or timed GEMMs price a layer is not one for a step the roofline prices. Where the probe also
        replayed the decode graphs at several batches (model_layers.graph_us; graph_us_fp8, FP8 weights,
        for an FP8 model), a graph-replayed layer's correction is found at each of those batches instead
        (`_graph_missed`) and taken at `batch`, interpolated linearly between them (held past the ends)."""
        ml = self.profile.model_layers if self.model_layers_apply else None
        if ml is None or tp not in ml.decode or (not prefill and graphed != (self.profile.cuda_graphs is not False)):
            return None
        key = (tp, prefill, graphed, pricing)
        if key not in self._calibrations:
            lay = ParallelLayout(tp=tp)
            # (the timed model's predicted work: with FP8 weights or KV the correction stays what the formulas
            # missed beyond the reads, and the reads are this model's own)
            timed = self._as_timed()
            sh = stage_shards(timed.model, lay)[0]
            if prefill:
                line, tokens, context = ml.prefill[tp], ml.prompt_len, 0.0
            else:
                line = ml.decode[tp]
                tokens, context, _ = self.decode_shape(1, ml.decode_context) if graphed else (1, ml.decode_context, False)
            work = timed._work(lay, sh, tokens, context, prefill, 1, graphed)
            layer, rest = self._priced_as(work[0], pricing), work[-1]
            layer_s, rest_s = (timed._gpu_s(w, prefill) + w.comm_s for w in (layer, rest))
            per_layer = line.per_layer_us * 1e-6
            missed = per_layer - layer_s
            # FP8 weights or KV: an eager floor may have been the timed layer's GPU work; it loses the work this
            # model's layer does not do
            saved = 0.0
            if timed is not self:
                own = self._priced_as(self._work(lay, stage_shards(self.model, lay)[0], tokens, context, prefill, 1,
                                                 graphed)[0], pricing)
                saved = max(0.0, layer_s - self._gpu_s(own, prefill) - own.comm_s)
            floor, gpu_fix = (missed, 0.0) if graphed else (per_layer - saved, min(0.0, missed))
            self._calibrations[key] = (floor, gpu_fix, max(0.0, line.zero_layers_us * 1e-6 - rest_s))
        floor, gpu_fix, host = self._calibrations[key]
        fp8 = self.model.quantization == "fp8" and tp in (ml.graphs_fp8 or {})
        if graphed and not prefill and (fp8 or tp in (ml.graphs or {})):
            missed = self._graph_missed(tp, pricing, fp8)
            lo, hi, frac = around(missed, batch)
            floor = missed[lo] + (missed[hi] - missed[lo]) * frac
        return floor, gpu_fix, host

    def _graph_missed(self, tp: int, pricing: str, fp8: bool = False) -> dict[int, float]:
        """Per batch the probe replayed the decode graphs at (model_layers.graph_us): what a layer of the graph
        took (the line through the two depths) less its predicted GPU work and collectives at that batch with
        one key of context, as the replays ran, for the model as timed (`calibrated`), seconds. With `fp8`,
        from the graphs of the model with FP8 weights (graph_us_fp8) against this model's FP8 layer (its
        KV and LM head as the probe ran them: the correction is a layer's, and one key of KV is nothing). The
        replays' attention over one key stays in the correction (priced at 0 here: the timed attention curves
        start at 128 keys, and taking theirs would take 128 keys' time off every layer)."""
        key = (tp, pricing, fp8)
        if key not in self._graph_corrections:
            timed, lay, ml = self._as_timed(fp8), ParallelLayout(tp=tp), self.profile.model_layers
            sh = stage_shards(timed.model, lay)[0]
            missed = {}
            for batch, line in (ml.graphs_fp8 if fp8 else ml.graphs)[tp].items():
                layer = replace(self._priced_as(timed._work(lay, sh, batch, 1.0, False, 1, True)[0], pricing),
                                attention_s=0.0)
                missed[batch] = line.per_layer_us * 1e-6 - timed._gpu_s(layer, False) - layer.comm_s
            self._graph_corrections[key] = missed
        return self._graph_corrections[key]

    @property
    def serving_overhead_s(self) -> float:
        """What a served request's first token waits beyond the engine (HTTP, streaming): the profile's
        serving_overhead_us (`probe --serving`), else 0"""
        return (self.profile.serving_overhead_us or 0.0) * 1e-6 if self.profile is not None else 0.0

    def step_overhead_per_seq_s(self, tp: int) -> float:
        """Host time each further sequence adds to a decode step (measured, else 0)."""
        if self.host_calibrated and self.profile.step_overhead_per_seq is not None:
            return self.profile.step_overhead_per_seq.at(tp) * 1e-6
        return 0.0

    def _gemm_s(self, w: _Work, prefill: bool) -> float:
        """Time of the weight and KV reads and the math: a prefill's wide GEMMs overlap the two (roofline
        max); a decode step's skinny ones (a row per sequence) do not: read time + FLOPs / GEMM rate matched
        the GEMM kernel time of Llama-3-8B at TP 1 and 2, batch 1, 8 and 32 on H100 within a few % (the max
        came out up to 11% short at batch 32; docs/PERFORMANCE.md, session 6), with a one-row curve. Where
        the profile has GEMM curves at more rows (decode_read_s) they time the math of the rows they cover
        (at 128 rows on an H200 read + math over-predicted by 24%, session 15), and where it timed this
        model's attention (timed_attention_s) that replaces the KV read and attention's FLOPs. A prefill
        of no more tokens than the curves' rows takes their time too (its GEMMs are as measured: at 128 rows
        the FP8 path's quantisation and torch._scaled_mm make a 128-token FP8 prefill about as long as
        bf16's, where the FP8 FLOP rate priced it 30% shorter; session 16), its attention math and KV write
        beside them; longer ones the roofline. Where the probe timed this model's own GEMMs at the rows
        (timed_gemm_s) they take the place of the curves, in decode steps and such prefills."""
        pricing = self._pricing(w, prefill)
        if pricing == "roofline":
            return max(w.nbytes / self.hbm_bps, w.flops / self.flops_ps)
        if pricing == "timed":  # this model's own GEMMs as timed: the rest as below
            kv = 0.0 if w.attention_s else w.kv_bytes
            return (w.timed_gemm_s + kv / self.hbm_bps + w.attention_s
                    + (0.0 if w.attention_s else w.flops - w.gemm_flops) / self.flops_ps)
        if prefill:  # (within the curves' rows)
            return (self.decode_read_s(w.nbytes - w.kv_bytes, w.gemms, w.kv_bytes, w.fp8_rows, w.rows)
                    + (w.flops - w.gemm_flops) / self.flops_ps)
        rows, most = max(1.0, w.rows), self.measured_rows(bool(w.fp8_rows))
        timed = min(1.0, most / rows) if most > 1 else 0.0  # (a one-row curve times no math worth the name)
        untimed_flops = (1 - timed) * w.gemm_flops + (0.0 if w.attention_s else w.flops - w.gemm_flops)
        kv = 0.0 if w.attention_s else w.kv_bytes
        return (self.decode_read_s(w.nbytes - w.kv_bytes, w.gemms, kv, w.fp8_rows, w.rows) + w.attention_s
                + untimed_flops / self.flops_ps)

    def _gpu_s(self, w: _Work, prefill: bool) -> float:
        """Host mode's GPU time of one instance: its GEMMs and reads, then its elementwise kernels."""
        return self._gemm_s(w, prefill) + w.act_bytes / self.hbm_bps

    def stage_pass(self, layout: ParallelLayout, sh: StageShard, tokens: float, context: float,
                   prefill: bool, prompts: int = 1) -> StepCost:
        """Forward pass of one stage over `tokens` tokens: decode (one token per sequence, each with
        `context` tokens of KV) or prefill (`prompts` prompts of tokens/prompts tokens each).

        Datasheet mode (no measured host floor): roofline of the whole stage plus layers x the graph floor
        when the step replays a graph (at least layers x the floor when eager), plus collectives. Host mode: step overhead + per layer max(floor, GPU + collectives) +
        the non-layer part's GPU + collectives (profile.py explains why); for a decode step replayed as a
        CUDA graph, with a profile measured that way, per layer GPU + collectives + the graph floor less
        the floor's own two all-reduces: the small kernels run one after another, none hides. Where the
        profile timed this model's own layers, their floors and overhead replace the tiny model's
        (`calibrated`). A decode step's host time per further sequence (the probe's, from a host-bound tiny
        model) adds in full, or with async scheduling and one stage only what exceeds the step's GPU time and
        collectives: the engine does it while the GPU runs the step before."""
        graphed, seqs = False, tokens
        if not prefill:
            tokens, context, graphed = self.decode_shape(tokens, context)
        work = self._work(layout, sh, tokens, context, prefill, prompts, graphed)
        # a group runs at its slowest GPU's pace (the profile's straggler check; ranks are GPUs on one host)
        slow = self.profile.slowdown(layout.tp_groups()[sh.stage]) if self.profile is not None else 1.0
        nbytes = sum(w.count * w.nbytes for w in work)
        act = sum(w.count * w.act_bytes for w in work)
        flops = sum(w.count * w.flops for w in work)
        comm = sum(w.count * w.comm_s for w in work)
        if not self.host_calibrated:
            floor = sh.n_layers * self.eff.layer_floor_us * 1e-6
            roofline = max(nbytes / self.hbm_bps, flops / self.flops_ps)
            # a replayed graph runs each layer's small kernels one after another, after its GEMMs: their
            # latency adds; run eagerly, the host's launches set a floor the GPU work hides in
            compute = (roofline + floor if graphed else max(roofline, floor)) + act / self.hbm_bps
            return StepCost(compute * slow, comm, nbytes, flops, act_bytes=act)
        # a profile of an eager engine measured its decode floor eagerly; one with graphs, the graph floor
        graph_floor = graphed and self.profile.cuda_graphs is not False
        calibrated = self.calibrated(layout.tp, prefill, graphed, self._pricing(work[0], prefill), tokens)
        if calibrated is not None:  # this model's own layers were timed
            floor, gpu_fix, host = calibrated
        else:
            floor = self.layer_floor_s(layout.tp, eager=prefill or (not graphed and self.profile.cuda_graphs is not False))
            if graph_floor:  # the tiny layer's floor includes its two (latency-bound) all-reduces
                floor = max(0.0, floor - 2 * self.allreduce(layout.tp_groups()[sh.stage], 0, graphed=True))
            gpu_fix, host = 0.0, self.prefill_overhead_s(layout.tp) if prefill else self.step_overhead_s(layout.tp)
        compute = 0.0
        for i, w in enumerate(work):
            layer = i < len(work) - 1  # decoder layers; the last entry is the non-layer part
            gpu = max(0.0, self._gpu_s(w, prefill) + (gpu_fix if layer else 0.0))
            compute += w.count * gpu
            if layer:
                if graph_floor:
                    compute += w.count * floor
                else:
                    host += w.count * max(0.0, floor - gpu - w.comm_s)
        if not prefill:  # the host's work for each further sequence (the probe: on a host-bound tiny model)
            per_seq = self.step_overhead_per_seq_s(layout.tp) * max(0.0, seqs - 1)
            if self.async_scheduling and layout.pp == 1:  # done while the GPU runs the step before: what it
                per_seq = max(0.0, per_seq - compute * slow - comm)  # takes past that step's time
            host += per_seq
        return StepCost(compute * slow, comm, nbytes, flops, host, act)

    def transfer(self, layout: ParallelLayout, tokens: float) -> float:
        """Slowest activation hand-off between consecutive stages (tokens x h in bf16)."""
        if layout.pp == 1:
            return 0.0
        nbytes = tokens * self.model.hidden * ACT_BYTES
        return max(self.send_recv(layout.rank(0, s, 0), layout.rank(0, s + 1, 0), nbytes)
                   for s in range(layout.pp - 1))

    # -- whole engine steps ----------------------------------------------------------------------

    def decode_step(self, layout: ParallelLayout, shards: list[StageShard], batch: float,
                    context: float) -> tuple[float, float, float, int]:
        """One decode step of `batch` sequences per replica at `context` tokens of KV each:
        (seconds, comm share, bubble share, micro-batches).

        As the engine runs it: with p stages it keeps up to p micro-batches of disjoint sequences in
        flight, ceil(batch / p) sequences each (so m = ceil(batch / ceil(batch / p)) <= p of them), each
        sent on as soon as its tokens are back. A sequence's next token comes a period later: its
        micro-batch passes all p stages and the p-1 transfers between them, while the other
        micro-batches fill the stages behind it. With m < p micro-batches each stage idles (p - m) / p
        of the period: the bubble. Datasheet mode adds the step overhead once per period; host mode has
        it inside every stage's beat. With one stage and async scheduling (the engine's default) datasheet
        mode's step overhead runs while the previous step computes: the period is the longer of the two
        (host mode's measured overhead is what the measured engine showed, overlapped or not)."""
        if batch <= 0:
            raise ValueError(f"a decode step needs at least one sequence, got batch={batch}")
        p = layout.pp
        extra = 0.0 if self.host_calibrated else self.step_overhead_s(layout.tp)
        seqs = batch if p == 1 or batch <= 1 else math.ceil(batch / p)  # per micro-batch
        m = max(1, math.ceil(batch / seqs))
        slow = max((self.stage_pass(layout, sh, seqs, context, prefill=False) for sh in shards),
                   key=lambda x: x.total_s)
        xfer = self.transfer(layout, seqs)
        if p == 1 and self.async_scheduling:
            period = max(slow.total_s, extra)
        else:
            period = p * slow.total_s + (p - 1) * xfer + extra
        return period, (p * slow.comm_s + (p - 1) * xfer) / period, pipeline_bubble(p, m), m

    def prefill_step(self, layout: ParallelLayout, shards: list[StageShard], tokens: int,
                     prompts: int = 1, context: float = 0.0) -> tuple[float, float]:
        """Prefill of `prompts` prompts arriving together, `tokens` tokens in all (the step's longest sequence
        `context` tokens long, where longer than a prompt: decodes or chunks beside it): (TTFT seconds: until
        the last of them has its first token, slowest stage's seconds: what a pipeline of many prefills
        costs). One stage: one step. With p stages the engine cuts them, like decode, into m <= p
        micro-batches of ceil(prompts / p) prompts: the first passes every stage in turn with the
        transfers, each further one comes a beat of the slowest stage later. (The engine's token budget
        per micro-batch, max_num_batched_tokens / p, is taken not to cut the prompts further.)"""
        p = layout.pp
        per = math.ceil(prompts / p) if p > 1 else prompts
        m, part = math.ceil(prompts / per), tokens * per / prompts
        passes = [self.stage_pass(layout, sh, part, context, prefill=True, prompts=per) for sh in shards]
        extra = 0.0 if self.host_calibrated else self.step_overhead_s(layout.tp)
        beat = max(x.total_s for x in passes)
        ttft = sum(x.total_s for x in passes) + (m - 1) * beat + (p - 1) * self.transfer(layout, part) + extra
        return ttft, beat

    # -- memory ----------------------------------------------------------------------------------

    def reserved_bytes(self, layout: ParallelLayout, sh: StageShard, max_num_seqs: int) -> float:
        """Runtime memory besides weights and KV: context, NCCL buffers, activation workspace, margin."""
        m, e = self.model, self.eff
        groups = sum(1 for g in (layout.tp, layout.pp, layout.ep) if g > 1)
        # per token of a prefill chunk: residual/norm/attention buffers, q/k/v, gate+up of the MLP
        # (for MoE: the k expert rows each token becomes, plus the shared experts)
        mlp_width = 2 * sh.mlp // (3 * m.hidden)
        if m.is_moe:
            mlp_width = max(mlp_width, 2 * (m.top_k * m.expert_ffn + m.shared_ffn) // layout.tp)
        width = 4 * m.hidden + (sh.q_heads + 2 * sh.kv_heads) * m.head_dim + mlp_width
        workspace = e.chunk_tokens * width * ACT_BYTES + max_num_seqs * -(-m.vocab // layout.tp) * 4
        graph_pool = 0.0
        if self.graph_decode and not m.is_moe:  # (none for MoE models)
            kv_layer = 2 * sh.kv_heads * m.head_dim * self.kv_bytes
            # the torch path's graphs hold its gather; the kernels' hold no K/V copy
            gathered = 0.0 if self.paged_kernels else e.graph_pool_kv_factor * GRAPH_TOKENS * kv_layer
            graph_pool = gathered + e.graph_pool_base_gb * 1e9
        return ((e.cuda_context_gb + e.nccl_gb_per_group * groups) * 1e9 + workspace + graph_pool
                + e.fragmentation * self.memory_bytes)

    def kv_room(self, layout: ParallelLayout, sh: StageShard, max_num_seqs: int) -> float:
        """Bytes left for the KV cache on the stage's fullest GPU (may be negative)."""
        return self.memory_bytes - sh.weight_bytes - self.reserved_bytes(layout, sh, max_num_seqs)

    def kv_per_token(self, sh: StageShard) -> float:
        return 2 * sh.n_layers * sh.kv_heads * self.model.head_dim * self.kv_bytes
