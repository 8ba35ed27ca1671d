"""The FP8 linear kernels against bf16 on Llama-3-8B's GEMM shapes, replayed in CUDA graphs (a GPU with FP8
tensor cores): microseconds per call and the weight bytes per second they stream, at a few batch sizes.

    python scripts/fp8_gemm_bench.py [--json out.json]

Columns: bf16 (F.linear: cuBLAS), fp8-dot (the tensor-core Triton kernel), fp8-gemv (the CUDA-core kernel,
1-4 rows), fp8-scaled_mm (per-token activation scales + torch._scaled_mm). The weight-only kernels' results
are checked against the dequantising reference first.
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,4,8,16,64")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import torch
    import torch.nn.functional as F

    from shardlm.worker.kernels.triton_fp8 import fp8_gemm_small_m, quantize_activations
    from shardlm.worker.layers.fp8 import fp8_linear_torch, quantize_rows, scaled_mm_ok

    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not scaled_mm_ok(dev):
        print("needs a GPU with FP8 tensor cores (compute capability 8.9+)", file=sys.stderr)
        return 2

    def graph_us(fn) -> float:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / 20)
        return best

    def scaled_mm(x, w, s):
        xq, xs = quantize_activations(x)
        return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s[None, :], out_dtype=x.dtype)

    rows = []
    for name, (n, k) in SHAPES.items():
        wb = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        w8, s8 = quantize_rows(wb)
        for m in [int(b) for b in a.batches.split(",")]:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            want = fp8_linear_torch(x, w8, s8).float()
            cells = {"bf16": (graph_us(lambda: F.linear(x, wb)), 2 * n * k)}
            variants = {"fp8-dot": lambda: fp8_gemm_small_m(x, w8, s8, None, gemv=False)}
            if m <= 4:
                variants["fp8-gemv"] = lambda: fp8_gemm_small_m(x, w8, s8, None, gemv=True)
            for label, fn in variants.items():
                err = ((fn().float() - want).norm() / want.norm()).item()
                assert err < 1e-2, (name, m, label, err)
                cells[label] = (graph_us(fn), n * k)
            cells["fp8-scaled_mm"] = (graph_us(lambda: scaled_mm(x, w8, s8)), n * k)
            row = {"shape": name, "n": n, "k": k, "m": m,
                   **{f"{lbl}_us": us for lbl, (us, _) in cells.items()},
                   **{f"{lbl}_gbps": nbytes / us / 1e3 for lbl, (us, nbytes) in cells.items()}}
            rows.append(row)
            print(f"{name:>8} m={m:<3} " + "  ".join(f"{lbl} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s"
                                                     for lbl, (us, nbytes) in cells.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
