"""Hostile input and lost work: every bad request gets an OpenAI-shaped 4xx naming what to change, the
server stays healthy, and no request's work is lost or left running.

A real server (random:tiny-llama) takes the hostile inputs; the API's own handling of cancellation,
shutdown and failed generations runs in-process against a scripted engine (deterministic and fast).
"""

import asyncio
import json
import socket
import threading
import time
from contextlib import AsyncExitStack
from types import SimpleNamespace

import httpx
import pytest
from test_server import metrics, start_server, stop_server

from shardlm.engine.sampling_params import MAX_N, MAX_STOP, MAX_TEMPERATURE
from shardlm.engine.sequence import CompletionOutput, RequestOutput
from shardlm.engine.tokenizer import ByteTokenizer
from shardlm.server.api import build_app
from shardlm.server.async_engine import EngineDead

KEY = "hygiene-key"
MODEL = "random:tiny-llama"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 8  # --max-waiting-requests


@pytest.fixture(scope="module")
def server():
    proc, base = start_server(MODEL, "-tp", "2", "--api-key", KEY, "--max-waiting-requests", str(LIMIT))
    yield base
    assert stop_server(proc) == 0


def post(base: str, path: str, body: dict, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    """POST `body` as JSON as Python writes it: NaN, Infinity and integers of any size go through."""
    return httpx.post(base + path, content=json.dumps(body), timeout=timeout,
                      headers={"content-type": "application/json", **AUTH, **(headers or {})})


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if status < 500 and status != 401:
        assert err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_serving(base: str) -> None:
    assert httpx.get(base + "/health").status_code == 200
    r = post(base, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
NAN, INF = float("nan"), float("inf")
HOSTILE = [  # (endpoint, fields beyond model, the param the 400 names)
    *[(CMPL, {"temperature": v}, "temperature") for v in (NAN, INF, -INF, 1e9, "nan", -1)],
    *[(CMPL, {"top_p": v}, "top_p") for v in (NAN, INF, 0.0, 2)],
    *[(CMPL, {"seed": v}, "seed") for v in (2**64, -(2**63) - 1, 10**40)],
    *[(CMPL, {"n": v}, "n") for v in (10**6, MAX_N + 1, 0)],
    *[(CMPL, {"top_k": v}, "top_k") for v in (2**64, -2)],
    *[(CMPL, {"stop": v}, "stop") for v in (["x"] * 1000, "y" * 10_000, [None], "\ud800")],
    *[(CMPL, {"stop_token_ids": v}, "stop_token_ids") for v in ([2**64], [-1], list(range(1000)))],
    *[(CMPL, {"logprobs": v}, "logprobs") for v in (10**9, -1)],
    *[(path, {"prompt_logprobs": v}, "prompt_logprobs") for path in (CMPL, CHAT) for v in (10**9, -1, 1.5)],
    *[(CMPL, {"max_tokens": v}, "max_tokens") for v in (10**30, 0)],
    (CMPL, {"prompt": "ok \ud800"}, "prompt"), (CMPL, {"prompt": [2**64]}, "prompt"),
    (CMPL, {"prompt": [[]]}, "prompt"),
    (CMPL, {"prompt": 5}, "prompt"), (CMPL, {"prompt": ["a", "b"], "stream": True}, "prompt"),
    (CMPL, {"prompt": ["x"] * (LIMIT + 1)}, "prompt"),  # more prompts than could ever be in flight
    (CHAT, {"logprobs": True, "top_logprobs": 10**9}, "top_logprobs"),
    (CHAT, {"max_completion_tokens": 10**30}, "max_completion_tokens"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages.0.content.0.text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
    (CHAT, {"messages": [{"role": "user", "content": "\udc00"}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
]


def test_hostile_values_get_400_naming_the_field(server):
    before = metrics(server)["shardlm:prompt_tokens_total"]
    for path, fields, param in HOSTILE:
        body = {"model": MODEL, **({"prompt": "hi"} if path == CMPL else {"messages": MSGS}), **fields}
        err = assert_openai_error(post(server, path, body), 400, param)
        assert param.split(".")[0] in err["message"], err
    assert metrics(server)["shardlm:prompt_tokens_total"] == before  # none of them was queued
    assert_serving(server)


def test_extreme_but_valid_values_work(server):
    def text(**fields):
        r = post(server, CMPL, {"model": MODEL, "prompt": "The sky", "max_tokens": 4, "ignore_eos": True, **fields})
        assert r.status_code == 200, (fields, r.text)
        return [c["text"] for c in r.json()["choices"]]

    greedy = text(temperature=0)
    assert text(temperature=1e-30) == greedy  # below MIN_TEMPERATURE: greedy, not an overflow
    assert text(temperature=1.0, top_p=1e-300) == greedy  # a nucleus smaller than float32 keeps the top token
    assert text(temperature=1.0, top_k=1) == greedy
    assert len(text(temperature=1.0, seed=2**63 - 1, n=3)) == 3  # every completion's derived seed fits torch
    text(temperature=MAX_TEMPERATURE, seed=-(2**63), top_k=2**63 - 1, logprobs=20,
         stop=[f"stop{i}" for i in range(MAX_STOP)], stop_token_ids=list(range(600, 600 + MAX_STOP)))
    assert_serving(server)


def test_every_error_is_openai_shaped(server):
    assert_openai_error(httpx.post(server + "/v1/nowhere", json={}, headers=AUTH), 404)
    assert_openai_error(httpx.get(server + "/nowhere"), 404)
    err = assert_openai_error(httpx.get(server + CMPL, headers=AUTH), 405)
    assert "POST" in err["message"]
    assert_openai_error(httpx.post(server + CMPL, content=b"{not json", headers=AUTH), 400)
    assert_openai_error(httpx.post(server + CMPL, content=b"[1, 2]", headers=AUTH), 400)
    assert_openai_error(httpx.post(server + CMPL, content=b"\xff\xfe{}", headers=AUTH), 400)
    assert_openai_error(post(server, CMPL, {"prompt": "no model"}), 400, "model")
    assert_openai_error(post(server, CMPL, {"model": "other", "prompt": "x"}), 404, "model")
    assert_serving(server)


def test_api_key_scheme_is_case_blind_and_key_exact(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(server + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    for header in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
                   {"Authorization": KEY}, {"Authorization": "Bearer \u00e9".encode()}):
        err = assert_openai_error(httpx.get(server + "/v1/models", headers=header), 401)
        assert err["type"] == "authentication_error"


def test_body_limit_413_before_parsing(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # declares 1 GB, sends none of it
        s.sendall(f"POST {CMPL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {1 << 30}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"}}"):  # the JSON error, whole
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-body-bytes" in answer, answer

    def chunks():  # no Content-Length: the server counts the bytes as they come
        for _ in range(9):
            yield b" " * (1 << 20)

    r = httpx.post(server + CMPL, content=chunks(), headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert "content-length" not in r.request.headers
    assert "--max-request-body-bytes" in assert_openai_error(r, 413)["message"]
    assert_serving(server)


def test_requests_are_admitted_whole_and_clients_that_leave_are_aborted(server):
    long = {"model": MODEL, "prompt": "count", "max_tokens": 900, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as ac, AsyncExitStack() as streams:
            for _ in range(LIMIT - 3):
                r = await streams.enter_async_context(ac.stream("POST", server + CMPL, json=dict(long, stream=True)))
                assert r.status_code == 200
            before = metrics(server)["shardlm:prompt_tokens_total"]
            # 4 prompts do not fit in the 3 places left: refused whole, none queued
            r = await ac.post(server + CMPL, json=dict(long, prompt=["a", "b", "c", "d"]))
            assert_openai_error(r, 503)
            assert r.headers["retry-after"]
            assert metrics(server)["shardlm:prompt_tokens_total"] == before
            for _ in range(3):
                await streams.enter_async_context(ac.stream("POST", server + CMPL, json=dict(long, stream=True)))
            # full: a stream is refused with a 503 status, before any 200 goes out
            async with ac.stream("POST", server + CMPL, json=dict(long, stream=True)) as r:
                await r.aread()
                assert_openai_error(r, 503)
        # the streams' clients have gone: their requests are aborted and every place is free again
        for _ in range(20):
            r = await asyncio.to_thread(post, server, CMPL, dict(long, prompt=["x"] * LIMIT, max_tokens=2))
            if r.status_code == 200:
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"places still taken: {r.text}")

    asyncio.run(scenario())
    # a non-streaming request whose client gives up is aborted too: generation stops
    with pytest.raises(httpx.ReadTimeout):
        post(server, CMPL, long, timeout=1.0)
    time.sleep(1.0)  # the server notices the disconnect, the abort reaches the replica
    first = metrics(server)["shardlm:generation_tokens_total"]
    time.sleep(1.0)
    assert metrics(server)["shardlm:generation_tokens_total"] == first, "the abandoned request is still generating"
    assert_serving(server)


# ---- in-process: the API against a scripted engine ---------------------------------------------------
def output(text: str = "hi", finished: bool = False, error: str | None = None) -> RequestOutput:
    return RequestOutput("r", None, [1, 5], [CompletionOutput(0, text, [9] * len(text), None, None,
                                                              "stop" if finished else None)], finished, None, error)


class ScriptedEngine:
    """The part of AsyncEngine that build_app uses; generate() runs `script` (an async generator function)."""

    def __init__(self, script, tokenizer=None):
        self.engine = SimpleNamespace(tokenizer=tokenizer or ByteTokenizer(512, [2]), max_model_len=64,
                                      validate_prompt=lambda ids: None, validate_sampling=lambda params: None,
                                      source=SimpleNamespace(name="random:tiny", config=SimpleNamespace(vocab_size=512)))
        self.healthy = self.serving = self.ready = True
        self.replicas = []
        self.max_waiting_requests, self.on_step, self.stall_s = LIMIT, None, 60.0
        self.script, self.started, self.closed = script, asyncio.Event(), asyncio.Event()

    def check_capacity(self, count: int = 1) -> None:
        pass

    async def generate(self, prompt, ids, params):
        self.started.set()
        try:
            async for out in self.script(prompt):
                yield out
        finally:
            self.closed.set()


async def forever(prompt):
    yield output("partial")
    await asyncio.Event().wait()


async def finishes(prompt):
    yield output("done", finished=True)


async def call(app, path: str, body: dict | None, until=None, then: str | None = None):
    """One request through the ASGI app as uvicorn runs it -> (status, body). Once `until` is set,
    `then` happens: "cancel" (what uvicorn does when its graceful shutdown times out) or "hang up"."""
    data = b"" if body is None else json.dumps(body).encode()
    pending = [{"type": "http.request", "body": data, "more_body": False}]
    gone, sent = asyncio.Event(), []

    async def receive():
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET" if body is None else "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    task = asyncio.create_task(app(scope, receive, send))
    if until is not None:
        await asyncio.wait_for(until.wait(), 5)
        await asyncio.sleep(0.05)
        task.cancel() if then == "cancel" else gone.set()
    try:
        await asyncio.wait_for(task, 5)  # a cancelled request still ends normally, with its answer sent
    except RuntimeError:  # a bug: Starlette re-raises it once the 500 is out, for the server to log
        assert sent, "a bug got no answer"
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert gone.is_set() or not bodies[-1].get("more_body"), "the response was cut"
    return status, b"".join(m.get("body", b"") for m in bodies)


def events(raw: bytes) -> list:
    return [e[len("data: "):] if e.endswith("[DONE]") else json.loads(e[len("data: "):])
            for e in raw.decode().split("\n\n") if e]


CMPL_BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 8}


def test_shutdown_ends_running_requests_with_an_error():
    async def scenario():
        eng = ScriptedEngine(forever)
        app = build_app(eng, MODEL, max_body_bytes=1 << 20)
        status, raw = await call(app, CMPL, CMPL_BODY, eng.started, "cancel")
        assert status == 503 and json.loads(raw)["error"]["type"] == "server_error"
        await asyncio.wait_for(eng.closed.wait(), 5)  # the generation was aborted
        eng = ScriptedEngine(forever)
        app = build_app(eng, MODEL, max_body_bytes=1 << 20)
        status, raw = await call(app, CMPL, dict(CMPL_BODY, stream=True), eng.started, "cancel")
        *first, err, done = events(raw)
        assert status == 200 and first and "shut down" in err["error"]["message"] and done == "[DONE]"
        await asyncio.wait_for(eng.closed.wait(), 5)

    asyncio.run(scenario())


def test_engine_failures_and_failed_requests_reach_the_client_in_openai_shape():
    async def dies(prompt):
        yield output("partial")
        raise EngineDead("the server is shutting down")

    async def fails(prompt):
        yield output("partial")
        yield output("partial", finished=True, error="sampling failed with temperature=nan; change these values")

    async def bug(prompt):
        raise RuntimeError("boom")
        yield

    async def scenario():
        for script, status, kind, words in [(dies, 503, "server_error", "shutting down"),
                                            (fails, 400, "invalid_request_error", "temperature=nan"),
                                            (bug, 500, "server_error", "internal")]:
            app = build_app(ScriptedEngine(script), MODEL, max_body_bytes=1 << 20)
            for path, body in [(CMPL, CMPL_BODY), (CHAT, {"model": MODEL, "messages": MSGS})]:
                got, raw = await call(app, path, body)
                assert got == status and json.loads(raw)["error"]["type"] == kind and words in raw.decode()
                got, raw = await call(app, path, dict(body, stream=True))
                *_, err, done = events(raw)
                assert got == 200 and err["error"]["type"] == kind and words in err["error"]["message"]
                assert done == "[DONE]"

    asyncio.run(scenario())


def test_a_failing_prompt_aborts_the_others_of_its_request():
    closed = []

    async def second_fails(prompt):
        try:
            yield output("partial")
            if prompt == "b":
                raise EngineDead("replica 0 failed")
            await asyncio.Event().wait()
        finally:
            closed.append(prompt)

    async def scenario():
        app = build_app(ScriptedEngine(second_fails), MODEL, max_body_bytes=1 << 20)
        status, _ = await call(app, CMPL, dict(CMPL_BODY, prompt=["a", "b", "c"]))
        assert status == 503
        for _ in range(50):  # the others are cancelled, which aborts them
            if sorted(closed) == ["a", "b", "c"]:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"still running: {closed}")

    asyncio.run(scenario())


def test_a_client_that_hangs_up_aborts_its_request():
    async def scenario():
        for body in (CMPL_BODY, dict(CMPL_BODY, stream=True)):
            eng = ScriptedEngine(forever)
            await call(build_app(eng, MODEL, max_body_bytes=1 << 20), CMPL, body, eng.started, "hang up")
            await asyncio.wait_for(eng.closed.wait(), 5)

    asyncio.run(scenario())


def test_tokenising_leaves_the_event_loop_free():
    entered, release, encoded = threading.Event(), threading.Event(), threading.Event()

    class SlowTokenizer(ByteTokenizer):
        def encode(self, text):
            entered.set()
            release.wait(5)
            encoded.set()
            return super().encode(text)

    async def scenario():
        app = build_app(ScriptedEngine(finishes, SlowTokenizer(512, [2])), MODEL, max_body_bytes=1 << 20)
        slow = asyncio.create_task(call(app, CMPL, CMPL_BODY))
        await asyncio.to_thread(entered.wait, 5)
        status, _ = await call(app, "/health", None)
        assert status == 200 and not encoded.is_set(), "/health waited for the tokenizer"
        release.set()
        assert (await slow)[0] == 200

    asyncio.run(scenario())


def test_a_taken_port_fails_before_the_model_loads(monkeypatch, capsys):
    """`serve` binds its port first: another server on it is one line naming the port, and no model load"""
    import socket

    import shardlm.server.main as server_main
    from shardlm.entrypoints.cli import main

    def must_not_load(*a, **k):
        raise AssertionError("the engine started before the port was checked")

    monkeypatch.setattr(server_main, "AsyncEngine", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "random:tiny-llama", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "Traceback" not in err


def test_bench_serve_without_a_server_is_one_line_naming_the_url(capsys):
    import socket

    from shardlm.entrypoints.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["bench", "serve", "--base-url", url, "--model", "m", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no server answers at {url}" in err and "--base-url" in err, err


def test_bench_serve_summary_table():
    from shardlm.entrypoints.bench_serve import summary_table

    row = {"mean": 10.0, "p50": 9.0, "p90": 12.0, "p99": 20.0}
    text = summary_table({"completed": 9, "failed": 1, "duration_s": 3.0, "requests_per_s": 3.0,
                          "base_url": "http://h:1", "output_tok_per_s": 1234.5, "output_tokens": 3700,
                          "errors": {"ReadError: boom": 1}, "ttft_ms": row, "tpot_ms": row, "itl_ms": row,
                          "e2e_ms": row})
    lines = text.splitlines()
    assert lines[0].startswith("requests   9 completed, 1 failed in 3.0 s") and "1,234 tok/s" in lines[1]
    assert "1 x ReadError: boom" in text and lines[-4].startswith("TTFT ms") and lines[-1].split()[-1] == "20.0"


def test_tokenize_detokenize_version_and_models():
    """vLLM's /tokenize (text or a conversation), /detokenize, /version; /v1/models names max_model_len"""
    from shardlm import __version__

    async def scenario():
        app = build_app(ScriptedEngine(finishes), MODEL, max_body_bytes=1 << 20)
        tok = ByteTokenizer(512, [2])
        status, raw = await call(app, "/tokenize", {"model": MODEL, "prompt": "hé"})
        assert status == 200 and json.loads(raw) == {"count": len(tok.encode("hé")), "max_model_len": 64, "tokens": tok.encode("hé")}
        msgs = [{"role": "user", "content": "hi"}]
        _, with_turn = await call(app, "/tokenize", {"messages": msgs})
        _, without = await call(app, "/tokenize", {"messages": msgs, "add_generation_prompt": False})
        assert json.loads(with_turn)["tokens"] == tok.apply_chat_template(msgs)
        assert json.loads(without)["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=False)
        status, raw = await call(app, "/detokenize", {"tokens": tok.encode("hé")})
        assert status == 200 and json.loads(raw) == {"prompt": "hé"}
        for path, body, param in (("/detokenize", {"tokens": [600]}, "tokens"),
                                  ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                                  ("/tokenize", {"model": "other", "prompt": "a"}, "model")):
            status, raw = await call(app, path, body)
            assert status in (400, 404) and json.loads(raw)["error"]["param"] == param, raw
        status, raw = await call(app, "/version", None)
        assert status == 200 and json.loads(raw) == {"version": __version__}
        status, raw = await call(app, "/v1/models", None)
        assert json.loads(raw)["data"][0]["max_model_len"] == 64

    asyncio.run(scenario())


def test_cli_version(capsys):
    from shardlm import __version__
    from shardlm.entrypoints.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"shardlm {__version__}"


def test_malformed_tool_and_format_fields_are_400s():
    """values that once reached a 500: a json_schema that is not an object, a fed-back tool call whose
    function is not an object, a lone surrogate in /tokenize"""
    async def scenario():
        app = build_app(ScriptedEngine(finishes), MODEL, max_body_bytes=1 << 20)
        msgs = [{"role": "user", "content": "hi"}]
        bad_call = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": "x"}]}]
        for path, body, param in (
                (CHAT, {"model": MODEL, "messages": msgs, "response_format": {"type": "json_schema",
                                                                               "json_schema": "x"}}, "response_format"),
                (CHAT, {"model": MODEL, "messages": msgs + bad_call}, "messages.1.tool_calls"),
                ("/tokenize", {"prompt": "\ud800"}, "prompt")):
            status, raw = await call(app, path, body)
            assert status == 400 and json.loads(raw)["error"]["param"] == param, raw

    asyncio.run(scenario())
