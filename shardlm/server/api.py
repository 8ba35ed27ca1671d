"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.sequence import CompletionOutput, RequestOutput
from ..engine.streaming import visible_end
from .async_engine import AsyncEngine, EngineDead, Overloaded
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="shardlm", docs_url=None, redoc_url=None)
    metrics = Metrics(model_name)
    engine.on_step = metrics.on_step
    app.state.engine, app.state.metrics = engine, metrics
    tokenizer = engine.engine.tokenizer
    max_len = engine.engine.max_model_len

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "malformed request body")
        return JSONResponse(APIError(400, msg, param).body(), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                               "authentication_error", "invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.healthy else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "shardlm", "max_model_len": max_len}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}", "model",
                           code="model_not_found")

    def check_max_tokens(value: int | None, prompt_len: int, field: str) -> int | None:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise APIError(400, f"{field} must be a positive integer, got {value!r}", field)
        if value is not None and prompt_len + value > max_len:
            raise APIError(400, f"{field}={value} plus the prompt's {prompt_len} tokens exceeds max_model_len="
                                f"{max_len}; lower {field}", field)
        return value

    async def run(prompt_text: str | None, ids: list[int], params) -> AsyncIterator[RequestOutput]:
        try:
            async with aclosing(engine.generate(prompt_text, ids, params)) as stream:
                metrics.prompt_tokens.inc(len(ids))
                async for out in stream:
                    if out.finished:
                        metrics.on_finished(out)
                    yield out
        except Overloaded:
            admit()  # raises the 503
        except EngineDead as exc:
            raise APIError(503, str(exc), kind="server_error") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from None

    def prompt_ids(prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, tokenizer.encode(prompt)
        return None, list(prompt)

    # ---- /v1/completions -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        req.check_unsupported()
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        encoded = [prompt_ids(p) for p in prompts]
        for _, ids in encoded:
            _validate(ids)
            check_max_tokens(req.max_tokens, len(ids), "max_tokens")
        params = req.sampling(req.max_tokens, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i: int, c: CompletionOutput, text: str, start_tok: int) -> dict[str, Any]:
            lp = _completion_logprobs(c, start_tok, tokenizer) if req.logprobs is not None else None
            return {"index": i, "text": text, "logprobs": lp,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        if not req.stream:
            outs = await asyncio.gather(*(_last(run(t, ids, params)) for t, ids in encoded))  # batched together
            choices = [choice(p * req.n + c.index, c, c.text, 0) for p, o in enumerate(outs) for c in o.outputs]
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": _usage(outs)}
        if len(encoded) > 1:
            raise APIError(400, "stream=true takes one prompt per request", "prompt")
        admit()  # a 503 must go out before the stream's 200 does

        async def events() -> AsyncIterator[str]:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            async for c, text, start, last in _stream_deltas(run(*encoded[0], params), req.n, params.stop):
                if c is not None:
                    yield _sse(dict(head, choices=[choice(c.index, c, text, start)]))
                elif (req.stream_options or {}).get("include_usage"):
                    yield _sse(dict(head, choices=[], usage=_usage([last])))
            yield "data: [DONE]\n\n"

        return StreamingResponse(_with_error_event(events()), media_type="text/event-stream")

    # ---- /v1/chat/completions ------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        req.check_unsupported()
        try:
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        _validate(ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        check_max_tokens(max_tokens, len(ids), field)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            admit()

        def logprobs(c: CompletionOutput, start: int) -> dict[str, Any] | None:
            return _chat_logprobs(c, start, tokenizer, req.top_logprobs or 0) if req.logprobs else None

        if not req.stream:
            out = await _last(run(None, ids, params))
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs(c, 0), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                       for c in out.outputs]
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": choices, "usage": _usage([out])}

        async def events() -> AsyncIterator[str]:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            for i in range(req.n):
                yield _sse(dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]))
            async for c, text, start, last in _stream_deltas(run(None, ids, params), req.n, params.stop):
                if c is not None:
                    ch = {"index": c.index, "delta": {"content": text} if text else {},
                          "logprobs": logprobs(c, start), "finish_reason": c.finish_reason}
                    yield _sse(dict(head, choices=[ch]))
                elif (req.stream_options or {}).get("include_usage"):
                    yield _sse(dict(head, choices=[], usage=_usage([last])))
            yield "data: [DONE]\n\n"

        return StreamingResponse(_with_error_event(events()), media_type="text/event-stream")

    def admit() -> None:
        try:
            engine.check_capacity()
        except Overloaded as exc:
            raise APIError(503, f"server overloaded: {exc}; retry later", kind="server_error",
                           headers={"Retry-After": "1"}) from None
        if not engine.healthy:
            raise APIError(503, "the engine is not running (a worker failed); see the server log", kind="server_error")

    def _validate(ids: list[int]) -> None:
        try:
            engine.engine.validate_prompt(ids)
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from None

    return app


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out


async def _stream_deltas(outputs: AsyncIterator[RequestOutput], n: int, stops: list[str]):
    """For each completion, the text and tokens not yet sent: yields (completion, new text, index of
    its first new token, None) whenever there is something to send, then (None, "", 0, last output)."""
    shown, sent_tokens, last = [0] * n, [0] * n, None
    async for out in outputs:
        last = out
        for c in out.outputs:
            end = visible_end(c.text, shown[c.index], c.finish_reason is not None, stops)
            if end > shown[c.index] or c.finish_reason is not None:
                yield c, c.text[shown[c.index]:end], sent_tokens[c.index], None
                shown[c.index], sent_tokens[c.index] = end, len(c.token_ids)
    if last is not None:
        yield None, "", 0, last


async def _with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Re-yield an event stream; an error after the 200 went out ends the stream with an error event."""
    try:
        async for e in events:
            yield e
    except APIError as exc:
        yield _sse(exc.body())
        yield "data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(c: CompletionOutput, start: int, tokenizer) -> dict[str, Any]:
    """OpenAI completions logprobs for tokens [start:] of a completion."""
    tokens, token_lps, tops, offsets, pos = [], [], [], [], 0
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        s = tokenizer.token_str(tid)
        tokens.append(s)
        token_lps.append(entry[tid].logprob)
        tops.append({tokenizer.token_str(t): lp.logprob for t, lp in entry.items()})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(c: CompletionOutput, start: int, tokenizer, top: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        s = tokenizer.token_str(tid)
        alts = sorted((lp.rank or 0, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top)
        content.append({"token": s, "logprob": entry[tid].logprob, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": tokenizer.token_str(t), "logprob": v,
                                          "bytes": list(tokenizer.token_str(t).encode())} for _, t, v in alts]})
    return {"content": content}
