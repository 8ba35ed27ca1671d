"""Engines for the server: each data-parallel replica's LLMEngine runs in its own thread.

The asyncio event loop never runs a step: it hands requests to a replica's thread and awaits
outputs on a per-request asyncio queue. A replica thread steps its engine while it has work and
sleeps on an Event otherwise. The engine's forward passes happen in the worker processes; the
thread mostly waits on their sockets, with the GIL released.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.arg_utils import EngineArgs
from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import RequestOutput


class Overloaded(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineDead(RuntimeError):
    """A replica failed (a worker died); its requests end with this error."""


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class Replica:
    """One data-parallel replica: an engine, its thread, and its inbox."""

    index: int
    engine: LLMEngine
    inbox: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)
    pending: dict[str, _Pending] = field(default_factory=dict)
    error: BaseException | None = None
    thread: threading.Thread | None = None
    submitted: int = 0
    """requests routed here over the server's life"""

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self.pending)


class AsyncEngine:
    def __init__(self, args: EngineArgs, data_parallel_size: int = 1, max_waiting_requests: int = 1024,
                 on_step=None):
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self.max_waiting_requests = max_waiting_requests
        self.on_step = on_step  # called in the replica thread after each step: on_step(replica, outputs)
        self.replicas: list[Replica] = []
        self._ids = itertools.count()
        self._stopping = False
        try:
            for r in range(data_parallel_size):
                per_replica = args.tensor_parallel_size * args.pipeline_parallel_size  # GPUs of one replica
                engine = LLMEngine(replace(args, first_device=args.first_device + r * per_replica))
                self.replicas.append(Replica(r, engine))
            # one limit for every replica (each caps it by its own KV capacity), checked once at the API
            limit = min(rep.engine.max_model_len for rep in self.replicas)
            for rep in self.replicas:
                rep.engine.max_model_len = limit
        except BaseException:
            self.shutdown()
            raise
        for rep in self.replicas:
            rep.thread = threading.Thread(target=self._loop, args=(rep,), name=f"shardlm-replica-{rep.index}",
                                          daemon=True)
            rep.thread.start()

    @property
    def engine(self) -> LLMEngine:
        """Replica 0's engine (tokenizer, limits and config are the same on every replica)."""
        return self.replicas[0].engine

    @property
    def healthy(self) -> bool:
        return not self._stopping and all(r.error is None for r in self.replicas)

    # ---- replica thread ----------------------------------------------------------------------
    def _loop(self, rep: Replica) -> None:
        try:
            self._run_replica(rep)
        except BaseException as exc:  # a dead worker, or a bug: fail this replica's requests, never hang them
            self._fail(rep, exc)
        else:
            self._fail(rep, None)

    def _run_replica(self, rep: Replica) -> None:
        engine = rep.engine
        while not self._stopping:
            with rep.lock:
                inbox, rep.inbox = rep.inbox, []
            for kind, item in inbox:
                if kind == "add":
                    rid, prompt, ids, params = item
                    try:
                        engine.add_request(rid, prompt, ids, params)
                    except ValueError as exc:  # validated before queueing; kept so a thread never dies of it
                        self._deliver(rep, rid, exc)
                elif kind == "abort":
                    engine.abort_request(item)
            if not engine.has_unfinished_requests():
                rep.wake.wait(timeout=0.5)
                rep.wake.clear()
                continue
            outputs = engine.step()
            if self.on_step is not None:
                self.on_step(rep, outputs)
            for out in outputs:
                self._deliver(rep, out.request_id, out)

    def _fail(self, rep: Replica, exc: BaseException | None) -> None:
        """End every pending request of a replica that stopped (exc: why; None: server shutdown)."""
        with rep.lock:
            rep.error = exc or EngineDead("the server is shutting down")
            pending = list(rep.pending)
        reason = f"replica {rep.index} failed: {exc}" if exc else "the server is shutting down"
        for rid in pending:
            self._deliver(rep, rid, EngineDead(reason))

    def _deliver(self, rep: Replica, rid: str, item: Any) -> None:
        pending = rep.pending.get(rid)
        if pending is None:
            return
        final = isinstance(item, BaseException) or item.finished
        if final:
            rep.pending.pop(rid, None)
        pending.loop.call_soon_threadsafe(pending.queue.put_nowait, item)

    # ---- asyncio side ------------------------------------------------------------------------
    def _pick(self) -> Replica:
        live = [r for r in self.replicas if r.error is None]
        if not live or self._stopping:
            raise EngineDead("no healthy replica is running")
        return min(live, key=lambda r: r.load)

    def check_capacity(self) -> None:
        """Raise Overloaded (the server answers 503 + Retry-After) when the in-flight limit is reached."""
        in_flight = sum(r.load for r in self.replicas)
        if in_flight >= self.max_waiting_requests:
            raise Overloaded(f"{in_flight} requests are in flight (limit {self.max_waiting_requests})")

    async def generate(self, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's output each time it gains tokens; the last has finished=True.

        Leaving the iterator early (a client disconnect) aborts the request and frees its KV blocks.
        """
        self.engine.validate_prompt(prompt_ids)
        self.check_capacity()
        rep = self._pick()
        rep.submitted += 1
        rid = f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with rep.lock:  # the replica's failure path takes the same lock: a request is either failed or queued
            if rep.error is not None:
                raise EngineDead(f"replica {rep.index} is not running: {rep.error}")
            rep.pending[rid] = _Pending(asyncio.get_running_loop(), queue)
            rep.inbox.append(("add", (rid, prompt, prompt_ids, params)))
        rep.wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                rep.pending.pop(rid, None)
                with rep.lock:
                    rep.inbox.append(("abort", rid))
                rep.wake.set()

    def shutdown(self) -> None:
        """Stop the replica threads and their workers."""
        self._stopping = True
        for rep in self.replicas:
            rep.wake.set()
        for rep in self.replicas:
            if rep.thread is not None:
                rep.thread.join(timeout=30)
            rep.engine.shutdown()
