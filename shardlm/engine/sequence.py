"""Sequences (one per completion) and the request and output objects users see (vLLM-shaped)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams
from .tokenizer import DetokenizerState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """Log-probability of one candidate token at one step."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class Sequence:
    """One completion being generated: token ids, KV blocks, progress, stop state."""

    seq_id: int
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    blocks: list[int] = field(default_factory=list)
    sent_table: list[int] | None = None
    """the block table (the list object) the workers were last sent: a table only grows in place, so its
    entries past sent_len are the ones they lack; another list is another table (LLMEngine._new_blocks)"""
    sent_len: int = 0
    num_computed: int = 0
    """tokens whose K/V are in the cache"""
    num_scheduled: int = 0
    """tokens a submitted batch will have computed: ahead of num_computed while prompt chunks are
    still in the pipeline"""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    detok: DetokenizerState = field(default_factory=DetokenizerState)
    """how far `text` has decoded output_ids (the engine adds each step's new text)"""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    matcher: Any = None
    """structured outputs: the grammar's matcher (llguidance), advanced with every token (engine/structured.py)"""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """SamplingParams.prompt_logprobs (the request's first completion only): per prompt position, the
    token's log-probability and the most likely ones there, filled as the prefill's chunks run (None at
    position 0, and until computed)"""
    penalty_seeded: bool = False
    """the workers hold this sequence's token counts (penalties): set once a plan carried its history,
    cleared when its KV cache goes (the workers may be new ones)"""

    def __post_init__(self) -> None:
        self.sampling = self.params.sampling_spec(self.index)
        """what the workers need to sample this completion (made once: a step plan carries it for every row)"""

    def reset_for_recompute(self) -> None:
        """Forget the KV cache (its blocks are gone): the sequence waits to prefill prompt + output again
        (on workers that may not know it: a new group after a failure, another replica's)."""
        self.blocks = []
        self.sent_table, self.sent_len = None, 0
        self.num_computed = self.num_scheduled = 0
        self.penalty_seeded = False
        self.status = SeqStatus.WAITING

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, end: int | None = None) -> list[int]:
        """all_ids[start:end] without joining the prompt and the output first (a decode step asks for one
        token of each running sequence)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p: None if end is None else end - p]
        return self.all_ids[start:end]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass
class CompletionOutput:
    """One completion of a request, as vLLM returns it."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps of one request (time.monotonic seconds)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    """when its prompt first went into a step (queue time ends, prefill starts)"""
    first_token_time: float | None = None
    last_token_time: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    """seconds between successive steps that gave it tokens (inter-token latency)"""
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's prompt and its completions so far (finished=True once all are done)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    """why the request failed on its own (e.g. its sampling parameters broke the sampler); its completions
    then end with finish_reason "error". Other requests are unaffected."""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """SamplingParams.prompt_logprobs: per prompt token (None for the first), its log-probability and the
    most likely tokens at its position, as vLLM gives them"""
