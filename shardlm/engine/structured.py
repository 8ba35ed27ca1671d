"""Structured outputs: a grammar per constrained sequence, on the driver, masking the tokens the sampler may
pick (llguidance: JSON schema, JSON object, regex, choice, Lark / GBNF grammars).

The driver holds each constrained sequence's matcher, advances it with every token the sequence gets and,
when it plans the sequence's next pick, packs the allowed tokens into a bitmask row of the plan
(`StepPlan.masks`, 32 tokens a word); the output rank's sampler sets every other token's logit to -inf
before the pick (worker/sampler.py), on any TP/PP layout. The next mask needs the token just picked: under
async scheduling a constrained sequence is planned ahead like any other, its plan says the masks follow
(`StepPlan.masks_follow`), and the driver sends them (`StepMasks`, to the output rank) as soon as the step
before has answered, while the workers already run the new step's forward; the output rank samples once
they are there (LLMEngine._plan / _finish_oldest, worker/main.py).

Why llguidance (against xgrammar and outlines-core): one abi3 wheel with no Python dependencies (xgrammar
needs torch, ninja, sentencepiece and tiktoken at install), masks computed lazily per step in tens of
microseconds without a per-schema compilation pass, JSON schema + regex + Lark + GBNF in one engine, and a
tokenizer built from any byte vocabulary (our random models' byte tokenizer included); maintained by the
guidance team and used by vLLM, SGLang and llama.cpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sampling_params import SamplingError
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")
"""vLLM's `structured_outputs` keys (the OpenAI response_format maps to json / json_object)"""


@dataclass(frozen=True)
class StructuredOutputs:
    """At most one of the fields set (vLLM's StructuredOutputsParams)."""

    json: dict | str | None = None
    """a JSON schema (object or text): the output is JSON that validates against it"""
    json_object: bool = False
    """the output is a JSON object (any)"""
    regex: str | None = None
    choice: list[str] | None = None
    """the output is exactly one of these strings"""
    grammar: str | None = None
    """a Lark or GBNF grammar"""
    disable_any_whitespace: bool = True
    """JSON: compact separators (", " and ": ") and no other whitespace. vLLM lets whitespace run free by
    default; a model that falls into newlines then never ends its object (a random model always does), so
    shardlm's default is compact: send False for free whitespace"""
    whitespace_pattern: str | None = None
    """JSON: a regex of the whitespace allowed between tokens (overrides disable_any_whitespace)"""

    @classmethod
    def parse(cls, value: Any) -> StructuredOutputs | None:
        """From a dict (a request's structured_outputs) or an instance; SamplingError naming what is wrong."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise SamplingError("structured_outputs", f"structured_outputs must be an object with one of "
                                                      f"{', '.join(KINDS)}, got {value!r:.100}")
        options = ("disable_any_whitespace", "whitespace_pattern")
        unknown = sorted(set(value) - set(KINDS) - set(options))
        if unknown:
            raise SamplingError("structured_outputs", f"structured_outputs has unknown keys {unknown}; it takes one "
                                                      f"of {', '.join(KINDS)} (and {', '.join(options)})")
        if not isinstance(value.get("json_object", False), bool):
            raise SamplingError("structured_outputs", "structured_outputs.json_object must be true or false")
        if not isinstance(value.get("disable_any_whitespace", True), bool) or not isinstance(
                value.get("whitespace_pattern", ""), (str, type(None))):
            raise SamplingError("structured_outputs", "disable_any_whitespace must be true or false and "
                                                      "whitespace_pattern a regex")
        out = cls(**value)
        given = [k for k in KINDS if getattr(out, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingError("structured_outputs", f"structured_outputs needs exactly one of {', '.join(KINDS)}, "
                                                      f"got {given or 'none'}")
        if out.choice is not None and (not isinstance(out.choice, list) or not out.choice
                                       or not all(isinstance(c, str) for c in out.choice)):
            raise SamplingError("structured_outputs", "structured_outputs.choice must be a non-empty list of strings")
        for key in ("regex", "grammar"):
            if getattr(out, key) is not None and not isinstance(getattr(out, key), str):
                raise SamplingError("structured_outputs", f"structured_outputs.{key} must be a string")
        if out.json is not None and not isinstance(out.json, (dict, str)):
            raise SamplingError("structured_outputs", "structured_outputs.json must be a JSON schema (an object)")
        return out

    def grammar_text(self) -> str:
        """The llguidance grammar of this constraint (compiling it is Grammars.matcher's job)."""
        import llguidance

        if self.json is not None or self.json_object:
            try:
                schema = json.loads(self.json) if isinstance(self.json, str) else dict(self.json or {"type": "object"})
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON ({exc})") from None
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            style = ({"whitespace_pattern": self.whitespace_pattern} if self.whitespace_pattern is not None else
                     {"whitespace_flexible": not self.disable_any_whitespace})
            schema["x-guidance"] = {**style, **schema.get("x-guidance", {})}
            return llguidance.grammar_from("json_schema", json.dumps(schema))
        if self.regex is not None:
            return llguidance.grammar_from("regex", self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(self.choice))
        return llguidance.grammar_from("grammar", self.grammar)


class _ByteVocabulary:
    """What llguidance needs of shardlm's byte tokenizer (random models): each id's bytes."""

    def __init__(self, tok: ByteTokenizer):
        lo, hi = tok.OFFSET, tok.OFFSET + 256
        self.eos_token_id = tok.eos_token_ids[0]
        self.bos_token_id = 1
        self.tokens = [bytes([i - lo]) if lo <= i < hi else f"<|{i}|>".encode() for i in range(tok.vocab_size)]
        self.special_token_ids = [i for i in range(tok.vocab_size) if not lo <= i < hi]

    def __call__(self, text: str) -> list[int]:
        return [b + ByteTokenizer.OFFSET for b in text.encode()]


class Grammars:
    """The engine's grammar side: its tokenizer as llguidance sees it, a matcher per constrained sequence."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None
        self.words = (vocab_size + 31) // 32
        """int32 words of one bitmask row"""

    def _ll_tokenizer(self):
        """The tokenizer as llguidance sees it, built once (or the reason it cannot be, kept)."""
        if self._lltok is None:
            import llguidance
            import llguidance.hf

            try:
                if isinstance(self.tokenizer, HFTokenizer):
                    self._lltok = llguidance.hf.from_tokenizer(self.tokenizer.tok, n_vocab=self.vocab_size,
                                                               eos_token=list(self.tokenizer.eos_token_ids))
                elif isinstance(self.tokenizer, ByteTokenizer):
                    self._lltok = llguidance.LLTokenizer(
                        llguidance.TokenizerWrapper(_ByteVocabulary(self.tokenizer)))
                else:
                    self._lltok = "structured outputs need a Hugging Face or byte tokenizer"
            except (ValueError, TypeError, AttributeError) as exc:  # a slow tokenizer, a vocabulary too small, ...
                self._lltok = f"this model's tokenizer cannot drive a grammar ({exc})"
        if isinstance(self._lltok, str):
            raise SamplingError("structured_outputs", f"structured outputs are not available: {self._lltok}")
        return self._lltok

    def check(self, spec: StructuredOutputs) -> str:
        """spec's grammar, checked against this tokenizer; SamplingError with llguidance's reason if it does
        not compile."""
        import llguidance

        try:
            grammar = spec.grammar_text()
        except (ValueError, TypeError) as exc:
            raise SamplingError("structured_outputs", f"the structured output cannot be compiled: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll_tokenizer())
        if error:
            raise SamplingError("structured_outputs", f"the structured output cannot be compiled: {error}")
        return grammar

    def matchers(self, spec: StructuredOutputs, n: int) -> list:
        """n fresh matchers of spec's grammar (one per completion)."""
        import llguidance

        first = llguidance.LLMatcher(self._ll_tokenizer(), self.check(spec))
        return [first] + [first.deep_copy() for _ in range(n - 1)]

    def masks(self, matchers: list) -> np.ndarray:
        """[len(matchers), words] int32: bit t of a row set where the matcher allows token t next (every bit
        where the matcher is None)."""
        import llguidance.numpy as ln  # (not llguidance.torch: it compiles a kernel at import, 3 s)

        out = ln.allocate_token_bitmask(len(matchers), self.vocab_size)
        for row, m in enumerate(matchers):
            if m is None:
                out[row] = -1
            else:
                ln.fill_next_token_bitmask(m, out, row)
        return out
