"""`shardlm serve`: the OpenAI-compatible server with its engine replicas."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from contextlib import asynccontextmanager
from dataclasses import replace

from ..engine.arg_utils import EngineArgs
from ..engine.kv_cache import SERVE_TOKEN_BUDGET
from .async_engine import AsyncEngine
from .tools import PARSERS, parser

log = logging.getLogger("shardlm.serve")


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model_tag", nargs="?", default=None, help="model (same forms as --model)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="engine replicas (each tp ranks)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: the model argument)")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="requests in flight beyond which new ones get 503 + Retry-After")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="tool_choice auto: find tool calls in the model's text (needs --tool-call-parser)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="how this model writes tool calls: hermes (Hermes, Qwen 2.5+), llama3_json (Llama 3.1+)")
    p.add_argument("--max-request-body-bytes", type=int, default=8 << 20,
                   help="largest request body taken; a larger one gets 413 before it is parsed (default 8 MiB)")
    return p


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (uvicorn listens on it once the engine is up); a port another process holds
    is a ValueError naming it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"--host {host!r} is not an address of this machine ({exc})") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? "
                         f"pick another --port)") from None
    return sock


def run_serve(args: argparse.Namespace, engine_args: EngineArgs) -> int:
    import uvicorn

    from .api import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be a positive number, got {args.max_request_body_bytes}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(sorted(PARSERS))})")
    tool_parser = parser(args.tool_call_parser) if args.enable_auto_tool_choice else None
    if engine_args.max_num_batched_tokens is None:  # a server keeps decodes flowing: short prefill chunks
        engine_args = replace(engine_args, max_num_batched_tokens=SERVE_TOKEN_BUDGET)
    sock = listen_socket(args.host, args.port)  # before the model loads: a taken port fails at once
    engine = AsyncEngine(engine_args, data_parallel_size=args.data_parallel_size,
                         max_waiting_requests=args.max_waiting_requests)
    for rep in engine.replicas:
        e = rep.engine
        log.info("replica %d: tp=%d, KV cache %d blocks x %d = %d tokens per rank; max_model_len %d -> at most "
                 "%.1f full-length sequences at once", rep.index, e.layout.tp, e.stats().blocks.num_blocks,
                 e.args.block_size, e.kv_capacity_tokens, e.max_model_len, e.kv_capacity_tokens / e.max_model_len)
    name = args.served_model_name or engine_args.model or engine.engine.source.name

    @asynccontextmanager
    async def lifespan(_app):
        yield
        log.info("shutting down: stopping engine replicas")
        engine.shutdown()

    app = build_app(engine, name, args.api_key, max_body_bytes=args.max_request_body_bytes, tool_parser=tool_parser)
    app.router.lifespan_context = lifespan
    log.info("serving %s on http://%s:%d", name, args.host, sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=30))
    fatal: list[BaseException] = []

    def give_up(exc: BaseException) -> None:  # every replica gave up (a crash loop): stop serving, exit 1
        log.error("no replica is left running (%s); stopping the server", exc)
        fatal.append(exc)
        server.should_exit = True

    engine.on_fatal = give_up
    # uvicorn turns SIGTERM into a graceful shutdown, then re-raises it once done; this handler
    # absorbs that re-raise so a clean SIGTERM shutdown exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    return 1 if fatal else 0


