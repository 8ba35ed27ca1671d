"""SamplingParams with vLLM's argument names and meanings, validated when created."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.messages import SamplingSpec

MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """An invalid sampling value; the message names the field and what is allowed."""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (names follow vLLM)."""

    n: int = 1
    """completions per prompt"""
    temperature: float = 1.0
    """0 means greedy; higher flattens the distribution"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]"""
    top_k: int = 0
    """keep only the k most likely tokens; 0 or -1 keeps all"""
    seed: int | None = None
    """per-request random seed, for reproducible sampling"""
    max_tokens: int | None = 16
    """most tokens to generate; None generates until EOS or the context is full"""
    stop: list[str] | str | None = None
    """strings that end generation (not included in the output text)"""
    stop_token_ids: list[int] | None = None
    """token ids that end generation, besides EOS"""
    ignore_eos: bool = False
    """keep generating past EOS (benchmarks)"""
    logprobs: int | None = None
    """return the log-probabilities of this many most likely tokens (plus the sampled one) per step"""
    skip_special_tokens: bool = True
    """leave special tokens out of the text"""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()

    def _check(self) -> None:
        def fail(msg: str) -> None:
            raise SamplingError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            fail(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (0, -1)):
            fail(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            fail(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    def sampling_spec(self, index: int = 0) -> SamplingSpec:
        """What the output rank needs to sample. `index` varies the seed between the n completions."""
        return SamplingSpec(float(self.temperature), float(self.top_p), int(self.top_k),
                            None if self.seed is None else int(self.seed) + 1_000_003 * index, self.logprobs)
