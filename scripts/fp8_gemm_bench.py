"""The FP8 linear kernels against bf16 on Llama-3's GEMM shapes, replayed in CUDA graphs (a GPU with FP8
tensor cores): microseconds per call and the weight bytes per second they stream, at a few batch sizes.

    python scripts/fp8_gemm_bench.py [--json out.json]               # the kernels as the engine runs them
    python scripts/fp8_gemm_bench.py --tune [--budget 240] [--json]  # search kernel_configs per shape and batch

Each timed graph cycles through enough copies of the weights (>= 256 MB) that they come from HBM, not from
the 50 MB L2. Columns: bf16 (F.linear: cuBLAS), fp8 (layers/fp8.py's fp8_linear_kernels, as the engine runs
it: weight-only up to A8_ABOVE rows of a matrix narrower than WIDE_N and smaller than LARGE_BYTES, e4m3
activations otherwise),
fp8-scaled_mm (the activations quantised per token, then torch._scaled_mm). Every result is checked against the dequantising reference first. --tune:
coordinate descent over fp8_gemm_small_m's tiles, split, warps, operand order and loads (TMA or not) from
small_m_config's choice (and from the other kernel's, swapped, with the other loads), printing the best configuration found beside it; where
the engine runs weight-only (layers/fp8.py e4m3_activations) both weight-only and on
e4m3 activations (rows marked a8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

SHAPES = {"8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
          "70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
          "8b-head": {"lm_head": (128256, 4096)}}  # (--fp8-lm-head's GEMM; not in the defaults)
SPACE = {"tma": (False, True), "swap": (False, True), "split_k": (1, 2, 4, 8, 16), "block_n": (8, 16, 32, 64, 128),
         "block_k": (64, 128, 256, 512, 1024), "num_stages": (2, 3, 4, 5, 6), "num_warps": (2, 4, 8)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default=None, help="default 1,2,4,8,16,32,64; with --tune 1,4,16,64")
    p.add_argument("--models", default=None, help="default 8b,70b; with --tune 8b")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--tma-only", action="store_true", help="--tune: e4m3-activation rows tried on the TMA kernel only")
    p.add_argument("--budget", type=float, default=240.0, help="seconds of --tune in all")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import torch
    import torch.nn.functional as F

    from shardlm.worker.kernels import pdl_launches
    from shardlm.worker.kernels.triton_fp8 import (
        GEMV_MAX_M,
        fp8_gemm_small_m,
        quantize_activations,
        small_m_config,
    )
    from shardlm.worker.layers.fp8 import (
        e4m3_activations,
        fp8_linear_kernels,
        fp8_linear_torch,
        quantize_rows,
        scaled_mm_ok,
    )

    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not scaled_mm_ok(dev):
        print("needs a GPU with FP8 tensor cores (compute capability 8.9+)", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def graph_us(fn, copies: int) -> float:
        """one call's microseconds: a graph of calls over every weight copy (captured as the engine's decode
        graphs are: programmatic dependent launch unless SHARDLM_NO_PDL=1), best of 5 replays"""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), pdl_launches():
            fn(0)
        torch.cuda.current_stream().wait_stream(s)
        calls = max(copies, 8)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), pdl_launches():
            for i in range(calls):
                fn(i % copies)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / calls)
        return best

    rows, tuned = [], []
    batches = [int(b) for b in (a.batches or ("1,4,16,64" if a.tune else "1,2,4,8,16,32,64")).split(",")]
    models = (a.models or ("8b" if a.tune else "8b,70b")).split(",")
    shapes = [(model, name, n, k) for model in models for name, (n, k) in SHAPES[model].items()]
    deadline = time.monotonic() + a.budget
    problems = sum(1 + (not e4m3_activations(m, n, k)) for _, _, n, k in shapes for m in batches)
    per_problem = a.budget / max(1, problems)
    for model, name, n, k in shapes:
        wb = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
              for _ in range(math.ceil(256e6 / (2 * n * k)))]
        w8 = [quantize_rows(wb[i % len(wb)]) for i in range(math.ceil(256e6 / (n * k)))]
        for m in batches:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            # as the engine runs it (layers/fp8.py e4m3_activations); tuning, e4m3 activations at fewer rows too
            engine_a8 = e4m3_activations(m, n, k)
            for a8 in [engine_a8] + ([True] if a.tune and not engine_a8 else []):
                want = fp8_linear_torch(x, *w8[0]).float()

                def check(y, tol):
                    err = ((y.float() - want).norm() / want.norm()).item()
                    assert err < tol, (model, name, m, err)

                if a8:  # the reference multiplies the same e4m3 activations: only the kernel's own error is left
                    xq, xs = quantize_activations(x)
                    want = fp8_linear_torch((xq.float() * xs).to(x.dtype), *w8[0]).float()

                def small_m(cfg, i):
                    if not a8:
                        return fp8_gemm_small_m(x, *w8[i], None, config=cfg)
                    xq, xs = quantize_activations(x)
                    return fp8_gemm_small_m(xq, *w8[i], None, x_scale=xs, out_dtype=x.dtype, config=cfg)

                def timed(cfg):
                    try:
                        check(small_m(cfg, 0), 1e-2)
                    except AssertionError as e:
                        print(f"WRONG RESULT {tuple(cfg)}: {e}", flush=True)
                        return float("inf")
                    return graph_us(lambda i: small_m(cfg, i), len(w8))

                cfg0 = small_m_config(m, n, k, sms, a8=a8)
                if a.tune:
                    best, best_us, tried = cfg0, timed(cfg0), 1
                    seen = [(best_us, tuple(cfg0))]
                    kinds = [True, False] if m <= GEMV_MAX_M and not a8 else [False]
                    starts = [best] + [cfg0._replace(gemv=g) for g in kinds if g != cfg0.gemv]
                    if not cfg0.swap:  # (the weights as the MMA's 64-row side: coordinate steps from cfg0 miss it)
                        starts.append(cfg0._replace(gemv=False, swap=True, block_n=max(64, cfg0.block_n)))
                    if a8:  # (the TMA kernel wants other tiles than the pointer-load kernel: start it from both)
                        starts += [c._replace(tma=not c.tma) for c in starts if not c.gemv]
                        if a.tma_only:
                            starts = [c for c in starts if c.tma]
                    for start in starts:
                        stop = min(deadline, time.monotonic() + per_problem / len(starts))
                        cur, cur_us = start, best_us
                        if start != best:
                            try:
                                cur_us = timed(start)
                            except Exception:  # out of shared memory or registers: descend from it all the same
                                cur_us = float("inf")
                            tried += 1
                            seen.append((cur_us, tuple(start)))
                        for _ in range(2):
                            for field, values in SPACE.items():
                                for v in values:
                                    cand = cur._replace(**{field: v})
                                    if (cand == cur or time.monotonic() > stop or (cand.gemv and (cand.swap or cand.tma))
                                            or (a.tma_only and a8 and not cand.tma)):
                                        continue
                                    try:
                                        us = timed(cand)
                                    except Exception:  # out of shared memory or registers: not a candidate
                                        continue
                                    tried += 1
                                    seen.append((us, tuple(cand)))
                                    if us < cur_us:
                                        cur, cur_us = cand, us
                        if cur_us < best_us:
                            best, best_us = cur, cur_us
                    gbps = n * k / best_us / 1e3
                    tuned.append({"model": model, "shape": name, "n": n, "k": k, "m": m, "a8": a8,
                                  "default": cfg0._asdict(), "default_us": timed(cfg0), "best": best._asdict(),
                                  "best_us": best_us, "best_gbps": gbps, "tried": tried, "top": sorted(seen)[:8]})
                    print(f"{model:>3} {name:>8} m={m:<3}{' a8' if a8 else '   '} default {tuned[-1]['default_us']:7.1f} us  best {best_us:7.1f} us"
                          f" {gbps:5.0f} GB/s  {tuple(best)}  ({tried} tried)", flush=True)
                    print("      next: " + "  ".join(f"{us:.1f} {c}" for us, c in sorted(seen)[1:4]), flush=True)
                    continue
                cells = {"bf16": (graph_us(lambda i: F.linear(x, wb[i % len(wb)]), len(wb)), 2 * n * k)}
                try:
                    check(fp8_linear_kernels(x, *w8[0]), 1e-2)
                    cells["fp8"] = (graph_us(lambda i: fp8_linear_kernels(x, *w8[i]), len(w8)), n * k)
                except AssertionError as e:
                    print(f"WRONG RESULT fp8_linear_kernels: {e}", flush=True)

                def scaled_mm(i):
                    xq, xs = quantize_activations(x)
                    q, s = w8[i]
                    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s[None, :], out_dtype=x.dtype)
                check(scaled_mm(0), 6e-2)
                cells["fp8-scaled_mm"] = (graph_us(scaled_mm, len(w8)), n * k)
                rows.append({"model": model, "shape": name, "n": n, "k": k, "m": m, "config": tuple(cfg0),
                             **{f"{lbl}_us": us for lbl, (us, _) in cells.items()},
                             **{f"{lbl}_gbps": nbytes / us / 1e3 for lbl, (us, nbytes) in cells.items()}})
                print(f"{model:>3} {name:>8} m={m:<3} " + "  ".join(f"{lbl} {us:7.1f} us {nbytes / us / 1e3:5.0f} GB/s"
                                                                 for lbl, (us, nbytes) in cells.items()), flush=True)
        wb = w8 = None  # (free before the next shape)
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows, "tuned": tuned}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
