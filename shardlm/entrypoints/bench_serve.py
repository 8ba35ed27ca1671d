"""`shardlm bench serve`: load a running server with Poisson arrivals and report latency percentiles.

Prompts are random token ids (so any model, random weights included, gets exactly the asked
lengths); prompt and output lengths are drawn uniformly in [len*(1-r), len*(1+r)]. Every request
streams, so TTFT is the time to the first token event; TPOT is (E2E - TTFT) / (tokens - 1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import statistics
import time
from typing import Any

from ..common.config import check_output_path
from ..planner.serving import PCTS, percentile


def make_workload(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int, seed: int):
    rng = random.Random(seed)

    def draw(mean: int) -> int:
        return max(1, int(rng.uniform(mean * (1 - range_ratio), mean * (1 + range_ratio))))

    return [([rng.randrange(3, vocab) for _ in range(draw(input_len))], draw(output_len)) for _ in range(n)]


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int, headers: dict) -> dict[str, Any]:
    """One streamed request; a connection that breaks counts as a failed request (status 0)."""
    import httpx

    try:
        return await _stream(client, url, model, prompt, max_tokens, headers)
    except httpx.HTTPError as exc:
        return {"ok": False, "status": 0, "error": f"{type(exc).__name__}: {exc}"}


async def _stream(client, url: str, model: str, prompt: list[int], max_tokens: int, headers: dict) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, 0
    arrivals: list[float] = []  # when each chunk with text came
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        status = resp.status_code
        if status != 200:
            await resp.aread()
            return {"ok": False, "status": status}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"ok": False, "status": 500}
            if event.get("choices"):
                arrivals.append(time.perf_counter())
                if ttft is None:
                    ttft = arrivals[-1] - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft or e2e, "e2e": e2e, "tokens": tokens, "prompt": len(prompt),
            "tpot": (e2e - (ttft or e2e)) / (tokens - 1) if tokens > 1 else 0.0,
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def check_server(base_url: str, api_key: str | None) -> dict[str, Any] | None:
    """Fail in one line naming the URL when nothing answers there (before any request is timed). The server's
    engine settings where it tells them (shardlm's /engine), for `plan --validate`; else None."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise ValueError(f"no server answers at {base_url} ({type(exc).__name__}: {exc or 'no reply'}): start one "
                         f"(shardlm serve ...) or point --base-url at it") from None
    if resp.status_code == 401:
        raise ValueError(f"the server at {base_url} wants an API key: pass --api-key")
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await client.get(base_url.rstrip("/") + "/engine", headers=headers)
    return resp.json() if resp.status_code == 200 else None


SERVER_COUNTERS = ("shardlm:prefix_cache_queries_total", "shardlm:prefix_cache_hits_total",
                   *(f"shardlm:{h}_seconds_{part}" for h in ("time_to_first_token", "request_queue_time",
                                                             "request_prefill_time") for part in ("sum", "count")))
"""the counters of a shardlm server's /metrics bench serve reads before and after a run (every replica's summed)"""


async def server_counters(base_url: str, api_key: str | None) -> dict[str, float] | None:
    """SERVER_COUNTERS from the server's /metrics; None where it does not have them all (not shardlm's)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.get(base_url.rstrip("/") + "/metrics", headers=headers)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    counts: dict[str, float] = {}
    for sample in (s for family in text_string_to_metric_families(resp.text) for s in family.samples):
        if sample.name in SERVER_COUNTERS:
            counts[sample.name] = counts.get(sample.name, 0.0) + sample.value
    return counts if len(counts) == len(SERVER_COUNTERS) else None


def server_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server saw of one run, from its counters before and after: the prompt tokens its prefix cache
    was asked for and held, and the engine's own mean TTFT, queueing and prefill (from a request's arrival
    in the engine: no HTTP, no streaming), ms"""
    d = {k: after[k] - before[k] for k in SERVER_COUNTERS}
    means = {}
    for h, key in (("time_to_first_token", "ttft_mean"), ("request_queue_time", "queue_mean"),
                   ("request_prefill_time", "prefill_mean")):
        n = d[f"shardlm:{h}_seconds_count"]
        means[key] = 1e3 * d[f"shardlm:{h}_seconds_sum"] / n if n else 0.0
    return {"prefix_cache": {"query_tokens": d["shardlm:prefix_cache_queries_total"],
                             "hit_tokens": d["shardlm:prefix_cache_hits_total"]}, "engine_ms": means}


async def run(base_url: str, model: str, rate: float, workload, api_key: str | None, seed: int,
              max_concurrency: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Send the workload (Poisson arrivals at `rate`, 0: all at once); with max_concurrency, at most that many
    requests in flight (rate 0 and a limit: a closed loop of that many streams). progress: a bar of the
    finished requests on stderr."""
    import httpx
    from tqdm import tqdm

    rng = random.Random(seed + 1)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(workload), unit="req", desc="bench serve", disable=not progress, leave=False)

    async def one(prompt, max_tokens):
        async with limit:
            sent = time.perf_counter() - start
            result = await _one(client, url, model, prompt, max_tokens, headers)
        bar.update()
        return {**result, "sent_s": sent}

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        tasks, start = [], time.perf_counter()
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(one(prompt, max_tokens)))
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    ok = [r for r in results if r["ok"]]
    out: dict[str, Any] = {"base_url": base_url, "model": model, "request_rate": rate,
                           "max_concurrency": max_concurrency, "num_requests": len(results),
                           "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
                           "output_tokens": sum(r["tokens"] for r in ok),
                           "output_tok_per_s": sum(r["tokens"] for r in ok) / duration,
                           "requests_per_s": len(ok) / duration}
    for key in ("ttft", "tpot", "e2e"):
        vals = [r[key] * 1e3 for r in ok]
        out[f"{key}_ms"] = {"mean": statistics.mean(vals) if vals else 0.0, **{f"p{q}": percentile(vals, q) for q in PCTS}}
    gaps = [g * 1e3 for r in ok for g in r["itl"]]  # every gap between two chunks of a stream
    out["itl_ms"] = {"mean": statistics.mean(gaps) if gaps else 0.0, **{f"p{q}": percentile(gaps, q) for q in PCTS}}
    out["per_request"] = [{k: v for k, v in r.items() if k != "itl"} for r in ok]
    errors = [r.get("error") or f"HTTP {r['status']}" for r in results if not r["ok"]]
    out["errors"] = dict(collections.Counter(errors).most_common(5))  # the commonest failures, counted
    return out


def summary_table(result: dict[str, Any]) -> str:
    """What a run measured, for a terminal (the whole record goes to --json)."""
    lines = [f"requests   {result['completed']} completed, {result['failed']} failed in {result['duration_s']:.1f} s "
             f"({result['requests_per_s']:.2f} req/s) against {result['base_url']}",
             f"output     {result['output_tok_per_s']:,.0f} tok/s ({result['output_tokens']:,} tokens)"]
    for error, count in result.get("errors", {}).items():
        lines.append(f"failed     {count} x {error}")
    lines.append(f"{'':10} {'mean':>9} " + " ".join(f"{'p' + str(q):>9}" for q in PCTS))
    for key, name in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms"), ("e2e_ms", "E2E ms")):
        row = result[key]
        lines.append(f"{name:10} {row['mean']:>9.1f} " + " ".join(f"{row[f'p{q}']:>9.1f}" for q in PCTS))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "end-to-end")):
        vals = sorted(r[key] * 1e3 for r in result["per_request"])
        ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))])
        for q in PCTS:
            ax.axvline(result[f"{key}_ms"][f"p{q}"], ls=":", color="grey")
        ax.set(xlabel=f"{title} (ms)", ylabel="fraction of requests", title=f"{title}  p50/p90/p99 dotted")
    fig.suptitle(f"{result['model']} at {result['request_rate']} req/s: {result['output_tok_per_s']:.0f} output tok/s, "
                 f"{result['completed']}/{result['num_requests']} completed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_serve_bench_parser(kinds) -> None:
    p = kinds.add_parser("serve", help="Poisson load against a running `shardlm serve` (TTFT/TPOT/E2E percentiles)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server to load (shardlm serve, vLLM, ...)")
    p.add_argument("--model", required=True, help="model name the server serves")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    p.add_argument("--request-rate", type=float, default=4.0, help="mean arrivals per second (0: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (with --request-rate 0: a closed loop of this many streams)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (mean)")
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate per request (mean; ignore_eos)")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len*(1 +- ratio)")
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0, help="of the prompts, their lengths and the arrival times (runs "
                   "against one server with the same seed send the same prompts, which its prefix cache then "
                   "serves: give each run its own seed for cold prefills)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--plot", default=None, help="write a PNG of the latency distributions")


def run_serve_bench(args) -> int:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 2 or not 0 <= args.range_ratio < 1:
        raise ValueError("need --num-prompts >= 1, --input-len >= 1, --output-len >= 2, 0 <= --range-ratio < 1")
    if args.request_rate < 0:
        raise ValueError(f"--request-rate must be >= 0, got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    check_output_path("--json", args.json)
    check_output_path("--plot", args.plot)
    workload = make_workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.vocab_size,
                             args.seed)
    engine = asyncio.run(check_server(args.base_url, args.api_key))
    before = asyncio.run(server_counters(args.base_url, args.api_key))
    result = asyncio.run(run(args.base_url, args.model, args.request_rate, workload, args.api_key, args.seed,
                             args.max_concurrency, progress=True))
    result["engine"] = engine  # (None from a server that does not tell: plan --validate cannot predict it)
    after = asyncio.run(server_counters(args.base_url, args.api_key)) if before is not None else None
    if after is not None:  # (plan --validate names a run the prefix cache served, and what the engine took)
        result.update(server_view(before, after))
    print(summary_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot and result["completed"]:
        plot(result, args.plot)
    return 0 if result["failed"] == 0 else 1
