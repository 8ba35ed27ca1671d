"""The server keeps serving through dead and hung ranks: streams continue where they were, nothing is lost.

Real servers on the CPU (tiny random model, greedy): each request's text must equal what the same
server produced undisturbed, and the server must be ready again within a cold start plus 5 s.
"""

import json
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_server import start_server, stop_server

MODEL = "random:tiny-llama"
MAX_TOKENS = 16


def _prompt(i: int) -> list[int]:
    return [(7 * i + j) % 500 + 3 for j in range(3 + i % 9)]


def _body(i: int, stream: bool, model: str = MODEL) -> dict:
    return {"model": model, "prompt": _prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}


def _complete(base: str, i: int, model: str = MODEL) -> str:
    r = httpx.post(base + "/v1/completions", json=_body(i, False, model), timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _stream(base: str, i: int, first_chunk: threading.Event | None = None, model: str = MODEL) -> str:
    text = ""
    with httpx.stream("POST", base + "/v1/completions", json=_body(i, True, model), timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += event["choices"][0]["text"]
            if first_chunk is not None:
                first_chunk.set()
    return text


def _workers(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "shardlm.worker.main"], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _wait_ready(base: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready again within {timeout_s} s")


def _kill(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server():
    t0 = time.monotonic()
    proc, base = start_server(MODEL, "-tp", "2", "--step-timeout-s", "3")
    cold_start = time.monotonic() - t0
    yield proc, base, cold_start
    assert stop_server(proc) == 0


def _streams_through(proc, base: str, ids: range, fault) -> None:
    """Stream `ids` at once; once text flows, fault(worker pids); every stream must equal its undisturbed text."""
    expected = {i: _complete(base, i) for i in ids}
    started = threading.Event()
    with ThreadPoolExecutor(len(ids)) as pool:
        futures = {i: pool.submit(_stream, base, i, started) for i in ids}
        assert started.wait(60)
        fault(_workers(proc))
        got = {i: f.result() for i, f in futures.items()}
    assert got == expected


def test_streams_continue_through_a_killed_rank(server):
    proc, base, cold_start = server
    _streams_through(proc, base, range(6), lambda pids: _kill(pids[1]))
    assert _wait_ready(base, cold_start + 5) < cold_start + 5
    assert httpx.get(base + "/health").status_code == 200
    restarts = [line for line in httpx.get(base + "/metrics").text.splitlines()
                if line.startswith("shardlm:worker_restarts_total{")]
    assert restarts and float(restarts[0].rsplit(" ", 1)[1]) >= 1


def test_a_hung_rank_is_noticed_and_replaced(server):
    proc, base, cold_start = server
    t0 = time.monotonic()
    _streams_through(proc, base, range(6, 9), lambda pids: _kill(pids[0], signal.SIGSTOP))
    assert time.monotonic() - t0 < 3 + cold_start + 60  # undisturbed runs, the deadline, the restart
    _wait_ready(base, cold_start + 5)


def test_soak_twenty_kills_over_two_hundred_requests(server):
    proc, base, cold_start = server
    expected = {i: _complete(base, i) for i in range(20)}
    rng = random.Random(0)
    results: dict[int, str] = {}
    kills = 0
    with ThreadPoolExecutor(8) as pool:
        futures = {n: pool.submit(_complete, base, n % 20) for n in range(200)}
        for n in range(200):
            if n % 10 == 5:  # a kill every 10 requests, at a random moment
                time.sleep(rng.random() * 0.5)
                workers = _workers(proc)
                while len(workers) < 2:  # a group being replaced: kill one of the next
                    time.sleep(0.05)
                    workers = _workers(proc)
                _kill(rng.choice(workers))
                kills += 1
            results[n] = futures[n].result()
    assert kills == 20
    assert all(results[n] == expected[n % 20] for n in range(200))
    _wait_ready(base, cold_start + 5)


def test_a_replica_that_gives_up_hands_its_requests_to_the_other():
    """Two replicas, no restarts allowed: killing one replica's rank ends that replica for good, and the
    other finishes its requests from where they were."""
    proc, base = start_server(MODEL, "--data-parallel-size", "2", "--max-worker-restarts", "0")
    try:
        _streams_through(proc, base, range(6), lambda pids: _kill(pids[0]))
        _complete(base, 0)  # the survivor serves on (it asserts a 200)
        assert httpx.get(base + "/ready").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


FAULT_POINTS = {  # name: (serve arguments, fault in the first worker group)
    "pipeline transfer": (("random:tiny-llama", "-pp", "2"), "rank=0,step=4,point=stage_send,action=kill"),
    "moe all-to-all": (("random:tiny-mixtral", "-tp", "2", "--enable-expert-parallel"),
                       "rank=1,step=4,point=all_to_all,action=kill"),
}


@pytest.mark.parametrize("case", list(FAULT_POINTS))
def test_streams_continue_through_a_fault_inside_a_transfer(case, monkeypatch):
    """A rank dies inside a pipeline transfer or an MoE all-to-all (SHARDLM_FAULT_INJECT) while six greedy
    streams run: each ends with the text an undisturbed server gave, and the server is ready again."""
    args, fault = FAULT_POINTS[case]
    model = args[0]
    proc, base = start_server(*args)
    try:
        expected = {i: _complete(base, i, model) for i in range(6)}
    finally:
        assert stop_server(proc) == 0
    monkeypatch.setenv("SHARDLM_FAULT_INJECT", fault)
    t0 = time.monotonic()
    proc, base = start_server(*args)
    cold_start = time.monotonic() - t0
    try:
        with ThreadPoolExecutor(6) as pool:
            got = dict(zip(range(6), pool.map(lambda i: _stream(base, i, model=model), range(6))))
        assert got == expected
        _wait_ready(base, cold_start + 5)
        restarts = [line for line in httpx.get(base + "/metrics").text.splitlines()
                    if line.startswith("shardlm:worker_restarts_total{") and 'cause="died"' in line]
        assert restarts and float(restarts[0].rsplit(" ", 1)[1]) == 1
    finally:
        assert stop_server(proc) == 0
