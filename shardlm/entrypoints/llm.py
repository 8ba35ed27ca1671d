"""`LLM`: the offline Python API, shaped like vLLM's so users can switch."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from ..common.model_source import ModelSource
from ..engine.arg_utils import EngineArgs
from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingError, SamplingParams
from ..engine.sequence import RequestOutput

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Start the workers for `model` once; then generate() / chat() as often as needed.

        llm = LLM(model="smollm2-135m", tensor_parallel_size=2)
        outs = llm.generate(["a", "b"], SamplingParams(max_tokens=32, temperature=0))
    """

    def __init__(self, model: str | ModelSource | None = None, tensor_parallel_size: int = 1, **kwargs: Any):
        known = set(EngineArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM argument(s) {unknown}; known: {sorted(known - {'model'})}")
        self.engine = LLMEngine(EngineArgs(model=model, tensor_parallel_size=tensor_parallel_size, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- prompts ---------------------------------------------------------------------------
    def _tokens(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._tokens(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _params(self, params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts; give one, or one per prompt")
        return params

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate completions for all prompts in continuous batches; outputs keep the prompts' order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params(sampling_params, len(prompts))
        # tokenize and validate everything before anything is queued: a bad prompt loses no work
        encoded = [self._tokens(p) for p in prompts]
        order = self._submit(encoded, params)
        results: dict[str, RequestOutput] = {}
        for out in self._run(use_tqdm, total=len(order)):
            if out.finished:
                results[out.request_id] = out
        return [results[rid] for rid in order]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.engine.tokenizer.apply_chat_template(c)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that added tokens (the last one has finished=True).

        Stopping early (closing the iterator) aborts the request and frees its KV cache."""
        params = self._params(sampling_params, 1)
        if params[0].completions > params[0].n:
            raise SamplingError("best_of", "best_of > n cannot stream: which n completions are the best is known "
                                           "only when all have finished; use generate()")
        (rid,) = self._submit([self._tokens(prompt)], params)
        finished = False
        try:
            for out in self._run(False, total=1):
                if out.request_id == rid:
                    finished = out.finished
                    yield out
        finally:
            if not finished:
                self.engine.abort_request(rid)
                self.engine.drain()  # the step already sent for it (async scheduling): the engine is idle after

    def _submit(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams]) -> list[str]:
        for (_, ids), p in zip(encoded, params):
            self.engine.validate_prompt(ids)
            self.engine.validate_sampling(p)
        order = []
        for (text, ids), p in zip(encoded, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, text, ids, p)
            order.append(rid)
        return order

    def _run(self, use_tqdm: bool, total: int) -> Iterator[RequestOutput]:
        from tqdm import tqdm

        with tqdm(total=total, desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        bar.update(1)
                    yield out

    # ---- lifetime ----------------------------------------------------------------------------
    def expert_stats(self, reset: bool = False) -> dict[str, Any]:
        """MoE routing so far: tokens per expert per layer and each step's rank imbalance (see LLMEngine.expert_stats)."""
        return self.engine.expert_stats(reset=reset)

    def save_expert_load(self, path: str | os.PathLike) -> None:
        """Write the tokens each expert received so far as JSON: the `expert_load` that
        expert_placement='balanced' evens out in a later run."""
        stats = self.engine.expert_stats()
        data = {"model": stats["model"], "num_experts": stats["num_experts"],
                "tokens_per_expert": {str(k): v for k, v in stats["tokens_per_expert"].items()}}
        Path(path).write_text(json.dumps(data, indent=1))

    def shutdown(self) -> None:
        """Stop the worker processes (also done on exit and by `with LLM(...) as llm:`)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(grace_s=1.0)
