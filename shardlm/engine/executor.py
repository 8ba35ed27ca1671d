"""Driver side of the worker processes: start them, send step plans, collect sampled tokens.
(Past 400 lines: start-up, the authenticated accept, the non-blocking sends and the deadline-watching
receive all manage the same processes and sockets.)

Workers connect back to a TCP socket the driver listens on and prove they are ours with the
per-launch token (SHARDLM_DRIVER_TOKEN) in their hello; any other connection is closed and ignored.
Locally the driver spawns one process per rank, whose torch.distributed rendezvous is a file in a
private folder (nothing listens on the network for it) and whose gloo/NCCL sockets listen on loopback
(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME=lo unless set); with `external_workers` it waits for workers
started elsewhere (torchrun on several nodes, which brings its own rendezvous).

A worker that reports an error, or whose connection drops, raises `WorkerError`; an output rank that
does not answer a step by its deadline (a rank stopped, or hung in a collective) raises `WorkerHung`.
The sockets are non-blocking: nothing the driver does waits forever on a worker. `kill()` ends a
group at once; the engine then starts a fresh one (generation 1, 2, ...).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..common import envs, wire
from ..common.layout import ParallelLayout
from ..common.messages import (
    Command,
    Shutdown,
    StepMasks,
    StepPlan,
    StepResult,
    WorkerInit,
    WorkerOptions,
    WorkerReady,
)
from ..common.model_source import ModelSource

log = logging.getLogger("shardlm.engine")

KILLED_GRACE_S = 0.5
"""a worker's error waits this long for another rank's death to show (the cause, then named first)"""
HELLO_TIMEOUT_S = 5.0
"""a connection to the driver's port must send its whole hello within this"""
HELLO_MAX_BYTES = 1024
"""a hello's header is rank, token, pid and host name: anything longer is not one of ours"""
MAX_PENDING_HELLOS = 64
"""connections waiting to say hello at once (more: the oldest is closed), so a flood cannot exhaust file descriptors"""
STEP_DEADLINE_FACTOR = 20
"""a step may take this many times the recent median step (scaled to its tokens) before it counts as hung"""
FIRST_STEP_FACTOR = 10
"""a group's first step (no step times known yet; maybe a long prefill) may take this many step_timeout_s"""
STEP_HISTORY = 32
"""answered steps whose times set the deadline"""
CALL_TIMEOUT_S = 900.0
"""default time a command may take (AllocateKV captures the decode graphs; Probe times collectives)"""
REAP_TIMEOUT_S = 10.0
"""kill() waits this long for killed workers to exit (a GPU process frees its memory as it exits)"""


class WorkerError(RuntimeError):
    """A worker failed; the message says which rank and why."""


class WorkerHung(WorkerError):
    """Workers did not answer in time: a rank is stopped or stuck (in a collective, in a device call)."""

    def __init__(self, message: str, ranks: list[int], deadline_s: float):
        super().__init__(message)
        self.ranks = ranks
        """the ranks whose answer did not come"""
        self.deadline_s = deadline_s
        """the time they had, in seconds"""


def _wait(readers: list[socket.socket], writers: list[socket.socket],
          timeout_s: float) -> tuple[list[socket.socket], list[socket.socket]]:
    """The sockets ready to read (data, end of stream, or an error) and to write, within timeout_s.
    poll, not select: a server process may hold more than select's 1024 file descriptors."""
    masks: dict[int, int] = {}
    by_fd: dict[int, socket.socket] = {}
    for sock, mask in [(r, select.POLLIN) for r in readers] + [(w, select.POLLOUT) for w in writers]:
        masks[sock.fileno()] = masks.get(sock.fileno(), 0) | mask
        by_fd[sock.fileno()] = sock
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    readable, writable = [], []
    for fd, events in poller.poll(math.ceil(max(0.0, timeout_s) * 1000)):
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            readable.append(by_fd[fd])
        if events & select.POLLOUT:
            writable.append(by_fd[fd])
    return readable, writable


class Executor:
    """One worker group: its processes (or external workers) and a socket to each.

    step_timeout_s: the floor of the step deadline (default 30 s). The oldest submitted step must be
    answered within max(step_timeout_s, 20 x the median of the group's recent step times, scaled up by
    the step's tokens over the median step's) from the moment it became the oldest; a group's first
    step gets 10 x step_timeout_s. `generation`: 0 for a run's first group, 1, 2, ... for the groups
    that replace a failed one (only generation 0 gets SHARDLM_FAULT_INJECT).
    """

    def __init__(self, layout: ParallelLayout, model: ModelSource, opts: WorkerOptions,
                 external_workers: bool = False, driver_host: str = "127.0.0.1", driver_port: int = 0,
                 startup_timeout_s: float = 900.0, first_device: int = 0, step_timeout_s: float = 30.0,
                 generation: int = 0):
        self.layout = layout
        self.step_timeout_s = step_timeout_s
        self.generation = generation
        self.procs: list[subprocess.Popen] = []
        self.socks: dict[int, socket.socket] = {}
        self.ready: dict[int, WorkerReady] = {}
        self._closed = False
        self._store_dir: str | None = None  # the file rendezvous of spawned workers
        self._readers: dict[int, wire.FrameReader] = {}
        self._inbox: dict[int, deque[tuple[dict[str, Any], dict[str, np.ndarray]]]] = {}
        self._outbox: dict[int, deque[memoryview]] = {}
        self._rank_of: dict[socket.socket, int] = {}
        self._in_flight: deque[int] = deque()  # tokens of each submitted, unanswered step, oldest first
        self._oldest_since = 0.0  # when the oldest step in flight became the oldest
        self._history: deque[tuple[float, int]] = deque(maxlen=STEP_HISTORY)  # (exec_s, tokens) of answered steps
        self.listener = socket.create_server((driver_host, driver_port))
        self.listener.setblocking(False)
        address = f"{driver_host}:{self.listener.getsockname()[1]}"
        try:
            if external_workers:
                preset = envs.driver_token(required=False)
                self.token = preset or secrets.token_hex(16)
                shown = "$SHARDLM_DRIVER_TOKEN (as set here)" if preset else self.token
                print(f"shardlm: waiting for {layout.world_size} workers: start them with "
                      f"SHARDLM_DRIVER={address} SHARDLM_DRIVER_TOKEN={shown} torchrun ... -m shardlm.worker.main",
                      file=sys.stderr, flush=True)
                init_method = "env://"
            else:
                self.token = secrets.token_hex(16)
                self._store_dir = tempfile.mkdtemp(prefix="shardlm-rendezvous-")  # mode 0700: ours alone
                init_method = f"file://{os.path.join(self._store_dir, 'store')}"
                self._spawn(address, first_device)
            self._accept_all(startup_timeout_s)
            self.listener.close()  # every rank is here: nothing else may connect
            init = WorkerInit({"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep}, model, opts,
                              init_method)
            self._send_all(init)
            self.ready = {r: WorkerReady.decode({k: v for k, v in msg.items() if k != "type"}, {})
                          for r, (msg, _) in self._receive(set(self.socks), WorkerReady.name, startup_timeout_s).items()}
        except BaseException:
            self.kill()
            raise

    # ---- process management -------------------------------------------------------------------
    def _spawn(self, address: str, first_device: int) -> None:
        # LOCAL_RANK picks the GPU: a data-parallel replica starts at its own first_device
        for rank in range(self.layout.world_size):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(first_device + rank),
                       WORLD_SIZE=str(self.layout.world_size),
                       SHARDLM_DRIVER=address, SHARDLM_DRIVER_TOKEN=self.token)
            # every rank is on this host: gloo's and NCCL's sockets listen on loopback only (NCCL's default
            # is the host's network interface), unless the user chose an interface
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            env.setdefault("NCCL_SOCKET_IFNAME", "lo")
            if self.generation > 0:  # a replacement group runs clean
                env.pop("SHARDLM_FAULT_INJECT", None)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "shardlm.worker.main"], env=env))

    def _check_procs(self) -> None:
        for rank, p in enumerate(self.procs):
            code = p.poll()
            if code is not None and code != 0:
                raise WorkerError(f"worker rank {rank} exited with code {code} before reporting an error")

    def _killed(self) -> list[tuple[int, int]]:
        """(rank, exit code) of the local workers a signal ended"""
        return [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None and p.returncode < 0]

    def _stopped_ranks(self) -> list[int]:
        """Local workers the kernel has stopped (SIGSTOP, a debugger): state T or t in /proc."""
        stopped = []
        for rank, p in enumerate(self.procs):
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state in ("T", "t"):
                stopped.append(rank)
        return stopped

    # ---- start-up: who may connect ------------------------------------------------------------
    def _accept_all(self, timeout_s: float) -> None:
        """Take one authenticated connection per rank. Anything else that connects (a port scan, a
        stale worker of another launch, garbage) is closed and logged; start-up goes on waiting."""
        deadline = time.monotonic() + timeout_s
        pending: dict[socket.socket, tuple[float, wire.FrameReader, str]] = {}
        try:
            while len(self.socks) < self.layout.world_size:
                self._check_procs()
                now = time.monotonic()
                if now > deadline:
                    raise WorkerHung(f"only {len(self.socks)} of {self.layout.world_size} workers connected within "
                                     f"{timeout_s:.0f} s", sorted(set(range(self.layout.world_size)) - set(self.socks)),
                                     timeout_s)
                for sock, (late, _, peer) in list(pending.items()):
                    if now > late:
                        del pending[sock]
                        self._reject(sock, peer, f"no complete hello within {HELLO_TIMEOUT_S:.0f} s")
                readable, _ = _wait([self.listener, *pending], [], 0.5)
                for s in readable:
                    if s is self.listener:
                        self._take_connections(pending)
                        continue
                    _, reader, peer = pending[s]
                    try:
                        frames = reader.read()
                    except (OSError, ValueError) as exc:  # closed, reset, oversized, not JSON
                        del pending[s]
                        self._reject(s, peer, str(exc) or type(exc).__name__)
                        continue
                    if frames:
                        del pending[s]
                        self._admit(s, peer, frames[0][0])
        finally:
            for sock, (_, _, peer) in pending.items():
                self._reject(sock, peer, "no complete hello before every worker had connected")

    def _take_connections(self, pending: dict[socket.socket, tuple[float, wire.FrameReader, str]]) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            if len(pending) >= MAX_PENDING_HELLOS:  # a flood of connections: the oldest waited longest
                oldest = next(iter(pending))
                self._reject(oldest, pending.pop(oldest)[2], "too many connections waiting to say hello")
            pending[sock] = (time.monotonic() + HELLO_TIMEOUT_S, wire.FrameReader(sock, HELLO_MAX_BYTES, 0),
                             f"{addr[0]}:{addr[1]}")

    def _reject(self, sock: socket.socket, peer: str, why: str) -> None:
        sock.close()
        log.warning("shardlm: closed a connection to the driver port from %s: %s", peer, why)

    def _admit(self, sock: socket.socket, peer: str, hello: dict[str, Any]) -> None:
        token, rank = hello.get("token"), hello.get("rank")
        if hello.get("type") != "hello" or not isinstance(token, str) or type(rank) is not int:
            return self._reject(sock, peer, "its first message is not a worker's hello")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return self._reject(sock, peer, "a hello with the wrong token (a worker of another launch? under "
                                            "torchrun, export the SHARDLM_DRIVER_TOKEN this driver printed)")
        if rank in self.socks or not 0 <= rank < self.layout.world_size:
            sock.close()
            raise WorkerError(f"unexpected worker hello from rank {rank} (world size {self.layout.world_size}): "
                              f"start exactly {self.layout.world_size} workers, ranks 0 .. {self.layout.world_size - 1}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks[rank] = sock
        self._rank_of[sock] = rank
        self._readers[rank] = wire.FrameReader(sock)
        self._inbox[rank] = deque()
        self._outbox[rank] = deque()

    # ---- receiving ----------------------------------------------------------------------------
    def _raise_from(self, rank: int, msg: dict[str, Any] | None) -> None:
        # a rank killed by a signal (OOM killer, segfault, kill -9) is the cause; the others only
        # report the broken collective after it. Ranks that raised exit 1 after sending their message.
        if msg is None and self.procs:  # its socket closed as it exited: let the kernel finish, for its exit code
            try:
                self.procs[rank].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        dead = self._killed()
        if not dead and msg is not None and self.procs:
            # a peer's report of the broken collective can come before the kernel has reaped the rank that died
            deadline = time.monotonic() + KILLED_GRACE_S
            while not dead and time.monotonic() < deadline:
                time.sleep(0.02)
                dead = self._killed()
        if msg is None and self.procs and self.procs[rank].poll() is not None:
            dead = [(rank, self.procs[rank].returncode)] + [d for d in dead if d[0] != rank]
        if dead:
            r, code = dead[0]
            after = f"; worker rank {rank} then reported: {msg.get('message', msg)}" if msg is not None and r != rank else ""
            raise WorkerError(f"worker rank {r} died (exit code {code}){after}")
        if msg is None:
            raise WorkerError(f"worker rank {rank} died (its connection closed)")
        raise WorkerError(f"worker rank {rank}: {msg.get('message', msg)}")

    def _pump(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the sockets: send what is queued, read what arrived (into the inboxes).
        False when nothing arrived."""
        writers = [self.socks[r] for r, queued in self._outbox.items() if queued]
        readable, writable = _wait(list(self._rank_of), writers, timeout_s)
        if writable:
            self._flush()
        for s in readable:
            rank = self._rank_of[s]
            try:
                self._inbox[rank].extend(self._readers[rank].read())
            except (OSError, ValueError):  # closed, reset, or a frame that is not ours: the rank is gone
                self._raise_from(rank, None)
        return bool(readable)

    def _receive(self, ranks: set[int], event: str, timeout_s: float, since: float | None = None,
                 hung: Callable[[], str] | None = None) -> dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """One `event` message from each of `ranks`, while watching every worker for errors or death.
        WorkerHung (its text from `hung`, else a generic one) when they have not all answered timeout_s
        after `since` (a monotonic time; default now)."""
        deadline = (time.monotonic() if since is None else since) + timeout_s
        got: dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        while True:
            for r, inbox in self._inbox.items():
                if inbox:
                    if r not in ranks or r in got or inbox[0][0].get("type") != event:
                        self._raise_from(r, inbox[0][0])
                    got[r] = inbox.popleft()
            if len(got) == len(ranks):
                return got
            now = time.monotonic()
            if now >= deadline:
                missing = sorted(ranks - set(got))
                raise WorkerHung(hung() if hung is not None else
                                 f"worker ranks {missing} did not answer {event!r} within {timeout_s:.0f} s"
                                 f"{self._stopped_note()}", missing, timeout_s)
            if not self._pump(min(0.5, deadline - now)):
                self._check_procs()

    def _stopped_note(self) -> str:
        stopped = self._stopped_ranks()
        return f"; worker ranks {stopped} are stopped (SIGSTOP)" if stopped else ""

    # ---- sending ------------------------------------------------------------------------------
    def _send_all(self, msg: Any) -> None:
        """Queue `msg` for every rank and send what the sockets take now; the rest goes out while
        waiting for answers (a worker busy with a long step, or stopped, never blocks the driver)."""
        frame = memoryview(wire.encode_message(msg))
        for queued in self._outbox.values():
            queued.append(frame)
        self._flush()

    def _flush(self) -> None:
        for rank, queued in self._outbox.items():
            sock = self.socks[rank]
            while queued:
                try:
                    sent = sock.send(queued[0])
                except BlockingIOError:
                    break
                except OSError:  # the worker is gone: its socket's end of stream reports it
                    queued.clear()
                    break
                if sent == len(queued[0]):
                    queued.popleft()
                else:
                    queued[0] = queued[0][sent:]

    # ---- the API ------------------------------------------------------------------------------
    def call(self, cmd: Command, timeout_s: float = CALL_TIMEOUT_S) -> dict[int, dict[str, Any]]:
        """Send `cmd` to every rank and return each rank's reply (the worker's handler decides what it holds);
        WorkerHung when some rank has not answered within timeout_s."""
        self._send_all(cmd)
        replies = self._receive(set(self.socks), cmd.name, timeout_s)
        return {r: {k: v for k, v in m.items() if k not in ("type", "rank")} for r, (m, _) in replies.items()}

    def submit(self, plan: StepPlan) -> None:
        """Send one step plan to every rank. Plans run in submission order on every rank, so with
        pipeline stages several can be in flight; each gets exactly one reply (collect)."""
        if not self._in_flight:
            self._oldest_since = time.monotonic()
        self._in_flight.append(plan.num_tokens)
        self._send_all(plan)

    def send_masks(self, masks: StepMasks) -> None:
        """The masks of the plan submitted last (StepPlan.masks_follow), to the output rank: the one that
        samples. It waits for them after that step's forward, so they go out before the next plan."""
        self._outbox[self.layout.output_ranks()[0]].append(memoryview(wire.encode_message(masks)))
        self._flush()

    def step_deadline_s(self, tokens: int) -> float:
        """Seconds a step of `tokens` tokens may take once it is the oldest in flight."""
        if not self._history:
            return FIRST_STEP_FACTOR * self.step_timeout_s
        typical_s = statistics.median(s for s, _ in self._history)
        typical_tokens = statistics.median(t for _, t in self._history)
        return max(self.step_timeout_s, STEP_DEADLINE_FACTOR * typical_s * max(1.0, tokens / max(1.0, typical_tokens)))

    def collect(self) -> StepResult:
        """The output rank's reply to the oldest submitted plan: its sampled tokens. WorkerHung when it
        has not come by the step's deadline (step_deadline_s after the step became the oldest)."""
        if not self._in_flight:
            raise RuntimeError("collect() without a submitted step: submit() a StepPlan first")
        out, tokens = self.layout.output_ranks()[0], self._in_flight[0]
        limit = self.step_deadline_s(tokens)
        msg, arrays = self._receive({out}, StepResult.name, limit, self._oldest_since,
                                    lambda: self._hung_message(out, tokens, limit))[out]
        result = StepResult.decode(msg, arrays)
        self._in_flight.popleft()
        self._oldest_since = time.monotonic()
        self._history.append((result.exec_s, tokens))
        return result

    def _hung_message(self, out: int, tokens: int, limit: float) -> str:
        rule = (f"a group's first step: {FIRST_STEP_FACTOR} x step_timeout_s={self.step_timeout_s:g}" if not self._history
                else f"max(step_timeout_s={self.step_timeout_s:g}, {STEP_DEADLINE_FACTOR} x the recent median step "
                     f"time, scaled to the step's tokens)")
        return (f"worker rank {out} (the output rank) did not answer a step of {tokens} tokens within {limit:.1f} s "
                f"({rule}){self._stopped_note() or ': a rank is stuck'}; if steps this long are expected, raise "
                f"step_timeout_s")

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop every worker: ask them to exit, give them grace_s, then kill the rest. Safe to call twice."""
        if self._closed:
            return
        deadline = time.monotonic() + grace_s
        self._send_all(Shutdown())
        try:
            while any(self._outbox.values()) and time.monotonic() < deadline:
                self._pump(min(0.1, deadline - time.monotonic()))
        except WorkerError:
            pass  # a worker already gone: the rest are stopped below either way
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker at once, reap them, close the sockets: no worker can delay it (a stopped
        one dies too). External workers see their socket close and exit. Safe to call twice."""
        self._closed = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        deadline = time.monotonic() + REAP_TIMEOUT_S
        for rank, p in enumerate(self.procs):
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("shardlm: worker rank %d (pid %d) had not exited %.0f s after SIGKILL", rank, p.pid,
                            REAP_TIMEOUT_S)
        for sock in self.socks.values():
            sock.close()
        self.listener.close()
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
