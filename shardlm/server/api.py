"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, and vLLM's /tokenize,
/detokenize, /version; /health, /ready, /metrics; /engine (how the engine runs, for bench serve).

Every error is OpenAI-shaped JSON (`{"error": {message, type, param, code}}`), unknown paths, wrong
methods, oversized bodies and unexpected exceptions included; a stream that fails after its 200 went
out ends with an error event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..engine.sampling_params import SamplingError, SamplingParams
from ..engine.sequence import CompletionOutput, RequestOutput
from .async_engine import AsyncEngine, EngineDead, Overloaded
from .gate import Gate
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from .responses import (
    chat_logprobs,
    completion_logprobs,
    last_output,
    prompt_logprobs_json,
    sse,
    stream_deltas,
    usage,
)
from .tools import ToolCall, plan_tools

log = logging.getLogger("shardlm.serve")

CLIENT_GONE = 499
"""status of a response no one reads: its client hung up (nginx's "client closed request")"""
SHUTTING_DOWN = "the server shut down before this request finished; send it again"


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, *, max_body_bytes: int,
              tool_parser=None) -> FastAPI:
    """The app serving `engine` as `model_name`; requests to /v1/* need `api_key` if given, and bodies
    over `max_body_bytes` get 413."""
    app = FastAPI(title="shardlm", docs_url=None, redoc_url=None)
    metrics = Metrics(model_name)
    engine.on_step = metrics.on_step

    def on_tick(rep) -> None:
        metrics.set_ready(rep, rep.ready(engine.stall_s))
        metrics.on_tick(rep)

    engine.on_tick = on_tick
    engine.on_restart = lambda rep, restart: (metrics.on_restart(rep, restart.cause), metrics.set_ready(rep, True),
                                              metrics.on_workers(rep))
    for rep in engine.replicas:
        metrics.on_workers(rep)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes)
    tokenizer = engine.engine.tokenizer
    max_len = engine.engine.max_model_len

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = (f"no such endpoint: {request.method} {request.url.path}; this server serves /v1/completions, "
                       f"/v1/chat/completions, /v1/models, /tokenize, /detokenize, /version, /engine, /health, "
                       f"/ready and /metrics")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "GET")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        elif exc.status_code == 400:  # FastAPI could not read the body (e.g. it is not UTF-8)
            message = f"the request body could not be read ({exc.detail}); send a UTF-8 JSON object"
        else:
            message = str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, message, kind=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception once this response is out, and uvicorn logs it with its traceback
        return APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                        kind="server_error").response()

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 503 once no replica runs, and while a worker group is being replaced."""
        return Response(status_code=200 if engine.healthy else 503)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: some replica can serve now (loaded, not replacing workers, not stuck, not draining)."""
        return Response(status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "shardlm", "root": engine.engine.source.name,
                                            "max_model_len": max_len}]}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/engine")
    async def engine_settings() -> dict[str, Any]:
        """How the engine runs (layout, dtypes, graphs, its scheduler's limits) and how many replicas: what
        bench serve records for `plan --validate` to predict the run."""
        return {**engine.engine.settings(), "data_parallel_size": len(engine.replicas)}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r:.200} is not served here; this server serves {model_name!r}",
                           "model", code="model_not_found")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        req.check_text()
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt (text) and messages (a conversation)", "prompt")
        if req.prompt is not None:
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt)
        else:
            conversation = [m.for_template(f"messages.{i}") for i, m in enumerate(req.messages)]
            try:
                ids = await asyncio.to_thread(tokenizer.apply_chat_template, conversation, req.add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - the template's own checks
                raise APIError(400, f"the model's chat template rejected the messages: {exc}", "messages") from None
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        vocab = engine.engine.source.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, req.tokens, False)}

    def check_request(req: CompletionRequest | ChatCompletionRequest) -> None:
        req.check_text()
        check_model(req.model)
        req.check_unsupported()

    def check_max_tokens(value: int | None, prompt_len: int, field: str) -> int | None:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise APIError(400, f"{field} must be a positive integer, got {value!r}", field)
        if value is not None and prompt_len + value > max_len:
            raise APIError(400, f"{field}={value} plus the prompt's {prompt_len} tokens exceeds max_model_len="
                                f"{max_len}; lower {field}", field)
        return value

    def admit(count: int) -> None:
        """Refuse, before anything is queued or a stream's 200 goes out, a request of `count` generations
        that the server cannot take now (503 + Retry-After) or ever (400)."""
        if count > engine.max_waiting_requests:
            raise APIError(400, f"the request has {count} prompts but this server takes at most "
                                f"{engine.max_waiting_requests} requests in flight (--max-waiting-requests); "
                                f"send fewer prompts per request", "prompt")
        if not engine.serving:
            raise APIError(503, "the engine is not running (its workers failed); see the server log",
                           kind="server_error")
        try:
            engine.check_capacity(count)
        except Overloaded as exc:
            raise _overloaded(exc) from None

    def validate(ids: list[int], params: SamplingParams, req: CompletionRequest | ChatCompletionRequest,
                 constraint_from: str | None = None) -> None:
        try:
            engine.engine.validate_prompt(ids)
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from None
        try:
            engine.engine.validate_sampling(params)  # (a structured output is compiled here)
        except SamplingError as exc:
            field = exc.field
            if field == "structured_outputs":  # the field the client used
                field = constraint_from or ("response_format" if req.response_format else field)
            raise APIError(400, str(exc), field) from None

    async def run(prompt_text: str | None, ids: list[int], params) -> AsyncIterator[RequestOutput]:
        try:
            async with aclosing(engine.generate(prompt_text, ids, params)) as stream:
                metrics.prompt_tokens.inc(len(ids))
                async for out in stream:
                    if out.finished:
                        metrics.on_finished(out)
                    if out.error is not None:  # its own sampling values failed on the worker
                        raise APIError(400, f"the request failed: {out.error}")
                    yield out
        except Overloaded as exc:  # (another request took the last place since admit())
            raise _overloaded(exc) from None
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
    async def completions(req: CompletionRequest, request: Request):
        check_request(req)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "stream=true takes one prompt per request", "prompt")
        echo_lps = req.echo and req.logprobs is not None  # the prompt's log-probabilities come first
        params = req.sampling(req.max_tokens, req.logprobs, best_of=req.best_of,
                              prompt_logprobs=req.logprobs if echo_lps and req.prompt_logprobs is None else None)

        def encode() -> list[tuple[str | None, list[int]]]:
            encoded = [prompt_ids(p) for p in prompts]
            for _, ids in encoded:
                validate(ids, params, req)
                check_max_tokens(req.max_tokens, len(ids), "max_tokens")
            return encoded

        encoded = await asyncio.to_thread(encode)  # a long prompt takes a while: the loop serves others meanwhile
        admit(len(encoded))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i: int, c: CompletionOutput, text: str, start_tok: int, out: RequestOutput | None = None
                   ) -> dict[str, Any]:
            """out: the request's output whose prompt comes first (echo) and whose prompt_logprobs go with it"""
            echoed_prompt = (out.prompt_token_ids, out.prompt_logprobs) if echo_lps and out is not None else None
            lp = completion_logprobs(c, start_tok, tokenizer, echoed_prompt) if req.logprobs is not None else None
            body = {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}
            if req.prompt_logprobs is not None and out is not None:
                body["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
            return body

        def echoed(p: int) -> str:
            """echo: the prompt's text (a prompt of token ids decoded) before the completion's"""
            text, ids = encoded[p]
            return "" if not req.echo else text if text is not None else tokenizer.decode(ids)

        if not req.stream:
            outs = await _collect(request, [run(t, ids, params) for t, ids in encoded])  # batched together
            if outs is None:
                return Response(status_code=CLIENT_GONE)
            choices = [choice(p * req.n + c.index, c, echoed(p) + c.text, 0, o) for p, o in enumerate(outs)
                       for c in o.outputs]
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage(outs)}

        async def events() -> AsyncIterator[str]:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            def prompt_first(out: RequestOutput | None) -> Iterator[str]:
                """echo: the prompt, one event per completion (with its log-probabilities: once the first
                tokens came, with them); prompt_logprobs: the first event carries them"""
                for i in range(req.n if req.echo else 0):
                    none = CompletionOutput(i, "", [], None, [])
                    yield sse(dict(head, choices=[dict(choice(i, none, echoed(0), 0, out), finish_reason=None)]))
                if not req.echo and out is not None and req.prompt_logprobs is not None:
                    yield sse(dict(head, choices=[{"index": 0, "text": "", "logprobs": None, "finish_reason": None,
                                                   "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)}]))

            wait_for_prompt = echo_lps or req.prompt_logprobs is not None
            if not wait_for_prompt:
                for event in prompt_first(None):
                    yield event
            async for c, text, start, last in stream_deltas(run(*encoded[0], params), req.n, params.stop):
                if wait_for_prompt:
                    wait_for_prompt = False
                    for event in prompt_first(last):
                        yield event
                if c is not None:
                    yield sse(dict(head, choices=[choice(c.index, c, text, start)]))
                elif (req.stream_options or {}).get("include_usage"):
                    yield sse(dict(head, choices=[], usage=usage([last])))
            yield "data: [DONE]\n\n"

        return _EventStream(events())

    # ---- /v1/chat/completions ------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_request(req)
        conversation = [m.for_template(f"messages.{i}") for i, m in enumerate(req.messages)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        tools = plan_tools(req.tools, req.tool_choice, tool_parser)
        if tools.constraint is not None:  # the call is forced by a grammar
            if req.constraint() is not None:
                raise APIError(400, "tool_choice required or a named function forces the answer's format: drop "
                                    "response_format / structured_outputs", "tool_choice")
            req.structured_outputs = tools.constraint
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                              {"logprobs": "top_logprobs", "max_tokens": field})
        found_by = tool_parser if tools.mode == "auto" else None

        def encode() -> list[int]:
            try:
                ids = tokenizer.apply_chat_template(conversation, tools=tools.tools)
            except Exception as exc:  # noqa: BLE001 - the template's own checks (jinja2: roles must alternate, ...)
                raise APIError(400, f"the model's chat template rejected the messages: {exc}", "messages") from None
            validate(ids, params, req, "tools" if tools.constraint is not None else None)
            check_max_tokens(max_tokens, len(ids), field)
            return ids

        ids = await asyncio.to_thread(encode)  # off the event loop, as for completions
        admit(1)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(c: CompletionOutput, start: int) -> dict[str, Any] | None:
            return chat_logprobs(c, start, tokenizer, req.top_logprobs or 0) if req.logprobs else None

        def finish(c: CompletionOutput, calls: list) -> str | None:
            # (OpenAI: a call the request forced by name ends with "stop")
            return "tool_calls" if calls and c.finish_reason == "stop" and tools.mode != "named" else c.finish_reason

        if not req.stream:
            outs = await _collect(request, [run(None, ids, params)])
            if outs is None:
                return Response(status_code=CLIENT_GONE)
            choices = []
            for c in outs[0].outputs:
                content, calls = tools.calls(c.text, found_by)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = [call.message() for call in calls]
                choices.append({"index": c.index, "message": message, "logprobs": logprobs(c, 0),
                                "finish_reason": finish(c, calls), "stop_reason": c.stop_reason})
            body = {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage(outs)}
            if req.prompt_logprobs is not None:  # (vLLM's field, beside the choices)
                body["prompt_logprobs"] = prompt_logprobs_json(outs[0].prompt_logprobs)
            return body

        async def events() -> AsyncIterator[str]:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            for i in range(req.n):
                yield sse(dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]))
            texts, shown = [""] * req.n, [0] * req.n  # per completion: its text so far, and how much went out
            named = [None] * req.n  # tool_choice named: the call whose arguments stream as they come
            lp_from = [0] * req.n  # per completion: its first token whose logprobs have not gone out (a chunk
            # held back while it may be a tool call sends none: the next one that goes out carries them)
            prompt_lps = req.prompt_logprobs is not None  # they go out with the first tokens
            async for c, text, _, last in stream_deltas(run(None, ids, params), req.n, params.stop):
                if prompt_lps:
                    prompt_lps = False
                    yield sse(dict(head, choices=[], prompt_logprobs=prompt_logprobs_json(last.prompt_logprobs)))
                if c is None:
                    if (req.stream_options or {}).get("include_usage"):
                        yield sse(dict(head, choices=[], usage=usage([last])))
                    continue
                i = c.index
                texts[i] += text
                delta: dict[str, Any] = {}
                calls: list = []
                if tools.mode == "named":  # the text is the arguments: stream them
                    if named[i] is None:
                        named[i] = ToolCall(tools.name, "")
                        delta["tool_calls"] = [dict(named[i].message(0), function={"name": tools.name,
                                                                                    "arguments": text})]
                    elif text:
                        delta["tool_calls"] = [{"index": 0, "function": {"arguments": text}}]
                    calls = [named[i]]
                elif c.finish_reason is not None and tools.mode in ("auto", "required"):
                    _, calls = tools.calls(texts[i], found_by)
                    # the text before the calls (offsets into the text as sent: the content is stripped)
                    end = (found_by.holds(texts[i]) if found_by is not None else shown[i]) if calls else len(texts[i])
                    rest = texts[i][shown[i]:end]
                    if rest:
                        delta["content"] = rest
                    if calls:
                        delta["tool_calls"] = [call.message(k) for k, call in enumerate(calls)]
                else:  # text, less what may be the start of a call (auto) or the whole call list (required)
                    hold = (0 if tools.mode == "required" else found_by.holds(texts[i]) if found_by is not None
                            else len(texts[i]))
                    if hold > shown[i]:
                        delta["content"] = texts[i][shown[i]:hold]
                        shown[i] = hold
                if delta or c.finish_reason is not None:
                    ch = {"index": i, "delta": delta, "logprobs": logprobs(c, lp_from[i]),
                          "finish_reason": finish(c, calls) if c.finish_reason is not None else None}
                    lp_from[i] = len(c.token_ids)
                    yield sse(dict(head, choices=[ch]))
            yield "data: [DONE]\n\n"

        return _EventStream(events())

    return app


class _EventStream(StreamingResponse):
    """A text/event-stream of `events`. A client that hangs up cancels them at once (which aborts their
    request: see AsyncEngine.generate). However it ends otherwise, the stream is well formed: a failure
    after the 200 went out, or the server cancelling the response (its graceful shutdown timed out),
    sends an error event, then `data: [DONE]`."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()

        async def hang_up() -> None:
            await _client_gone(receive)
            task.cancel()

        watcher = asyncio.create_task(hang_up())
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        error = None
        try:
            async with aclosing(self.body_iterator) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        except asyncio.CancelledError:
            task.uncancel()
            if watcher.done():
                return  # the client has gone: no one to tell
            error = APIError(503, SHUTTING_DOWN, kind="server_error")
        except APIError as exc:
            error = exc
        except Exception:  # noqa: BLE001 - a bug: logged, and the client still gets a well-formed end
            log.exception("streaming a response failed")
            error = APIError(500, "internal server error; see the server log", kind="server_error")
        finally:
            watcher.cancel()
        tail = b"" if error is None else (sse(error.body()) + "data: [DONE]\n\n").encode()
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _client_gone(receive: Receive) -> None:
    """Return once the client has disconnected (call it only after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput] | None:
    """The final outputs of `streams`, generated together; None if the client hung up first. Their
    request is answered or refused whole: the first to fail cancels the others, and so does the client
    hanging up (cancelling one aborts its request, freeing its KV blocks). The server cancelling this
    request (its graceful shutdown timed out) answers 503."""
    tasks = [asyncio.create_task(last_output(s)) for s in streams]
    gone = asyncio.create_task(_client_gone(request.receive))
    try:
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(waiting | {gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                return None
            waiting.discard(gone)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        return [t.result() for t in tasks]
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()
        raise APIError(503, SHUTTING_DOWN, kind="server_error") from None
    finally:
        for t in (*tasks, gone):
            t.cancel()


def _overloaded(exc: Overloaded) -> APIError:
    return APIError(503, f"server overloaded: {exc}; retry later", kind="server_error", headers={"Retry-After": "1"})


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 for a body FastAPI could not parse or validate, naming the field."""
    if not errors:
        return APIError(400, "malformed request body; send a JSON object")
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'syntax')} "
                             f"at character {first['loc'][-1]}); send a JSON object")
    paths = [[str(x) for x in e["loc"] if x != "body"] for e in errors]
    if not paths[0]:
        return APIError(400, f"the request body must be a JSON object: {first['msg']}")
    # a field of several forms (prompt, stop, content) fails once per form: show each (up to 4), and
    # name the field they share
    same = [(p, e["msg"]) for p, e in zip(paths, errors) if p[0] == paths[0][0]][:4]
    param = ".".join(os.path.commonprefix([p for p, _ in same]))
    detail = "; ".join(f"{'.'.join(p)}: {msg}" for p, msg in same)
    return APIError(400, detail if len(same) == 1 else f"invalid {param}: {detail}", param)
