"""The executor notices a dead or hung worker group fast, ends it at once, and lets only its own workers in.

Worker groups are started directly (Executor), so these tests do not depend on the engine's recovery;
SHARDLM_FAULT_INJECT (worker/faults.py) makes a chosen rank die or stall at a chosen step.
"""

import logging
import os
import signal
import socket
import struct
import threading
import time
import tracemalloc

import pytest
from conftest import worker_pids

from shardlm import LLM, SamplingParams
from shardlm.common import wire
from shardlm.common.layout import ParallelLayout
from shardlm.common.messages import AllocateKV, SeqPlan, StepPlan, WorkerOptions
from shardlm.common.model_source import resolve_model
from shardlm.engine.executor import Executor, WorkerError, WorkerHung
from shardlm.worker import faults

TINY = "random:tiny-llama"
BLOCK = 16


def _start(step_timeout_s: float = 30.0, generation: int = 0) -> Executor:
    source = resolve_model(TINY)
    opts = WorkerOptions(dtype="float32", device="cpu", max_model_len=64, block_size=BLOCK,
                         gpu_memory_utilization=0.9, cpu_kv_cache_bytes=1 << 20, profile_tokens=64, cpu_threads=1,
                         stage_layers=[(0, source.config.num_hidden_layers)], max_num_seqs=4,
                         max_seq_len_to_capture=64, cuda_graphs=False)
    ex = Executor(ParallelLayout(tp=2), source, opts, step_timeout_s=step_timeout_s, generation=generation)
    ex.call(AllocateKV(8))
    return ex


def _steps(ex: Executor, n: int) -> list[int]:
    """A prompt, then decode steps: n steps in all, one sequence in block 0; the tokens sampled."""
    tokens, out = [5, 6, 7, 8], []
    start = 0
    for _ in range(n):
        ex.submit(StepPlan([SeqPlan(0, tokens, start, [0], sample=True)]))
        start += len(tokens)
        tokens = [ex.collect().tokens[0].token]
        out.append(tokens[0])
    return out


def _listening(pid: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.append(cols[1].rsplit(":", 1)[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_a_stalled_rank_is_reported_by_the_step_deadline(monkeypatch):
    monkeypatch.setenv("SHARDLM_FAULT_INJECT", "rank=1,step=3,point=step,action=stall")
    before = worker_pids()
    ex = _start(step_timeout_s=1.0)
    try:
        assert all(addr in LOOPBACK for p in ex.procs for addr in _listening(p.pid))  # gloo; no TCPStore
        assert oct(os.stat(ex._store_dir).st_mode & 0o777) == "0o700"
        assert ex.step_deadline_s(4) == 10.0  # a group's first step (a long prefill?) gets 10 x step_timeout_s
        _steps(ex, 2)
        assert 1.0 <= ex.step_deadline_s(1) < ex.step_deadline_s(10_000)  # larger steps get longer
        ex.submit(StepPlan([SeqPlan(0, [9], 5, [0], sample=True)]))
        t0 = time.monotonic()
        with pytest.raises(WorkerHung, match=r"rank 0 \(the output rank\) did not answer a step of 1 tokens within "
                                             r"[\d.]+ s.*ranks \[1\] are stopped.*raise step_timeout_s") as info:
            ex.collect()
        waited = time.monotonic() - t0
        assert info.value.ranks == [0] and info.value.deadline_s >= 1.0
        assert info.value.deadline_s - 0.1 < waited < info.value.deadline_s + 1.0
    finally:
        t0 = time.monotonic()
        ex.kill()
    assert time.monotonic() - t0 < 2.0
    assert worker_pids() <= before
    assert not os.path.exists(ex._store_dir)


def test_a_killed_rank_is_named_and_the_next_generation_runs_clean(monkeypatch):
    monkeypatch.setenv("SHARDLM_FAULT_INJECT", "rank=1,step=2,point=step,action=kill")
    before = worker_pids()
    ex = _start()
    try:
        ex.submit(StepPlan([SeqPlan(0, [5, 6, 7, 8], 0, [0], sample=True)]))
        ex.collect()
        ex.submit(StepPlan([SeqPlan(0, [9], 4, [0], sample=True)]))
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker rank 1 died \(exit code -9\)"):
            ex.collect()
        assert time.monotonic() - t0 < 2
    finally:
        ex.kill()
    replacement = _start(generation=1)  # the same environment, but no fault for a replacement group
    try:
        assert len(_steps(replacement, 3)) == 3
    finally:
        replacement.shutdown()
    assert worker_pids() <= before


def test_kill_is_fast_with_a_stopped_worker_mid_step():
    before = worker_pids()
    ex = _start()
    _steps(ex, 1)
    os.kill(ex.procs[1].pid, signal.SIGSTOP)
    ex.submit(StepPlan([SeqPlan(0, list(range(3, 40)), 1, [0, 1, 2], sample=True)]))  # rank 0 waits for rank 1
    t0 = time.monotonic()
    ex.kill()
    assert time.monotonic() - t0 < 2.0
    assert all(p.poll() is not None for p in ex.procs)
    assert worker_pids() <= before
    ex.shutdown()  # already closed: nothing to do


def _stranger(port: int, payload: bytes | None, answers: list, stop: threading.Event) -> None:
    """Connect before the workers do, send `payload` (None: nothing at all), and record whether the
    driver closed the connection."""
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            break
        except OSError:
            time.sleep(0.01)
    else:
        return
    with sock:
        if payload:
            sock.sendall(payload)
        sock.settimeout(15)
        try:
            answers.append(sock.recv(1))  # b"": closed by the driver
        except OSError as exc:
            answers.append(exc)


def test_strangers_on_the_driver_port_are_ignored(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hello = wire.encode({"type": "hello", "rank": 0, "token": "0" * 32, "pid": 1, "host": "x"})
    payloads = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # read as lengths: a 1.19 GB header
                hello,  # a hello with the wrong token
                wire.encode({"type": "hello", "rank": 1}),  # no token at all
                struct.pack("!IQ", 20, 1 << 40) + b"{}",  # a huge payload announced
                wire.encode(["not", "a", "dict"]),
                None]  # connects and says nothing
    answers: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_stranger, args=(port, p, answers, stop)) for p in payloads]
    for t in threads:
        t.start()
    try:
        with caplog.at_level(logging.WARNING, logger="shardlm.engine"):
            with LLM(TINY, tensor_parallel_size=2, driver_port=port) as llm:
                out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(out[0].outputs[0].token_ids) == 4
    assert len(answers) == len(payloads) and all(a == b"" or isinstance(a, OSError) for a in answers)
    reasons = "\n".join(r.getMessage() for r in caplog.records)
    for why in ("exceeds the limit of 1024 bytes", "wrong token", "not a worker's hello", "payload of 1099511627776",
                "no complete hello"):
        assert why in reasons


def test_a_frame_over_the_limits_raises_before_allocating():
    a, b = socket.socketpair()
    with a, b:
        tracemalloc.start()
        try:
            a.sendall(struct.pack("!IQ", 0xFFFFFFFF, 0))
            with pytest.raises(wire.FrameTooLarge, match="header of 4294967295 bytes exceeds the limit"):
                wire.recv(b)
            a.sendall(struct.pack("!IQ", 2, 1 << 36) + b"{}")
            with pytest.raises(wire.FrameTooLarge, match="payload of 68719476736 bytes exceeds the limit of 4096"):
                wire.recv(b, max_payload=4096)
            b.setblocking(False)
            a.sendall(struct.pack("!IQ", 1 << 30, 0))
            with pytest.raises(wire.FrameTooLarge):
                wire.FrameReader(b).read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


def test_frames_before_a_closed_connection_are_read_first():
    a, b = socket.socketpair()
    b.setblocking(False)
    a.sendall(wire.encode({"type": "error", "message": "boom"}) + wire.encode({"type": "x"}))
    a.close()
    reader = wire.FrameReader(b)
    assert [h["type"] for h, _ in reader.read()] == ["error", "x"]
    with pytest.raises(wire.ConnectionClosed):
        reader.read()
    b.close()


@pytest.mark.parametrize("spec, message", [
    ("rank=1,step=5,point=step", "must name exactly rank, step, point and action"),
    ("rank1,step=5,point=step,action=kill", "is not key=value"),
    ("rank=one,step=5,point=step,action=kill", "rank and step must be integers"),
    ("rank=1,step=0,point=step,action=kill", "steps count from 1"),
    ("rank=1,step=5,point=middle,action=kill", "point must be one of step, stage_send, all_to_all"),
    ("rank=1,step=5,point=step,action=explode", "action must be one of kill, stall"),
    ("rank=1,step=5,step=6,point=step,action=kill", "repeats a key"),
])
def test_a_fault_spec_that_does_not_parse_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=f"SHARDLM_FAULT_INJECT=.*{message}"):
        faults.parse(spec)


def test_a_bad_fault_spec_stops_the_workers_at_start(monkeypatch):
    assert faults.parse("rank=1, step=5, point=all_to_all, action=stall") == faults.Fault(1, 5, "all_to_all", "stall")
    monkeypatch.setenv("SHARDLM_FAULT_INJECT", "rank=2,step=1,point=step,action=kill")
    before = worker_pids()
    with pytest.raises(WorkerError, match=r"names rank 2, but the world has 2 ranks"):
        _start()
    assert worker_pids() <= before
