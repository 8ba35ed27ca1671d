"""`shardlm bench latency`: TTFT and TPOT per batch size for one layout, and where a decode step's time goes."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from ..common.config import check_output_path
from ..engine.arg_utils import EngineArgs
from ..engine.kv_cache import MAX_STEP_TOKENS, token_budget
from ..engine.sampling_params import SamplingParams
from ..engine.stragglers import slowest_rank
from ..planner.serving import percentile
from .llm import LLM


def run_batch(llm: LLM, batch: int, input_len: int, output_len: int, seed: int = 0,
              profile_after: int | None = None) -> dict[str, Any]:
    """Submit `batch` random prompts at once and time every step until all finish."""
    engine = llm.engine
    rng = random.Random(seed)
    vocab = engine.source.config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(batch)]
    engine.stage_stats(reset=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{seed}-{i}", None, p, params)
    durations, exec_s, profile, profile_s = [], [], None, 0.0
    first: dict[str, float] = {}  # request id -> time of its first token
    done: dict[str, float] = {}
    last: dict[str, float] = {}  # request id -> time of its latest token
    gaps: list[float] = []  # every inter-token latency of every request
    while engine.has_unfinished_requests():
        if profile_after is not None and profile is None and len(durations) == profile_after:
            p0 = time.perf_counter()
            profile = engine.profile_step()
            profile_s = time.perf_counter() - p0  # kept out of every timing below
        s0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        durations.append(now - s0)
        exec_s.append(engine.stats().last_step_exec_s)
        for out in outputs:
            t = now - profile_s
            first.setdefault(out.request_id, t)
            if out.request_id in last:
                gaps.append(t - last[out.request_id])
            last[out.request_id] = t
            if out.finished:
                done[out.request_id] = t
    e2e = time.perf_counter() - t0 - profile_s
    # per request: TTFT from submission, TPOT over its own decode (right under pipelining too)
    ttfts = [first[r] - t0 for r in first]
    tpots = [(done[r] - first[r]) / (output_len - 1) for r in done] if output_len > 1 else [0.0]
    steps = durations[1:] or [0.0]
    out = {
        "batch": batch, "input_len": input_len, "output_len": output_len,
        "ttft_ms": max(ttfts) * 1e3, "tpot_ms": statistics.mean(tpots) * 1e3,
        "tpot_p50_ms": percentile(tpots, 50) * 1e3, "tpot_p99_ms": percentile(tpots, 99) * 1e3,
        # inter-token latency over every token of every request: the typical step and its tail
        "itl_p50_ms": percentile(gaps, 50) * 1e3, "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "step_p50_ms": percentile(steps, 50) * 1e3, "step_p99_ms": percentile(steps, 99) * 1e3,
        "e2e_s": e2e, "output_tok_per_s": batch * output_len / e2e,
        # time the output rank spent inside the step (forward + sampling) vs. the whole step
        "decode_exec_ms": statistics.mean(exec_s[1:]) * 1e3 if len(exec_s) > 1 else 0.0,
    }
    # each rank's idle share of the run, from the workers' own accounting (the pipeline bubble)
    stats = engine.stage_stats()
    out["idle_fraction_by_rank"] = {r: st["idle_fraction"] for r, st in stats.items()}
    out["graph_steps"] = min(st["graph_steps"] for st in stats.values())  # of the steps, replayed as CUDA graphs
    if profile is not None:
        out["profile_decode_step"] = profile
        slowest = slowest_rank(profile)
        if slowest is not None:
            out["slowest_rank"] = slowest
    return out


PROFILED_STEP = 5
"""--profile-step profiles the step after this many (a decode step: prefill and the first decodes are past)"""


def run_latency(llm: LLM, batch_sizes: list[int], input_len: int, output_len: int, warmup: bool = True,
                profile_step: bool = False, repeats: int = 1) -> list[dict[str, Any]]:
    """One result per batch size (with profile_step, the first round profiles its sixth step, a decode step,
    on every rank). With repeats > 1 the batch sizes run in turn, `repeats` rounds, and
    each result holds the median over the rounds (a slow spell of a shared host then hits one round of
    every batch size instead of every round of one)."""
    if warmup:  # first-touch allocations, NCCL communicators, and each batch size's kernels (loaded lazily)
        for b in sorted(set(batch_sizes), reverse=True):
            run_batch(llm, b, input_len, min(output_len, 8), seed=99)
    rounds = [[run_batch(llm, b, input_len, output_len, seed=b + 1000 * r,
                         profile_after=PROFILED_STEP if profile_step and r == 0 else None) for b in batch_sizes]
              for r in range(repeats)]
    return rounds[0] if repeats == 1 else [_median_over_rounds(list(rows)) for rows in zip(*rounds)]


def _median_over_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch size's rounds as one result: every timing is the median over the rounds."""
    out = dict(rows[0])  # batch, lengths and the profiled step come from the first round
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    out["idle_fraction_by_rank"] = {rank: statistics.median(r["idle_fraction_by_rank"][rank] for r in rows)
                                    for rank in rows[0]["idle_fraction_by_rank"]}
    out["repeats"] = len(rows)
    out["tpot_ms_by_round"] = [r["tpot_ms"] for r in rows]
    return out


class _DeprecatedProfile(argparse.Action):
    """`bench latency --profile`, the old spelling of --profile-step (`shardlm plan --profile` names a file)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("shardlm: bench latency --profile is deprecated; use --profile-step", file=sys.stderr)
        setattr(namespace, self.dest, True)


def add_bench_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    lat = kinds.add_parser("latency", help="TTFT and TPOT per batch size for one layout")
    lat.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    lat.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence (random ids)")
    lat.add_argument("--output-len", type=int, default=128, help="tokens generated per sequence (ignore_eos)")
    lat.add_argument("--repeats", type=int, default=1,
                     help="run the batch sizes this many rounds, in turn, and report the median of each timing")
    lat.add_argument("--profile-step", action="store_true",
                     help="profile one decode step per batch size on every rank under torch.profiler (GPU kernel "
                          "time by kind), kept out of the timings")
    lat.add_argument("--profile", action=_DeprecatedProfile, dest="profile_step", help=argparse.SUPPRESS)
    lat.add_argument("--json", default=None, help="write results to this file")
    lat.add_argument("--plot", default=None, help="write a PNG of TTFT and TPOT (p50, p99) per batch size")
    from .bench_serve import add_serve_bench_parser

    add_serve_bench_parser(kinds)
    return lat


def plot_latency(meta: dict[str, Any], path: str) -> None:
    """Two panels: TTFT per batch size, and TPOT p50 with p99 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = meta["results"]
    batches = [r["batch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(batches, [r["ttft_ms"] for r in rows], "o-")
    ax1.set(xlabel="batch size", ylabel="TTFT (ms)", title="time to first token", xscale="log", xticks=batches)
    p50 = [r["tpot_p50_ms"] for r in rows]
    p99 = [r["tpot_p99_ms"] for r in rows]
    ax2.errorbar(batches, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]], fmt="o-", capsize=4,
                 label="p50 (bar to p99)")
    ax2.set(xlabel="batch size", ylabel="TPOT (ms)", title="time per output token", xscale="log", xticks=batches)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{meta['model']}  TP={meta['tensor_parallel_size']}  {meta['dtype']} on {meta['device']}  "
                 f"(prompt {rows[0]['input_len']}, output {rows[0]['output_len']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_bench(args, engine_args: EngineArgs) -> int:
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if any(b < 1 for b in batch_sizes) or args.input_len < 1 or args.output_len < 2:
        raise ValueError("batch sizes and --input-len must be >= 1, --output-len >= 2")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.profile_step and args.output_len <= PROFILED_STEP + 1:
        raise ValueError(f"--profile-step profiles decode step {PROFILED_STEP + 1}: it needs --output-len >= "
                         f"{PROFILED_STEP + 2}, got {args.output_len}")
    check_output_path("--json", args.json)
    check_output_path("--plot", args.plot)
    longest = min(max(batch_sizes) * args.input_len, MAX_STEP_TOKENS)
    # a batch's prompts in one step (unless --max-num-batched-tokens is given, or they exceed a step's most
    # tokens: then in chunks), and all its sequences at once
    engine_args = replace(engine_args, max_num_batched_tokens=token_budget(engine_args.max_num_batched_tokens, longest),
                          max_num_seqs=max(engine_args.max_num_seqs, max(batch_sizes)))
    with LLM(**asdict(engine_args)) as llm:
        results = run_latency(llm, batch_sizes, args.input_len, args.output_len, profile_step=args.profile_step,
                              repeats=args.repeats)
        meta = {**llm.engine.settings(),
                "graph_capture": llm.engine.graph_capture,
                "all_reduce": llm.engine.all_reduce_path,
                "gemv_gbps_by_rank": {c.rank: c.gemv_gbps for c in llm.engine.rank_checks},
                "stragglers": [c.rank for c in llm.engine.rank_checks if c.straggler], "results": results}
    print(f"{'batch':>5} {'TTFT ms':>9} {'TPOT ms':>9} {'p99 ms':>8} {'ITL p50':>8} {'ITL p99':>8} {'exec ms':>8} "
          f"{'tok/s':>8} {'idle':>5}")
    for r in results:
        idle = sum(r["idle_fraction_by_rank"].values()) / len(r["idle_fraction_by_rank"])
        print(f"{r['batch']:>5} {r['ttft_ms']:>9.1f} {r['tpot_ms']:>9.2f} {r['tpot_p99_ms']:>8.2f} {r['itl_p50_ms']:>8.2f} "
              f"{r['itl_p99_ms']:>8.2f} {r['decode_exec_ms']:>8.2f} {r['output_tok_per_s']:>8.1f} {idle:>5.2f}")
        if "profile_decode_step" in r:
            prof = r["profile_decode_step"]
            if any(p["gpu_busy_us"] for p in prof.values()):
                print("      decode step GPU time by rank (us): " + "; ".join(
                    f"rank {k}: " + ", ".join(f"{n[:-3]} {v:.0f}" for n, v in p.items() if n.endswith("_us"))
                    for k, p in sorted(prof.items())))
            else:  # the CPU: no kernels to time; where the host's time went instead
                print("      decode step on the CPU by rank: " + "; ".join(
                    f"rank {k}: {p['wall_us']:.0f} us, most in " + ", ".join(f"{op} {us:.0f}" for op, us, _ in p["top_cpu_ops"][:3])
                    for k, p in sorted(prof.items())))
            if "slowest_rank" in r:
                s = r["slowest_rank"]
                print(f"      slowest rank in that step: rank {s['rank']}, its kernels {s['kernels_us']:.0f} us against "
                      f"{s['peers_median_us']:.0f} us on the others (median), {s['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)
    if args.plot:
        plot_latency(meta, args.plot)
    return 0
