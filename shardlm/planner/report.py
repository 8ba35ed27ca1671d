"""Render a Plan: the text table, JSON-ready data, and a PNG of TPOT vs throughput."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from .cost import weights_per_gpu
from .plan import LayoutResult, Plan


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


_COLUMNS = [  # header, width, cell
    ("layout", 25, lambda r: r.name),
    ("W/GPU GB", 8, lambda r: _f(r.weights_gb, ".1f")),
    ("KV/tok KiB", 10, lambda r: _f(r.kv_kib_per_token, ".1f")),
    ("seqs", 5, lambda r: _f(r.max_seqs, "d")),
    ("TTFT1 ms", 8, lambda r: _f(r.ttft_ms_b1, ".0f")),
    ("TTFTf ms", 8, lambda r: _f(r.ttft_ms_full, ".0f")),
    ("TPOT1 ms", 8, lambda r: _f(r.tpot_ms_b1, ".1f")),
    ("TPOTf ms", 8, lambda r: _f(r.tpot_ms_full, ".1f")),
    ("batch", 5, lambda r: _f(r.batch, "d")),
    ("tok/s", 8, lambda r: _f(r.throughput_tok_s, ",.0f")),
    ("comm", 4, lambda r: _pct(r.comm_share)),
    ("bubble", 6, lambda r: _pct(r.bubble_share)),
]


def _fp8_size(plan: Plan) -> str:
    """', X GB fp8' where the plan has FP8 rows: the linear layers at a byte, the rest at bf16"""
    if not any(r.quantization == "fp8" for r in plan.results):
        return ""
    return f", {weights_per_gpu(replace(plan.model, quantization='fp8'), 1) / 1e9:.1f} GB fp8"  # (one GPU: all of it)


def format_table(plan: Plan) -> str:
    m, wl, c, a = plan.model, plan.workload, plan.cluster, plan.assumptions
    kind = f"MoE {m.n_experts} experts top-{m.top_k}, {m.active_params() / 1e9:.1f}B active, " if m.is_moe else ""
    lines = [
        f"model    {m.name}: {m.total_params() / 1e9:.1f}B params ({kind}"
        f"{m.total_params() * m.bytes_per_param / 1e9:.1f} GB bf16{_fp8_size(plan)}), KV "
        f"{m.kv_bytes_per_token(wl.kv_bytes) / 1024:g} KiB/token",
        f"cluster  {c.describe()}; {a['hardware_source']} numbers after efficiency factors: "
        f"{a['hbm_gbps_effective']:.0f} GB/s HBM, {a['tflops_effective']:.0f} TFLOP/s, {a['memory_gib']:.1f} GiB",
        f"workload {wl.input_len} prompt + {wl.output_len} output tokens (max-model-len {wl.max_model_len}), "
        f"<= {wl.max_num_seqs} seqs/replica"
        + (f", SLO TPOT {wl.slo_tpot_ms:g} ms" if wl.slo_tpot_ms is not None else "")
        + (f", SLO TTFT {wl.slo_ttft_ms:g} ms" if wl.slo_ttft_ms is not None else ""),
        "",
        "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(_COLUMNS)) + "  verdict",
    ]
    for r in plan.results:
        cells = [fn(r).rjust(w) if i else fn(r).ljust(w) for i, (_, w, fn) in enumerate(_COLUMNS)]
        verdict = ("RECOMMENDED" if r is plan.recommended else "ok") if r.ok else "; ".join(r.reasons)
        lines.append("  ".join(cells) + "  " + verdict)
    lines += ["", "seqs: concurrent sequences of prompt+output tokens, all replicas. 1 = at batch 1, f = with the "
              "KV cache full. batch, tok/s, comm, bubble: at the operating batch per replica (the full KV cache, "
              "lowered until the SLO holds)."]
    lines += [f"note: {n}" for n in plan.notes]
    lines += ["", ("Recommendation: " + plan.reason) if plan.recommended else plan.reason]
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data: model, cluster, workload, assumptions, layouts, recommendation."""
    m, c = plan.model, plan.cluster

    def row(r: LayoutResult) -> dict[str, Any]:
        return {"name": r.name, **asdict(r)}

    shape = {k: v for k, v in asdict(m).items() if k not in ("name", "notes")}
    return {
        "model": {"name": m.name, "total_params": m.total_params(), "active_params": m.active_params(),
                  "kv_bytes_per_token": m.kv_bytes_per_token(plan.workload.kv_bytes), **shape},
        "cluster": {"gpu": c.gpu.name, "gpus": c.n_gpus, "gpus_per_node": c.gpus_per_node,
                    "interconnect": c.interconnect, "network": c.network.name if c.n_nodes > 1 else None},
        "workload": asdict(plan.workload),
        "assumptions": plan.assumptions,
        "layouts": [row(r) for r in plan.results],
        "recommended": row(plan.recommended) if plan.recommended else None,
        "reason": plan.reason,
        "notes": plan.notes,
    }


def plot_plan(plan: Plan, path: str) -> None:
    """PNG of predicted TPOT vs throughput: one curve per layout that fits, over its batch sizes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in plan.results:
        if not r.curve:
            continue
        best = r is plan.recommended
        style = dict(lw=2.5, zorder=3) if best else dict(lw=1.0, alpha=0.8 if r.ok else 0.35)
        (line,) = ax.plot([p[2] for p in r.curve], [p[1] for p in r.curve], marker="o", ms=3,
                          ls="-" if r.ok else "--", label=r.name + (" (recommended)" if best else ""), **style)
        ax.plot([r.throughput_tok_s], [r.tpot_ms], marker="*" if best else "s", ms=14 if best else 5,
                color="k" if best else line.get_color())
    if plan.workload.slo_tpot_ms is not None:
        ax.axhline(plan.workload.slo_tpot_ms, color="red", ls=":", label=f"SLO {plan.workload.slo_tpot_ms:g} ms")
    ax.set_xlabel("throughput, output tokens/s (all replicas)")
    ax.set_ylabel("TPOT, ms")
    ax.set_title(f"{plan.model.name} on {plan.cluster.describe()}: batch 1 ... full KV cache", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
