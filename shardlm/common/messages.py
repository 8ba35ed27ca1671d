"""The one contract between the driver (shardlm.engine) and the workers (shardlm.worker): typed messages.

A step goes down as a `StepPlan` (one `SeqPlan` per scheduled sequence, each with its `SamplingSpec`)
and comes back from the output rank as a `StepResult` (one `SampledToken` per sampled sequence).
Everything else the driver asks a worker is a `Command` subclass; each names its reply event and
the worker runs it through one table (worker/main.py: HANDLERS). wire.py frames them as a JSON header
plus raw arrays: nothing received is unpickled.

Adding a command: a dataclass here (a `Command` with its `name`), a handler in the worker's table,
and the driver calls `Executor.call(TheCommand(...))`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from .model_source import ModelSource


class Message:
    """A plain-data message: `name` says what it is; its fields travel as the JSON header."""

    name: ClassVar[str]

    def encode(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}, {}

    @classmethod
    def decode(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
        return cls(**header)


# ---- the step -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingSpec:
    """What the output rank needs to pick one sequence's next token (from engine.SamplingParams)."""

    temperature: float = 0.0
    """0: greedy (argmax)"""
    top_p: float = 1.0
    """nucleus mass kept, in (0, 1]"""
    top_k: int = 0
    """most likely tokens kept; 0 or -1: all"""
    seed: int | None = None
    """seed of this sequence's own generator (None: the worker's global one)"""
    logprobs: int | None = None
    """top log-probabilities returned with the token (None: only the chosen token's)"""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """(engine/sampling_params.py says what each penalty does)"""
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, added to its logit) pairs"""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """the sampler keeps this sequence's token counts (SeqPlan.history seeds them)"""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusts_logits(self) -> bool:
        """the logits change before the pick (penalties, bias); min_p acts on the probabilities"""
        return self.penalized or bool(self.logit_bias)

    def to_wire(self) -> list[Any]:
        head = [self.temperature, self.top_p, self.top_k, self.seed, self.logprobs]
        if not self.adjusts_logits and self.min_p == 0:  # the common case stays five values on the wire
            return head
        return head + [self.presence_penalty, self.frequency_penalty, self.repetition_penalty, self.min_p,
                       [list(p) for p in self.logit_bias]]

    @classmethod
    def from_wire(cls, v: list[Any]) -> SamplingSpec:
        if len(v) > 5:
            return cls(*v[:9], tuple((int(t), float(b)) for t, b in v[9]))
        return cls(*v)


GREEDY = SamplingSpec()

PREV_TOKEN = -1
"""A decode's token that the driver does not know yet: the one the workers sampled for this sequence in the
previous step (async scheduling sends step N+1 before step N's tokens come back; workers fill it in on the
device)."""


@dataclass
class SeqPlan:
    """One sequence's part of a step: run `tokens` at positions start .. start + len(tokens) - 1."""

    seq_id: int
    """the engine's sequence id (the sampler keeps a seeded generator per id)"""
    tokens: list[int]
    """new tokens: a whole prompt or a chunk of it (prefill), or the last sampled token (decode; PREV_TOKEN
    when that token is still on its way back from the previous step)"""
    start: int
    """tokens already in the KV cache: the position of tokens[0]"""
    blocks: list[int]
    """the sequence's KV block table from entry blocks_from on (block ids, in order)"""
    sample: bool
    """sample the next token after tokens[-1] (False for a prompt chunk that is not the last)"""
    sampling: SamplingSpec = GREEDY
    """how to sample it"""
    blocks_from: int = 0
    """the workers keep each sequence's table from step to step: the driver sends only the entries from
    this one on (those added since it last sent the table), 0 for a whole table"""
    ban: list[int] | None = None
    """token ids this step may not sample (min_tokens: EOS and the stop ids until enough tokens came)"""
    history: tuple[int, list[int]] | None = None
    """(prompt length, prompt + completion token ids so far) of a penalized sequence, on the step that ends
    its (re)prefill: the sampler seeds its token counts from it and keeps them on the device after"""
    mask_row: int | None = None
    """structured outputs: the row of StepPlan.masks holding the tokens this pick may take"""
    prompt_logprobs: tuple[int, list[int]] | None = None
    """(k, targets): the log-probability of targets[j], the prompt's token at position start + j + 1, under
    the logits at position start + j, with the k most likely tokens there (SamplingParams.prompt_logprobs)"""

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once this step has run."""
        return self.start + len(self.tokens)

    def to_wire(self) -> list[Any]:
        out = [self.seq_id, self.tokens, self.start, self.blocks, self.sample, self.sampling.to_wire(),
               self.blocks_from]
        if (self.ban is not None or self.history is not None or self.mask_row is not None
                or self.prompt_logprobs is not None):
            out += [self.ban, None if self.history is None else list(self.history), self.mask_row,
                    None if self.prompt_logprobs is None else list(self.prompt_logprobs)]
        return out

    @classmethod
    def from_wire(cls, v: list[Any]) -> SeqPlan:
        seq_id, tokens, start, blocks, sample, sampling, blocks_from, *extra = v
        ban, history, mask_row, plp = extra or (None, None, None, None)
        return cls(seq_id, tokens, start, blocks, sample, SamplingSpec.from_wire(sampling), blocks_from, ban,
                   None if history is None else (history[0], history[1]), mask_row,
                   None if plp is None else (plp[0], plp[1]))


@dataclass
class StepPlan(Message):
    """One step on every rank: the scheduled sequences, in the order their tokens are laid out."""

    name: ClassVar[str] = "step"
    seqs: list[SeqPlan]
    finished: list[int] = field(default_factory=list)
    """sequence ids finished since the last plan (the sampler drops their generators)"""
    return_logits: bool = False
    """send the sampled rows' full logits back (tests and debugging)"""
    masks: np.ndarray | None = None
    """[rows, ceil(vocab / 32)] int32 (structured outputs): bit t of a row set where token t may be picked;
    the rows SeqPlan.mask_row names"""
    masks_follow: bool = False
    """the masks come after the plan, in a StepMasks to the output rank: a constrained sequence's next mask
    needs the token of the step in flight, and the driver sends it once it has that token, while this
    step's forward runs"""
    release: list[int] = field(default_factory=list)
    """preempted sequences since the last plan: the sampler drops their penalty counts (not their seeded
    generators); SeqPlan.history seeds the counts again when they resume"""

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token and samples (what a CUDA graph can replay)."""
        return all(len(s.tokens) == 1 and s.sample for s in self.seqs)

    def encode(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return ({"seqs": [s.to_wire() for s in self.seqs], "finished": self.finished,
                 "return_logits": self.return_logits, "masks_follow": self.masks_follow, "release": self.release},
                {} if self.masks is None else {"masks": self.masks})

    @classmethod
    def decode(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> StepPlan:
        return cls([SeqPlan.from_wire(s) for s in header["seqs"]], header["finished"], header["return_logits"],
                   arrays.get("masks"), header["masks_follow"], header["release"])


@dataclass
class StepMasks(Message):
    """The structured-output masks of the plan sent last (StepPlan.masks_follow), to the output rank alone;
    it samples that step once they arrive."""

    name: ClassVar[str] = "masks"
    masks: np.ndarray
    """as StepPlan.masks"""
    unban: list[int] = field(default_factory=list)
    """sequences whose min_tokens ban (SeqPlan.ban) is lifted: their grammar allows nothing else"""

    def encode(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"unban": self.unban}, {"masks": self.masks}

    @classmethod
    def decode(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> StepMasks:
        return cls(arrays["masks"], header["unban"])


@dataclass
class SampledToken:
    """The token the output rank picked for one sequence, with its log-probabilities."""

    seq_id: int
    token: int
    logprob: float
    """log-probability of `token` under the model's own distribution (before temperature etc.)"""
    rank: int
    """1 for the most likely token"""
    top: list[tuple[int, float]] | None = None
    """the `logprobs` most likely (token, logprob), most likely first; None when not asked"""
    error: str | None = None
    """set when this sequence's sampling failed (its own parameters' fault): the engine fails its request
    alone, and token/logprob/rank mean nothing"""


@dataclass
class PromptLogprobs:
    """One sequence's prompt log-probabilities from one step (SeqPlan.prompt_logprobs), a row per target."""

    seq_id: int
    start: int
    """the row j holds the prompt token at position start + j + 1"""
    logprob: np.ndarray
    """[rows] float32: each target token's log-probability"""
    rank: np.ndarray
    """[rows] int64: its rank among the vocabulary (1: the most likely)"""
    top_ids: np.ndarray
    """[rows, k] int64: the k most likely tokens, most likely first"""
    top_logprobs: np.ndarray
    """[rows, k] float32: their log-probabilities"""


@dataclass
class StepResult(Message):
    """The output rank's answer to one StepPlan: a token per sampled sequence, in plan order."""

    name: ClassVar[str] = "step"
    tokens: list[SampledToken]
    exec_s: float = 0.0
    """seconds the output rank spent in the step (forward + sampling), from its launch or, if it was launched
    while the step before ran (async scheduling), from that step's end"""
    logits: np.ndarray | None = None
    """[sampled rows, vocab] float32, when the plan asked for them"""
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    """for the plan's sequences that asked (SeqPlan.prompt_logprobs), sampled or not"""

    def encode(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        toks = [[t.seq_id, t.token, t.logprob, t.rank, t.top, t.error] for t in self.tokens]
        arrays = {} if self.logits is None else {"logits": self.logits}
        for i, p in enumerate(self.prompt_logprobs):
            arrays.update({f"plp{i}.logprob": p.logprob, f"plp{i}.rank": p.rank, f"plp{i}.top_ids": p.top_ids,
                           f"plp{i}.top_logprobs": p.top_logprobs})
        return {"tokens": toks, "exec_s": self.exec_s,
                "prompt_logprobs": [[p.seq_id, p.start] for p in self.prompt_logprobs]}, arrays

    @classmethod
    def decode(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> StepResult:
        toks = [SampledToken(sid, tok, lp, rank, None if top is None else [tuple(t) for t in top], error)
                for sid, tok, lp, rank, top, error in header["tokens"]]
        plps = [PromptLogprobs(sid, start, *(arrays[f"plp{i}.{k}"] for k in ("logprob", "rank", "top_ids", "top_logprobs")))
                for i, (sid, start) in enumerate(header["prompt_logprobs"])]
        return cls(toks, header["exec_s"], arrays.get("logits"), plps)


# ---- start-up -----------------------------------------------------------------------------------
@dataclass
class WorkerOptions:
    """What every worker is told at start, besides the layout and the model."""

    dtype: str
    """torch dtype name of weights, activations and KV cache"""
    device: str
    """'cuda' or 'cpu'"""
    max_model_len: int
    """longest sequence (prompt + output) the KV cache and rotary tables serve"""
    block_size: int
    """tokens per KV block"""
    gpu_memory_utilization: float
    """fraction of each GPU's memory shardlm may fill (weights + activations + KV)"""
    cpu_kv_cache_bytes: int
    """KV cache size per rank on CPU"""
    profile_tokens: int
    """tokens in the profiling forward that measures activation memory"""
    cpu_threads: int
    """torch threads per worker on CPU"""
    stage_layers: list[tuple[int, int]]
    """[start, end) decoder layers of each pipeline stage"""
    max_num_seqs: int
    """most sequences in a step: the largest graph batch"""
    max_seq_len_to_capture: int | None
    """longest context a graph gathers"""
    cuda_graphs: bool
    """replay decode steps as CUDA graphs (GPU, dense models)"""
    trace: bool = False
    """record per-step trace events in every worker"""
    expert_placement: list | None = None
    """MoE with expert parallelism: per decoder layer, None or the experts each EP rank holds"""
    attention_backend: str = "auto"
    """'triton' (the paged attention kernels), 'torch' (the reference) or 'auto' (triton on CUDA)"""
    kv_cache_dtype: str = "auto"
    """'auto' (the model dtype) or 'fp8' (e4m3, scale 1): the KV cache's elements"""
    custom_all_reduce: bool = True
    """TP on GPUs: the all-reduce over peer memory where the group's GPUs allow it"""
    async_scheduling: bool = False
    """plans may name PREV_TOKEN: the worker keeps each step's sampled tokens on the device (shared over the
    TP group) and launches the next plan before it answers the previous one"""
    timeout_s: float = 600.0
    """collective timeout"""


@dataclass
class WorkerInit(Message):
    """The first message to every worker: who it is part of and what to load."""

    name: ClassVar[str] = "init"
    layout: dict[str, int]
    """ParallelLayout's degrees: tp, pp, dp, ep"""
    model: ModelSource
    options: WorkerOptions
    init_method: str
    """torch.distributed rendezvous: tcp://host:port, or env:// under torchrun"""

    def encode(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"layout": self.layout, "model": self.model.to_dict(), "options": asdict(self.options),
                "init_method": self.init_method}, {}

    @classmethod
    def decode(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> WorkerInit:
        opts = dict(header["options"], stage_layers=[tuple(r) for r in header["options"]["stage_layers"]])
        return cls(header["layout"], ModelSource.from_dict(header["model"]), WorkerOptions(**opts),
                   header["init_method"])


@dataclass
class WorkerReady(Message):
    """A worker's reply to WorkerInit: its shard is loaded and it knows how much KV cache fits."""

    name: ClassVar[str] = "ready"
    rank: int
    load_s: float
    """seconds reading weights"""
    blocks: int
    """KV blocks that fit in its budget"""
    block_bytes: int
    """bytes of one KV block on this rank (K and V of its layers)"""
    activation_bytes: int = 0
    """peak activation memory of the profiling forward (GPU)"""
    graph_reserve_bytes: int = 0
    """memory the decode graphs' pool takes (GPU with graphs)"""
    penalty_reserve_bytes: int = 0
    """memory kept for the sampler's penalty counts (GPU: max_num_seqs rows of the vocabulary)"""
    total_bytes: int = 0
    """the GPU's memory"""
    used_bytes: int = 0
    """memory in use before the KV cache: weights, CUDA context, NCCL buffers, other processes"""
    attention_backend: str = "torch"
    """the attention path the worker runs ('triton' or 'torch')"""
    all_reduce_path: str = ""
    """the TP all-reduce this rank's group runs (ParallelContext.all_reduce_path)"""
    gemv_gbps: float = 0.0
    """weight read rate of the start-up GEMV, the same on every rank (the straggler check)"""
    gpu_index: int | None = None
    """the rank's GPU as nvidia-smi numbers it (None on the CPU)"""
    device_name: str = ""
    bus_id: str = ""
    """the GPU's PCI bus id ("" on the CPU)"""


# ---- commands (driver -> every worker) -------------------------------------------------------------
class Command(Message):
    """A request every worker answers with one reply (a dict of `name`), except Shutdown."""


@dataclass
class AllocateKV(Command):
    """Allocate the KV cache (then capture the decode graphs over it); reply: graphs, capture_s, graph_pool_bytes."""

    name: ClassVar[str] = "alloc_kv"
    blocks: int


@dataclass
class Stats(Command):
    """Step accounting (busy seconds, window, idle fraction) and, if asked, the trace events; optionally reset."""

    name: ClassVar[str] = "stats"
    events: bool = False
    reset: bool = False
    reset_experts: bool = False


@dataclass
class Probe(Command):
    """Time collectives of `sizes` bytes (and, on rank 0, the device's rates; with `model_kernels`, every
    rank's decode attention on its heads (with the KV cache's dtype, and on a GPU with FP8 tensor cores with an
    FP8 cache too) and a dense layer's GEMMs on its shards; with `graph_times`, the
    engine's decode graphs replayed at a few batches, worker/probe.py decode_graph_times)."""

    name: ClassVar[str] = "probe"
    sizes: list[int]
    iters: int
    device_rates: bool
    model_kernels: bool = False
    graph_times: bool = False


@dataclass
class ProfileStep(Command):
    """Run one step under torch.profiler without advancing anything; reply: GPU time per kernel kind."""

    name: ClassVar[str] = "profile_step"
    plan: StepPlan

    def encode(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"plan": self.plan.encode()[0]}, {}

    @classmethod
    def decode(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> ProfileStep:
        return cls(StepPlan.decode(header["plan"], {}))


@dataclass
class Shutdown(Command):
    """Leave the process group and exit (no reply)."""

    name: ClassVar[str] = "shutdown"


DRIVER_MESSAGES: dict[str, type] = {m.name: m for m in (WorkerInit, StepPlan, StepMasks, AllocateKV, Stats, Probe,
                                                      ProfileStep, Shutdown)}
"""Every message the driver sends, by name (how the worker decodes what arrives)."""
