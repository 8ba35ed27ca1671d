"""OpenAI response bodies from RequestOutputs: streamed deltas, usage, logprobs, server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ..engine.sequence import CompletionOutput, RequestOutput
from ..engine.streaming import visible_end


async def last_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out


async def stream_deltas(outputs: AsyncIterator[RequestOutput], n: int, stops: list[str]):
    """For each completion, the text and tokens not yet sent: yields (completion, new text, index of
    its first new token, the request's output it came from) whenever there is something to send, then
    (None, "", 0, last output)."""
    shown, sent_tokens, last = [0] * n, [0] * n, None
    async for out in outputs:
        last = out
        for c in out.outputs:
            end = visible_end(c.text, shown[c.index], c.finish_reason is not None, stops)
            if end > shown[c.index] or c.finish_reason is not None:
                yield c, c.text[shown[c.index]:end], sent_tokens[c.index], out
                shown[c.index], sent_tokens[c.index] = end, len(c.token_ids)
    if last is not None:
        yield None, "", 0, last


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(c: CompletionOutput, start: int, tokenizer,
                        prompt: tuple[list[int], list] | None = None) -> dict[str, Any]:
    """OpenAI completions logprobs for tokens [start:] of a completion; prompt: (ids, RequestOutput's
    prompt_logprobs) of an echoed prompt, whose tokens come first (the first without a log-probability)."""
    tokens, token_lps, tops, offsets, pos = [], [], [], [], 0
    pairs = list(zip(*prompt)) if prompt is not None else []
    for tid, entry in pairs + list(zip(c.token_ids[start:], (c.logprobs or [])[start:])):
        s = tokenizer.token_str(tid)
        tokens.append(s)
        token_lps.append(None if entry is None else entry[tid].logprob)
        tops.append(None if entry is None else {tokenizer.token_str(t): lp.logprob for t, lp in entry.items()})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(entries: list | None) -> list | None:
    """RequestOutput.prompt_logprobs as vLLM's servers return them: per prompt token None (the first) or
    {token id: {"logprob", "rank", "decoded_token"}}"""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def chat_logprobs(c: CompletionOutput, start: int, tokenizer, top: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        s = tokenizer.token_str(tid)
        alts = sorted((lp.rank or 0, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top)
        content.append({"token": s, "logprob": entry[tid].logprob, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": tokenizer.token_str(t), "logprob": v,
                                          "bytes": list(tokenizer.token_str(t).encode())} for _, t, v in alts]})
    return {"content": content}
