"""Engines for the server: each data-parallel replica's LLMEngine runs in its own thread.

The asyncio event loop never runs a step: it hands requests to a replica's thread and awaits
outputs on a per-request asyncio queue. A replica thread steps its engine while it has work and
sleeps on an Event otherwise. The engine's forward passes happen in the worker processes; the
thread mostly waits on their sockets, with the GIL released.

A replica whose worker group fails is repaired inside its engine (LLMEngine replaces the group and
its requests resume where they were); meanwhile new requests go to the other replicas. A replica
that gives up (a crash loop) fails its requests; when none is left, `on_fatal` tells the server to exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.arg_utils import EngineArgs
from ..engine.llm_engine import LLMEngine
from ..engine.recovery import Restart
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import RequestOutput

log = logging.getLogger("shardlm.serve")

TICK_S = 0.5
"""an idle replica thread wakes this often (metrics that change while idle, e.g. GPU temperature)"""


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


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
    last_progress: float = field(default_factory=time.monotonic)
    """when the engine last finished a step or was last seen idle"""

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self.pending)

    @property
    def recovering(self) -> bool:
        return self.engine.recovery.recovering

    @property
    def alive(self) -> bool:
        return self.error is None

    def ready(self, stall_s: float) -> bool:
        """Can serve now: running, not replacing its workers, and not stuck (a step within stall_s)."""
        return self.alive and not self.recovering and time.monotonic() - self.last_progress < stall_s


class AsyncEngine:
    def __init__(self, args: EngineArgs, data_parallel_size: int = 1, max_waiting_requests: int = 1024,
                 on_step=None):
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self.max_waiting_requests = max_waiting_requests
        # callbacks, each run in a replica's thread: after each step on_step(replica, outputs); every TICK_S
        # and after steps on_tick(replica); after a worker group was replaced on_restart(replica, Restart)
        self.on_step = on_step
        self.on_tick = None
        self.on_restart = None
        self.on_fatal = None  # (any thread) every replica has given up: on_fatal(exception)
        # a replica with work that finishes no step for this long is not ready (beyond the step deadline,
        # after which its engine replaces the workers itself)
        self.stall_s = 2 * args.step_timeout_s
        self.replicas: list[Replica] = []
        self._ids = itertools.count()
        self._owner: dict[str, Replica] = {}  # request id -> the replica running it
        self._stopping = False
        try:
            for r in range(data_parallel_size):
                per_replica = args.tensor_parallel_size * args.pipeline_parallel_size  # GPUs of one replica
                engine = LLMEngine(replace(args, first_device=args.first_device + r * per_replica))
                rep = Replica(r, engine)
                engine.recovery.listeners.append(lambda restart, rep=rep: self._restarted(rep, restart))
                self.replicas.append(rep)
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
        """Liveness: not stopping, some replica running, and no worker group being replaced."""
        return (not self._stopping and any(r.alive for r in self.replicas)
                and not any(r.alive and r.recovering for r in self.replicas))

    @property
    def serving(self) -> bool:
        """Takes requests: not stopping and some replica running (a request sent to a replica that is
        replacing its workers waits for the new group)."""
        return not self._stopping and any(r.alive for r in self.replicas)

    @property
    def ready(self) -> bool:
        """Readiness: not stopping, and some replica can take a request now."""
        return not self._stopping and any(r.ready(self.stall_s) for r in self.replicas)

    # ---- replica thread ----------------------------------------------------------------------
    def _loop(self, rep: Replica) -> None:
        try:
            self._run_replica(rep)
        except BaseException as exc:  # a dead worker, or a bug: fail this replica's requests, never hang them
            self._fail(rep, exc)
        else:
            self._fail(rep, None)

    def _callback(self, name: str, *args: Any) -> None:
        """A monitoring callback; its failure is logged, it never stops the replica."""
        fn = getattr(self, name)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - metrics must not take the engine down
            log.exception("%s failed", name)

    def _restarted(self, rep: Replica, restart: Restart) -> None:
        rep.last_progress = time.monotonic()
        self._callback("on_restart", rep, restart)

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
                        self._deliver(rep, [(rid, exc)])
                elif kind == "adopt":
                    engine.adopt_request(*item)
                elif kind == "abort":
                    engine.abort_request(item)
            if not engine.has_unfinished_requests():
                rep.last_progress = time.monotonic()
                self._callback("on_tick", rep)
                rep.wake.wait(timeout=TICK_S)
                rep.wake.clear()
                continue
            outputs = engine.step()
            rep.last_progress = time.monotonic()
            self._callback("on_step", rep, outputs)
            self._callback("on_tick", rep)
            self._deliver(rep, [(out.request_id, out) for out in outputs])

    def _fail(self, rep: Replica, exc: BaseException | None) -> None:
        """A replica stopped (exc: why; None: server shutdown). Its requests move to a running replica,
        which finishes them from where they were; with none left they end with EngineDead."""
        with rep.lock:
            rep.error = exc or EngineDead("the server is shutting down")
        if exc is not None:
            log.error("replica %d stopped: %s", rep.index, exc)
            self._hand_over(rep)
        with rep.lock:
            pending = list(rep.pending)
        reason = f"replica {rep.index} failed: {exc}" if exc else "the server is shutting down"
        self._deliver(rep, [(rid, EngineDead(reason)) for rid in pending])
        if exc is not None and not any(r.alive for r in self.replicas) and self.on_fatal is not None:
            self.on_fatal(exc)

    def _hand_over(self, rep: Replica) -> None:
        """Move the failed replica's unfinished requests (tokens so far included) to the running replicas:
        those its engine holds, and those still in its inbox (sent while its last step ran)."""
        with rep.lock:
            inbox, rep.inbox = rep.inbox, []
        aborted = {item for kind, item in inbox if kind == "abort"}
        moves = [("adopt", taken) for taken in rep.engine.take_requests()]
        moves += [(kind, item) for kind, item in inbox if kind != "abort"]
        for kind, item in moves:
            rid = item[0]
            with rep.lock:
                pending = rep.pending.pop(rid, None)
            if pending is None or rid in aborted:  # its client has gone
                continue
            while True:
                try:
                    target = self._pick()
                except EngineDead:
                    with rep.lock:  # _fail ends it with the replica's error
                        rep.pending[rid] = pending
                    break
                with target.lock:  # (the same lock as target's own failure path: queued there, or not at all)
                    if target.error is not None:
                        continue
                    target.pending[rid] = pending
                    self._owner[rid] = target
                    target.inbox.append((kind, item))
                target.wake.set()
                log.info("request %s moved from replica %d to replica %d", rid, rep.index, target.index)
                break

    def _deliver(self, rep: Replica, items: list[tuple[str, Any]]) -> None:
        """Hand (request id, output or exception) pairs to their requests' queues: one wake-up of each event
        loop per call (a step's outputs for hundreds of streams), not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for rid, item in items:
            pending = rep.pending.get(rid)
            if pending is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                rep.pending.pop(rid, None)
                self._owner.pop(rid, None)
            by_loop.setdefault(pending.loop, []).append((pending.queue, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    # ---- asyncio side ------------------------------------------------------------------------
    def _pick(self) -> Replica:
        """The running replica with the fewest requests, preferring those not replacing their workers."""
        live = [r for r in self.replicas if r.alive]
        if not live or self._stopping:
            raise EngineDead("no healthy replica is running")
        return min(live, key=lambda r: (r.recovering, r.load))

    def check_capacity(self, count: int = 1) -> None:
        """Raise Overloaded (the server answers 503 + Retry-After) when `count` more requests would pass
        the in-flight limit (a multi-prompt request is checked whole, before any of it is queued)."""
        in_flight = sum(r.load for r in self.replicas)
        if in_flight + count > self.max_waiting_requests:
            raise Overloaded(f"{in_flight} requests are in flight and this one adds {count} "
                             f"(limit {self.max_waiting_requests})")

    async def generate(self, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's output each time it gains tokens; the last has finished=True.

        Leaving the iterator early (a client disconnect) aborts the request and frees its KV blocks.
        """
        self.engine.validate_prompt(prompt_ids)  # (the sampling values were checked by the caller: build_app)
        self.check_capacity()
        rep = self._pick()
        rep.submitted += 1
        rid = f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with rep.lock:  # the replica's failure path takes the same lock: a request is either failed or queued
            if rep.error is not None:
                raise EngineDead(f"replica {rep.index} is not running: {rep.error}")
            rep.pending[rid] = _Pending(asyncio.get_running_loop(), queue)
            self._owner[rid] = rep
            rep.inbox.append(("add", (rid, prompt, prompt_ids, params)))
        rep.wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                # a consumer that fell behind gets the newest output at once: each is a snapshot of the whole
                # request so far, so the ones in between add nothing (the stream sends their text together)
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                rep = self._owner.pop(rid, rep)  # (a failed replica may have handed it over)
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
