"""Recovery of a real server, timed from outside as a client sees it: `shardlm serve MODEL -tp TP` (CPU by
default), greedy chat streams in flight, one rank killed (SIGKILL) or stopped (SIGSTOP) once text flows.

    python scripts/serve_recovery.py [--model smollm2-135m] [--tp 2] [--streams 8] [--step-timeout-s 10]
                                     [--json out.json]

For each fault: seconds from the signal to /ready answering 503 (the failure noticed: at once for a kill,
at the step deadline for a stop) and to /ready answering 200 again; the recovery (noticed to ready) beside
the cold start (launch to the first /ready 200); whether every stream ended with the text an undisturbed
run gave (lost = a stream that failed or differs). The issue's CPU target: recovery within the cold start
plus 5 s, a stop noticed within the deadline, nothing lost.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

QUESTIONS = ["Hi!", "Explain tensor parallelism in one sentence.", "Name three prime numbers.",
             "What is a GPU?", "Write a haiku about the sea.", "How do vaccines work?",
             "Give me a tip for learning Python.", "Why is the sky blue?"]
FAULTS = [("kill rank 1", 1, signal.SIGKILL), ("kill rank 0", 0, signal.SIGKILL), ("stop rank 1", 1, signal.SIGSTOP)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(args, i: int, stream: bool) -> dict:
    return {"model": args.model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens, "temperature": 0.0, "stream": stream}


def _answer(base: str, args, i: int) -> str:
    r = httpx.post(base + "/v1/chat/completions", json=_body(args, i, False), timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _stream(base: str, args, i: int, flowing: threading.Event) -> str | None:
    """The streamed text, or None if the stream ended with an error."""
    text = ""
    with httpx.stream("POST", base + "/v1/chat/completions", json=_body(args, i, True), timeout=600) as r:
        if r.status_code != 200:
            return None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return None
            text += event["choices"][0]["delta"].get("content") or ""
            flowing.set()
    return text


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(predicate, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"gave up after {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _rank_pids(server: subprocess.Popen) -> dict[int, int]:
    out = subprocess.run(["pgrep", "-P", str(server.pid), "-f", "shardlm.worker.main"], capture_output=True, text=True)
    ranks = {}
    for pid in map(int, out.stdout.split()):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        ranks[rank] = pid
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--step-timeout-s", type=float, default=10.0)
    ap.add_argument("--json")
    args = ap.parse_args()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_recovery-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "shardlm", "serve", args.model, "-tp", str(args.tp),
                               "--step-timeout-s", str(args.step_timeout_s), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    result = {"model": args.model, "tp": args.tp, "streams": args.streams, "max_tokens": args.max_tokens,
              "step_timeout_s": args.step_timeout_s, "cpus": os.cpu_count(), "faults": []}
    try:
        cold = _wait(lambda: _ready(base) or server.poll() is not None, 600)
        if server.poll() is not None:
            raise SystemExit(f"the server exited; its log: {log.name}")
        result["cold_start_s"] = round(cold + 0.0, 2)
        expected = [_answer(base, args, i) for i in range(args.streams)]
        for name, rank, sig in FAULTS:
            pids = _rank_pids(server)
            flowing = threading.Event()
            with ThreadPoolExecutor(args.streams) as pool:
                futures = [pool.submit(_stream, base, args, i, flowing) for i in range(args.streams)]
                flowing.wait(600)
                t_signal = time.monotonic()
                os.kill(pids[rank], sig)
                _wait(lambda: not _ready(base), 120)
                not_ready = time.monotonic() - t_signal
                _wait(lambda: _ready(base), 600)
                back = time.monotonic() - t_signal
                got = [f.result() for f in futures]
            lost = sum(g != e for g, e in zip(got, expected))
            # a stop is noticed at the step deadline; from then on it is replaced like a kill
            recovery = back - not_ready if sig == signal.SIGSTOP else back
            row = {"fault": name, "not_ready_after_s": round(not_ready, 2), "ready_again_after_s": round(back, 2),
                   "recovery_s": round(recovery, 2), "target_s": round(cold + 5, 2), "lost": lost,
                   "errors": sum(g is None for g in got)}
            row["met"] = recovery < cold + 5 and lost == 0 and (sig != signal.SIGSTOP or not_ready < 2 * args.step_timeout_s)
            result["faults"].append(row)
            print(json.dumps(row), flush=True)
        restarts = [line for line in httpx.get(base + "/metrics").text.splitlines()
                    if line.startswith("shardlm:worker_restarts_total{")]
        result["restarts_metric"] = restarts
    finally:
        server.send_signal(signal.SIGTERM)
        result["exit_code"] = server.wait(120)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
