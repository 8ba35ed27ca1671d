"""Driver side of the worker processes: start them, send step plans, collect sampled tokens.

Workers connect back to a TCP socket the driver listens on. Locally the driver spawns one
process per rank; with `external_workers` it waits for workers started elsewhere (torchrun on
several nodes). A worker that reports an error, or whose connection drops, brings the whole run
down with its message: the remaining workers are killed, nothing is left behind.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

from ..common import wire
from ..common.layout import ParallelLayout
from ..common.messages import (
    Command,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerInit,
    WorkerOptions,
    WorkerReady,
)
from ..common.model_source import ModelSource


class WorkerError(RuntimeError):
    """A worker failed; the message says which rank and why."""


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Executor:
    def __init__(self, layout: ParallelLayout, model: ModelSource, opts: WorkerOptions,
                 external_workers: bool = False, driver_host: str = "127.0.0.1", driver_port: int = 0,
                 startup_timeout_s: float = 900.0, first_device: int = 0):
        self.layout = layout
        self.procs: list[subprocess.Popen] = []
        self.socks: dict[int, socket.socket] = {}
        self.ready: dict[int, WorkerReady] = {}
        self._closed = False
        self.listener = socket.create_server((driver_host, driver_port))
        self.listener.settimeout(1.0)
        address = f"{driver_host}:{self.listener.getsockname()[1]}"
        try:
            if external_workers:
                print(f"shardlm: waiting for {layout.world_size} workers: start them with "
                      f"SHARDLM_DRIVER={address} torchrun ... -m shardlm.worker.main", file=sys.stderr, flush=True)
                init_method = "env://"
            else:
                init_method = f"tcp://127.0.0.1:{_free_port()}"
                self._spawn(address, first_device)
            self._accept_all(startup_timeout_s)
            init = WorkerInit({"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep}, model, opts,
                              init_method)
            self._send_all(init)
            self.ready = {r: WorkerReady.decode({k: v for k, v in msg.items() if k != "type"}, {})
                          for r, msg in self._expect_all(WorkerReady.name, startup_timeout_s).items()}
        except BaseException:
            self.shutdown()
            raise

    # ---- process management -------------------------------------------------------------------
    def _spawn(self, address: str, first_device: int) -> None:
        # LOCAL_RANK picks the GPU: a data-parallel replica starts at its own first_device
        for rank in range(self.layout.world_size):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(first_device + rank),
                       WORLD_SIZE=str(self.layout.world_size),
                       SHARDLM_DRIVER=address)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "shardlm.worker.main"], env=env))

    def _check_procs(self) -> None:
        for rank, p in enumerate(self.procs):
            code = p.poll()
            if code is not None and code != 0:
                raise WorkerError(f"worker rank {rank} exited with code {code} before reporting an error")

    def _accept_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.socks) < self.layout.world_size:
            self._check_procs()
            if time.monotonic() > deadline:
                raise WorkerError(f"only {len(self.socks)} of {self.layout.world_size} workers connected "
                                  f"within {timeout_s:.0f} s")
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(30)  # a peer that connects but never says hello must not stall start-up
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                hello, _ = wire.recv(sock)
            except (OSError, ValueError) as exc:
                sock.close()
                raise WorkerError(f"a process connected to the driver port but sent no valid hello: {exc}") from None
            sock.settimeout(None)
            rank = int(hello["rank"])
            if rank in self.socks or not 0 <= rank < self.layout.world_size:
                sock.close()
                raise WorkerError(f"unexpected worker hello from rank {rank} (world size {self.layout.world_size})")
            self.socks[rank] = sock

    def _raise_from(self, rank: int, msg: dict[str, Any] | None) -> None:
        # a rank killed by a signal (OOM killer, segfault, kill -9) is the cause; the others only
        # report the broken collective after it. Ranks that raised exit 1 after sending their message.
        dead = [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None and p.returncode < 0]
        if msg is None and self.procs and self.procs[rank].poll() is not None:
            dead = [(rank, self.procs[rank].returncode)] + [d for d in dead if d[0] != rank]
        if dead:
            r, code = dead[0]
            after = f"; worker rank {rank} then reported: {msg.get('message', msg)}" if msg is not None and r != rank else ""
            raise WorkerError(f"worker rank {r} died (exit code {code}){after}")
        if msg is None:
            raise WorkerError(f"worker rank {rank} died (its connection closed)")
        raise WorkerError(f"worker rank {rank}: {msg.get('message', msg)}")

    def _expect_all(self, event: str, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        """One `event` message from every rank."""
        return {r: msg for r, (msg, _) in self._receive(set(self.socks), event, timeout_s).items()}

    def _recv_from(self, rank: int, event: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One `event` message from `rank`, while watching every other worker for errors or death."""
        return self._receive({rank}, event, None)[rank]

    def _receive(self, ranks: set[int], event: str, timeout_s: float | None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        socks = {s: r for r, s in self.socks.items()}
        got: dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        while len(got) < len(ranks):
            readable, _, _ = select.select(list(socks), [], [], 0.5)
            for s in readable:
                r = socks[s]
                try:
                    msg, arrays = wire.recv(s)
                except (wire.ConnectionClosed, OSError):
                    self._raise_from(r, None)
                if r not in ranks or msg.get("type") != event:
                    self._raise_from(r, msg)
                got[r] = (msg, arrays)
            if not readable:
                self._check_procs()
            if deadline is not None and time.monotonic() > deadline:
                missing = sorted(ranks - set(got))
                raise WorkerError(f"worker ranks {missing} did not answer within {timeout_s:.0f} s")
        return got

    # ---- messages ----------------------------------------------------------------------------
    def _send_all(self, msg: Any) -> None:
        for sock in self.socks.values():
            wire.send_message(sock, msg)

    def call(self, cmd: Command) -> dict[int, dict[str, Any]]:
        """Send `cmd` to every rank and return each rank's reply (the worker's handler decides what it holds)."""
        self._send_all(cmd)
        return {r: {k: v for k, v in m.items() if k not in ("type", "rank")}
                for r, m in self._expect_all(cmd.name).items()}

    def submit(self, plan: StepPlan) -> None:
        """Send one step plan to every rank. Plans run in submission order on every rank, so with
        pipeline stages several can be in flight; each gets exactly one reply (collect)."""
        self._send_all(plan)

    def collect(self) -> StepResult:
        """The output rank's reply to the oldest submitted plan: its sampled tokens."""
        msg, arrays = self._recv_from(self.layout.output_ranks()[0], StepResult.name)
        return StepResult.decode(msg, arrays)

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop every worker: ask nicely, then terminate, then kill. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for sock in self.socks.values():
            try:
                sock.settimeout(1.0)  # a worker stuck in a collective may never drain its socket
                wire.send_message(sock, Shutdown())
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for sock in self.socks.values():
            sock.close()
        self.listener.close()
