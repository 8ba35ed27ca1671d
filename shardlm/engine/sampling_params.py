"""SamplingParams with vLLM's argument names and meanings, validated when created.

Every value is bounded by what the output rank's sampler (worker/sampler.py) and the output processor
take, so a request that passes here cannot break a worker; the bounds are the constants below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..common.messages import SamplingSpec

MAX_N = 128
"""most completions per prompt (OpenAI's limit): each is a sequence with its own KV blocks"""
MAX_LOGPROBS = 20
"""most top log-probabilities per token (OpenAI's limit)"""
MIN_TEMPERATURE = 1e-5
"""temperatures above 0 and below this sample greedily (as vLLM does): dividing logits by them
overflows float32, and the distribution they ask for is the argmax anyway"""
MAX_TEMPERATURE = 100.0
"""the highest temperature: real models' logits span tens of units, so at 100 every token is already
about equally likely; higher values add nothing"""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""seeds, top_k and stop token ids must fit a signed 64-bit integer (what torch holds them in)"""
SEED_STRIDE = 1_000_003
"""completion i of n samples with seed + SEED_STRIDE * i. With seed in int64 and i < MAX_N every such
seed lies in [-2**63, 2**64 - 1], the range torch.Generator.manual_seed takes"""
MAX_STOP = 64
"""most stop strings (each is searched for after every token) and most stop token ids"""
MAX_STOP_CHARS = 256
"""longest stop string: streaming holds back this many characters minus one, in case a stop completes"""
MAX_PENALTY = 2.0
"""presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)"""
MAX_REPETITION_PENALTY = 10.0
"""repetition_penalty lies in (0, MAX_REPETITION_PENALTY]: it divides (or multiplies) a logit"""
MAX_LOGIT_BIAS = 300
"""most entries of logit_bias (OpenAI's limit); each bias in [-100, 100]"""


class SamplingError(ValueError):
    """An invalid sampling value; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (names follow vLLM)."""

    n: int = 1
    """completions per prompt, 1 .. MAX_N"""
    temperature: float = 1.0
    """0 means greedy (so does anything below MIN_TEMPERATURE); higher flattens the distribution, up to
    MAX_TEMPERATURE"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]"""
    top_k: int = 0
    """keep only the k most likely tokens; 0 or -1 keeps all"""
    seed: int | None = None
    """per-request random seed (a signed 64-bit integer), for reproducible sampling"""
    max_tokens: int | None = 16
    """most tokens to generate; None generates until EOS or the context is full"""
    stop: list[str] | str | None = None
    """strings that end generation (not included in the output text); at most MAX_STOP, each at most
    MAX_STOP_CHARS characters"""
    stop_token_ids: list[int] | None = None
    """token ids that end generation, besides EOS; at most MAX_STOP"""
    ignore_eos: bool = False
    """keep generating past EOS (benchmarks)"""
    logprobs: int | None = None
    """return the log-probabilities of this many most likely tokens (plus the sampled one) per step,
    0 .. MAX_LOGPROBS"""
    prompt_logprobs: int | None = None
    """return each prompt token's log-probability (after the first token) with this many most likely
    tokens at its position, 0 .. MAX_LOGPROBS (RequestOutput.prompt_logprobs; the request's prompt is then
    computed, not taken from the prefix cache)"""
    skip_special_tokens: bool = True
    """leave special tokens out of the text"""
    presence_penalty: float = 0.0
    """subtracted from the logit of every token the completion already contains, in [-2, 2]"""
    frequency_penalty: float = 0.0
    """subtracted from a token's logit once per time the completion already contains it, in [-2, 2]"""
    repetition_penalty: float = 1.0
    """tokens of the prompt or the completion so far: positive logits divided by it, negative ones multiplied
    (as Hugging Face and vLLM do); 1 is off, in (0, MAX_REPETITION_PENALTY]"""
    min_p: float = 0.0
    """drop tokens less likely than min_p x the most likely one (random sampling), in [0, 1]"""
    logit_bias: dict[int, float] | None = None
    """token id -> added to its logit before sampling, in [-100, 100] (-100 bans it); at most MAX_LOGIT_BIAS"""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot end the completion (nor stop strings) before this many tokens"""
    best_of: int | None = None
    """sample this many completions and return the n with the highest cumulative log-probability (>= n)"""
    structured_outputs: Any = None
    """constrain the output (engine/structured.py): a StructuredOutputs, or a dict with one of json (a JSON
    schema), json_object (True), regex, choice (a list of strings), grammar (Lark or GBNF)"""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))):
            raise SamplingError("stop", f"stop must be a string or a list of strings, got {self.stop!r:.100}")
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise SamplingError("stop_token_ids",
                                f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r:.100}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()

    def _check(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise SamplingError(field, msg)

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            fail("n", f"n must be an integer in [1, {MAX_N}] (MAX_N), got {self.n!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            fail("temperature", f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 = greedy; so is "
                                f"anything below {MIN_TEMPERATURE:g}), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not (self.top_k in (0, -1) or 1 <= self.top_k <= INT64_MAX):
            fail("top_k", f"top_k must be -1 or 0 (disabled) or an integer in [1, 2**63 - 1], got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            fail("seed", f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            fail("prompt_logprobs", f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                    f"got {self.prompt_logprobs!r}")
        if len(self.stop) > MAX_STOP:
            fail("stop", f"stop has {len(self.stop)} strings; at most {MAX_STOP} (MAX_STOP) are allowed")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                fail("stop", f"stop must be a list of strings of 1 to {MAX_STOP_CHARS} (MAX_STOP_CHARS) characters, "
                             f"got {s!r:.100}")
        if len(self.stop_token_ids) > MAX_STOP:
            fail("stop_token_ids", f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP} (MAX_STOP) "
                                   f"are allowed")
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= INT64_MAX:
                fail("stop_token_ids", f"stop_token_ids must be integers in [0, 2**63 - 1], got {t!r:.100}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                fail(name, f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not 0 < rp <= MAX_REPETITION_PENALTY:
            fail("repetition_penalty", f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}] "
                                       f"(1 = off), got {rp!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", f"logit_bias must map token ids to numbers, got {self.logit_bias!r:.100}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                fail("logit_bias", f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
            bias = {}
            for token, value in self.logit_bias.items():
                # JSON keys are strings ("²".isdigit() too, but int() refuses it)
                tid = int(token) if isinstance(token, str) and token.isascii() and token.isdigit() else token
                if not _is_int(tid) or not 0 <= tid <= INT64_MAX:
                    fail("logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {token!r:.100}")
                if not _is_real(value) or not -100 <= value <= 100:
                    fail("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {value!r:.100} "
                                       f"for token {tid}")
                bias[tid] = float(value)
            self.logit_bias = bias or None
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N):
            fail("best_of", f"best_of must be an integer in [n, {MAX_N}] (n = {self.n}), got {self.best_of!r}")
        from .structured import StructuredOutputs

        self.structured_outputs = StructuredOutputs.parse(self.structured_outputs)

    @property
    def completions(self) -> int:
        """sequences sampled per prompt: best_of of them, else n"""
        return self.best_of or self.n

    def sampling_spec(self, index: int = 0) -> SamplingSpec:
        """What the output rank needs to sample completion `index` (which varies the seed between the n)."""
        temperature = 0.0 if self.temperature < MIN_TEMPERATURE else float(self.temperature)
        seed = None if self.seed is None else self.seed + SEED_STRIDE * index
        return SamplingSpec(temperature, float(self.top_p), self.top_k, seed, self.logprobs,
                            float(self.presence_penalty), float(self.frequency_penalty),
                            float(self.repetition_penalty), float(self.min_p),
                            tuple(sorted((self.logit_bias or {}).items())))
