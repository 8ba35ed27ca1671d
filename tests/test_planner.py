"""Planner: formulas pinned to hand-worked numbers, recommendations that follow the hardware,
clear errors for bad input, JSON and PNG output. Pure CPU, no torch."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from shardlm.common.layout import ParallelLayout
from shardlm.common.presets import PRESETS as ENGINE_PRESETS
from shardlm.planner import (
    PlanError,
    Workload,
    load_model,
    load_profile,
    make_cluster,
    make_plan,
)
from shardlm.planner.auto import recommend_for_engine
from shardlm.planner.cli import main
from shardlm.planner.cost import (
    CostModel,
    Efficiency,
    a2a_bytes_per_token,
    decode_flops_per_token,
    distinct_experts,
    kv_bytes_per_token_per_gpu,
    pipeline_bubble,
    prefill_flops,
    stage_shards,
    weights_per_gpu,
)
from shardlm.planner.hardware import gpu_preset_from_name
from shardlm.planner.models import ModelSpec, from_engine_config, from_hf_config
from shardlm.planner.validate import format_validation, validate_files

GB, KiB = 1e9, 1024

# The 4 x H100 host's measured all-reduce (shared/reference/gpu-host-measurements.md), as a profile.
PROFILE = {
    "version": 1, "device": "NVIDIA H100 80GB HBM3", "gpu_count": 4, "memory_gib": 79.1,
    "hbm_gbps": 3012, "gemm_tflops": 778,
    "allreduce": {
        "2": [[16384, 35.3], [65536, 35.2], [262144, 33.9], [1048576, 43.3], [4194304, 39.2],
              [16777216, 76.2], [67108864, 254.2], [268435456, 899.9]],
        "4": [[16384, 40.8], [65536, 40.6], [262144, 37.2], [1048576, 37.2], [4194304, 44.0],
              [16777216, 98.3], [67108864, 334.1], [268435456, 1196.6]],
    },
    "send_recv": [[16384, 12.0], [1048576, 20.0]],
}


@pytest.fixture(scope="module")
def l70():
    return load_model("llama-3-70b")


# -- formulas --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp,expected_gb", [(1, 141.1), (2, 70.6), (4, 35.3), (8, 17.6)])
def test_llama3_70b_weights_per_gpu(l70, tp, expected_gb):
    assert weights_per_gpu(l70, tp) / GB == pytest.approx(expected_gb, abs=0.05)


def test_uneven_tp_costs_the_busiest_rank(l70):
    # tp=3: rank 0 holds q heads 0-21 -> kv heads 0-2, rank 1 q 22-42 -> kv 2-5 (4 KV heads, GQA group
    # split); both have 50 head-slices of h*d. MLP 28672/3 -> 9558 rows on rank 0, vocab 42752 rows each.
    per_layer = 8192 * 128 * 50 + 3 * 8192 * 9558 + 2 * 8192
    expected = 2 * (80 * per_layer + 2 * 42752 * 8192 + 8192)
    assert weights_per_gpu(l70, 3) == expected
    assert weights_per_gpu(l70, 3) > weights_per_gpu(l70, 1) / 3
    assert kv_bytes_per_token_per_gpu(l70, 3) == 2 * 80 * 4 * 128 * 2  # 160 KiB, not 320/3


def test_kv_per_token_gqa_and_replication(l70):
    assert l70.kv_bytes_per_token() == 320 * KiB
    assert kv_bytes_per_token_per_gpu(l70, 1) == 320 * KiB
    assert kv_bytes_per_token_per_gpu(l70, 4) == 80 * KiB
    assert kv_bytes_per_token_per_gpu(l70, 8) == 40 * KiB
    # 16 ranks > 8 KV heads: each rank still keeps one whole KV head, so it stops shrinking
    assert kv_bytes_per_token_per_gpu(l70, 16) == 40 * KiB
    assert kv_bytes_per_token_per_gpu(l70, 4, pp=2) == 40 * KiB
    assert kv_bytes_per_token_per_gpu(l70, 4, kv_bytes=1) == 40 * KiB


def test_pipeline_and_tied_embeddings():
    smol = load_model("smollm2-135m")
    assert smol.total_params() == 134_515_008
    # pp=1: the tied LM head is the embedding; pp=2: the last stage needs its own copy
    emb = 49152 * 576
    layer = 576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1536 + 2 * 576
    assert weights_per_gpu(smol, 1) == 2 * (30 * layer + emb + 576)
    assert weights_per_gpu(smol, 1, pp=2) == 2 * (15 * layer + emb + 576)


def test_mixtral_total_and_active_params():
    mix = load_model("mixtral-8x7b")
    assert mix.total_params() / 1e9 == pytest.approx(46.7, abs=0.05)
    assert mix.active_params() / 1e9 == pytest.approx(12.9, abs=0.05)
    assert mix.expert_params() / 1e6 == pytest.approx(176.2, abs=0.1)


def test_other_presets_param_counts():
    qwen = load_model("qwen2.5-72b")  # q/k/v biases: (64 + 2*8) * 128 per layer
    layer = 8192 * 128 * 144 + 80 * 128 + 3 * 8192 * 29568 + 2 * 8192
    assert qwen.total_params() == 80 * layer + 2 * 152064 * 8192 + 8192
    expected = {  # (total, active) in billions, as published
        "llama-3-8b": (8.03, 8.03), "llama-3-405b": (405.9, 405.9), "mixtral-8x22b": (140.6, 39.2),
        "qwen3-30b-a3b": (30.5, 3.35), "deepseek-moe-16b": (16.4, 2.8),
    }
    for name, (total, active) in expected.items():
        m = load_model(name)
        assert m.total_params() / 1e9 == pytest.approx(total, abs=0.05), name
        assert m.active_params() / 1e9 == pytest.approx(active, abs=0.05), name


def test_distinct_experts():
    assert distinct_experts(8, 2, 1) == pytest.approx(2.0)
    assert distinct_experts(8, 2, 4) == pytest.approx(5.47, abs=0.01)
    assert distinct_experts(8, 2, 16) == pytest.approx(7.92, abs=0.01)


def test_moe_decode_reads_distinct_experts_and_pays_all_to_all():
    mix = load_model("mixtral-8x7b")
    cm = CostModel(mix, make_cluster("h100-80gb", 8))
    lay = ParallelLayout(tp=1, pp=1, dp=1)
    sh = stage_shards(mix, lay)[0]
    one, sixteen = (cm.stage_pass(lay, sh, b, 0, prefill=False) for b in (1, 16))
    expert_bytes = 2 * 32 * mix.expert_params()
    assert sixteen.hbm_bytes - one.hbm_bytes == pytest.approx(
        (distinct_experts(8, 2, 16) - 2) * expert_bytes, rel=1e-9)
    assert a2a_bytes_per_token(2, 4096, 2, 8) == 2 * 2 * 4096 * 2 * 7 / 8
    # EP over 8 ranks: each holds one whole expert; 2 all-to-alls per MoE layer
    ep = ParallelLayout(tp=1, pp=1, dp=8, ep=8)
    sh_ep = stage_shards(mix, ep)[0]
    assert (sh_ep.experts_local, sh_ep.expert) == (1, mix.expert_params())
    buf = 4 * 2 * 4096 * 2  # 4 tokens per rank x top-2 x h x bf16
    comm = cm.stage_pass(ep, sh_ep, 4, 0, prefill=False).comm_s
    assert comm == pytest.approx(64 * cm.all_to_all(list(range(8)), buf))
    assert cm.all_to_all(list(range(8)), buf) == pytest.approx((9 + 1.5 * 6 + buf * 7 / 8 / (0.7 * 450e3)) * 1e-6)


def test_prefill_and_decode_flops(l70):
    n_matmul = 80 * (8192 * 128 * 144 + 3 * 8192 * 28672) + 128256 * 8192
    assert prefill_flops(l70, 1000) == 2 * n_matmul * 1000 + 2 * 80 * 64 * 128 * 1000**2
    assert decode_flops_per_token(l70, 500) == 2 * n_matmul + 4 * 80 * 64 * 128 * 500
    lay = ParallelLayout()
    eager = CostModel(l70, make_cluster("h100-80gb", 1), cuda_graphs=False)
    step = eager.stage_pass(lay, stage_shards(l70, lay)[0], 1000, 0, prefill=True)
    assert step.flops == pytest.approx(prefill_flops(l70, 1000, logits_tokens=1))
    # replayed as the mixed-step graph of 1024 tokens: the layers' GEMMs over 1024 rows, attention over the
    # prompt's own 1000, a logits row for each of its 256 sequence slots
    step = CostModel(l70, make_cluster("h100-80gb", 1)).stage_pass(lay, stage_shards(l70, lay)[0], 1000, 0, prefill=True)
    layers = 80 * (8192 * 128 * 144 + 3 * 8192 * 28672)
    assert step.flops == pytest.approx(2 * layers * 1024 + 2 * 80 * 64 * 128 * 1000**2 + 2 * 256 * 128256 * 8192)


def test_decode_step_is_roofline_plus_allreduces(l70):
    cluster = make_cluster("h100-80gb", 4, "nvlink")
    lay = ParallelLayout(tp=4)
    bw = 3350e9 * 0.85
    hbm = weights_per_gpu(l70, 4) - 2 * 32064 * 8192  # the embedding rows are looked up, not read
    # the torch attention path: elementwise kernels per layer (h 8192, a rank's q 2048 / KV 256 / MLP 7168
    # wide): 28h + 30q + 26kv + 10f = 369152 bytes, plus the 1024-token context's KV (1 KiB per token per
    # layer here) gathered and read again
    torch_path = CostModel(l70, cluster, attention_backend="torch")
    step = torch_path.stage_pass(lay, stage_shards(l70, lay)[0], 1, 1024, prefill=False)  # a graph's exact shape
    act = 80 * (28 * 8192 + 30 * 2048 + 26 * 256 + 10 * 7168 + 2 * 1024 * KiB)
    assert act == 80 * (369152 + 2097152)
    # replayed as a graph: each layer's small kernels add their latency (the graph floor, 15 us a layer)
    floor = 80 * 15e-6
    assert step.compute_s == pytest.approx((hbm + 1024 * 80 * KiB + act) / bw + floor, rel=1e-9)
    assert step.act_bytes == act and step.hbm_bytes == pytest.approx(hbm + 1024 * 80 * KiB)
    # the engine's kernels (the default): residual adds fused into the norms (16h), rotary + cache write in
    # one kernel (4 per q, 10 per KV element), SiLU x up in one (6 per MLP element), attention reads the
    # context once through the block tables, no gather
    cm = CostModel(l70, cluster)
    assert cm.paged_kernels and not torch_path.paged_kernels
    step = cm.stage_pass(lay, stage_shards(l70, lay)[0], 1, 1024, prefill=False)
    act = 80 * (16 * 8192 + 4 * 2048 + 10 * 256 + 6 * 7168)
    assert step.act_bytes == act and step.hbm_bytes == pytest.approx(hbm + 1024 * 80 * KiB)
    assert step.compute_s == pytest.approx((hbm + 1024 * 80 * KiB + act) / bw + floor, rel=1e-9)
    # 2 all-reduces per layer + 1 for the vocab-parallel embedding, 16 KiB each: the peer kernel's alpha(4)
    # = 5 + 2 x 1.5 us, ring 2(n-1)/n = 1.5 at busbw 360 GB/s; plus the logits all-gather (V*2 bytes, half
    # as an all-reduce; NCCL's: alpha(4) = 9 + 2 x 1.5)
    ar = 8 + 1.5 * 16384 / 360e3
    gather = 12 + 1.5 * 128256 / 360e3
    assert step.comm_s == pytest.approx((161 * ar + gather) * 1e-6, rel=1e-9)
    assert 160 * ar * 1e-6 < 0.2 * step.compute_s  # graph-captured NVLink: latency-bound, small


def test_collectives_span_sockets_and_nodes():
    pcie = make_cluster("a100-80gb", 8, "pcie-cross-socket")
    cm = CostModel(load_model("llama-3-8b"), pcie)
    inside, across = cm.allreduce([0, 1, 2, 3], 1 << 20), cm.allreduce([2, 3, 4, 5], 1 << 20)
    assert inside == pytest.approx((15 + 2 * 2 + 1.5 * (1 << 20) / (0.65 * 32e3)) * 1e-6)
    assert across == pytest.approx((25 + 3 * 2 + 1.5 * (1 << 20) / 10e3) * 1e-6)
    two_nodes = CostModel(load_model("llama-3-8b"), make_cluster("h100-80gb", 16, "nvlink", 8, "ib-ndr"))
    intra = 9 + 1.5 * 6 + 1.75 * 16384 / 360e3  # all 8 GPUs of a node, NVLink
    ring = 30 + 1.0 * (16384 / 8) / 40e3  # 2 nodes, 1/8 of the bytes per GPU over its NIC
    assert two_nodes.allreduce(list(range(16)), 16384) == pytest.approx((intra + ring) * 1e-6)
    assert two_nodes.send_recv(7, 8, 16384) == pytest.approx((10 + 16384 / 40e3) * 1e-6)


def test_pipeline_bubble_and_single_sequence_crosses_every_stage(l70):
    assert pipeline_bubble(4, 1) == pytest.approx(0.75)  # one micro-batch: 3 of 4 stages wait
    assert pipeline_bubble(4, 2) == pytest.approx(0.5) and pipeline_bubble(4, 4) == pipeline_bubble(4, 9) == 0
    cl = make_cluster("h100-80gb", 8)
    plan = make_plan(l70, cl, Workload(max_model_len=2048))
    row = next(r for r in plan.results if (r.tp, r.pp, r.dp) == (2, 4, 1))
    assert row.micro_batches == 4 and row.bubble_share == 0  # the full KV cache's sequences fill 4 micro-batches
    cm = CostModel(l70, cl)
    lay = ParallelLayout(tp=2, pp=4)
    shards = stage_shards(l70, lay)
    passes = [cm.stage_pass(lay, sh, 1, 1536, prefill=False) for sh in shards]
    # batch 1: 4 beats of the slowest stage + 3 transfers + host overhead, at least the sum of stages
    expected = 4 * max(p.total_s for p in passes) + 3 * cm.transfer(lay, 1) + 500e-6
    assert row.tpot_ms_b1 == pytest.approx(expected * 1e3, rel=1e-9)
    assert expected > sum(p.total_s for p in passes)
    # 10 sequences: 4 micro-batches of 3 (the last holds 1) in flight; a token every 4 beats of 3 sequences
    beat = max(cm.stage_pass(lay, sh, 3, 1536, prefill=False).total_s for sh in shards)
    period, _, bubble, m = cm.decode_step(lay, shards, 10, 1536)
    assert (period, bubble, m) == pytest.approx((4 * beat + 3 * cm.transfer(lay, 3) + 500e-6, 0, 4), rel=1e-12)
    assert cm.decode_step(lay, shards, 2, 1536)[2:] == (0.5, 2)  # 2 sequences: 2 micro-batches, half idle
    assert cm.decode_step(lay, shards, 5, 1536)[2:] == (0.25, 3)  # 5 sequences: micro-batches of 2, 2, 1
    one = ParallelLayout(tp=8)  # no pipeline: the step itself, at any (fractional) batch
    step = cm.stage_pass(one, stage_shards(l70, one)[0], 2.5, 1536, prefill=False).total_s
    period, _, bubble, m = cm.decode_step(one, stage_shards(l70, one), 2.5, 1536)
    # async scheduling (the default) hides the host's 500 us per step behind the GPU's longer step;
    # the synchronous engine pays it on top
    assert (period, bubble, m) == (pytest.approx(step, rel=1e-12), 0, 1) and step > 500e-6
    sync = CostModel(l70, cl, async_scheduling=False).decode_step(one, stage_shards(l70, one), 2.5, 1536)[0]
    assert sync == pytest.approx(step + 500e-6, rel=1e-12)
    assert CostModel(l70, cl, eff=Efficiency(step_overhead_us=50e3)).decode_step(
        one, stage_shards(l70, one), 2.5, 1536)[0] == pytest.approx(50e-3)  # a host slower than the GPU sets the pace
    with pytest.raises(ValueError, match="at least one sequence"):
        cm.decode_step(lay, shards, 0, 1536)
    # 6 prompts of 100 tokens arriving together: 3 micro-batches of 2 (200 tokens) through 4 stages; the
    # last first token comes two beats of the slowest stage after the first micro-batch's
    passes = [cm.stage_pass(lay, sh, 200, 0, prefill=True, prompts=2) for sh in shards]
    ttft, beat = cm.prefill_step(lay, shards, 600, prompts=6)
    assert beat == max(p.total_s for p in passes)
    assert ttft == pytest.approx(sum(p.total_s for p in passes) + 2 * beat + 3 * cm.transfer(lay, 200) + 500e-6,
                                 rel=1e-12)
    whole = cm.prefill_step(one, stage_shards(l70, one), 600, prompts=6)  # one stage: one step of all 6
    assert whole[0] == pytest.approx(cm.stage_pass(one, stage_shards(l70, one)[0], 600, 0, prefill=True,
                                                   prompts=6).total_s + 500e-6, rel=1e-12)


def test_profile_replaces_datasheet_numbers(l70):
    prof = load_profile(PROFILE)
    cl = make_cluster("h100-80gb", 4)
    cm = CostModel(l70, cl, prof)
    assert cm.allreduce([0, 1, 2, 3], 16384) == pytest.approx(40.8e-6)
    assert cm.allreduce([0, 1], 2 * 1048576) == pytest.approx((43.3 + (39.2 - 43.3) / 3) * 1e-6)
    assert cm.allreduce([0, 1, 2], 16384) == pytest.approx((35.3 + 40.8) / 2 * 1e-6)  # between sizes
    assert cm.send_recv(0, 1, 16384) == pytest.approx(12e-6)
    assert cm.hbm_bps == pytest.approx(3012e9 * 0.95) and cm.flops_ps == pytest.approx(778e12 * 0.85)
    base = make_plan(l70, cl, Workload(max_model_len=4096))
    measured = make_plan(l70, cl, Workload(max_model_len=4096), prof)
    tp4 = [next(r for r in p.results if r.tp == 4) for p in (base, measured)]
    # eager all-reduces at ~40 us instead of ~8 us (the peer kernel's): 161 x ~32 us more per token
    assert tp4[1].tpot_ms_b1 - tp4[0].tpot_ms_b1 == pytest.approx(161 * 32.7e-3, rel=0.1)


def test_a_group_runs_at_its_slowest_gpus_pace(l70):
    """the probe's per-GPU GEMV rates: a TP group holding the slow GPU 1 takes its GPU time at GPU 1's pace
    (GPU 0's numbers scaled by 3845 / 1610); groups without it, and profiles without the field, as before"""
    cl = make_cluster("h100-80gb", 4)
    plain = CostModel(l70, cl, load_profile(PROFILE))
    slow = CostModel(l70, cl, load_profile({**PROFILE, "gpu_gemv_gbps": {"0": 3845, "1": 1610, "2": 3845,
                                                                         "3": 3900}}))
    ratio = 3845 / 1610
    assert slow.profile.slowdown([0, 1]) == pytest.approx(ratio) and slow.profile.slowdown([2, 3]) == 1.0
    assert plain.profile.slowdown([0, 1]) == 1.0
    for tp in (2, 4):
        lay = ParallelLayout(tp=tp)
        sh = stage_shards(l70, lay)[0]
        a, b = (cm.stage_pass(lay, sh, 1, 1024, prefill=False) for cm in (plain, slow))
        assert b.compute_s == pytest.approx(a.compute_s * ratio) and b.comm_s == a.comm_s


# -- recommendations follow the hardware -------------------------------------------------------------

def test_nvlink_prefers_tp_inside_the_node(l70):
    plan = make_plan(l70, make_cluster("h100-80gb", 8, "nvlink"), Workload(8192, slo_tpot_ms=30))
    rec = plan.recommended
    assert (rec.tp, rec.pp, rec.dp) == (8, 1, 1)
    assert rec.tpot_ms <= 30
    assert "NVLink" in plan.reason


def test_pcie_across_sockets_keeps_tp_small(l70):
    nv = make_plan(l70, make_cluster("a100-80gb", 8, "nvlink")).recommended
    pc = make_plan(l70, make_cluster("a100-80gb", 8, "pcie-cross-socket"))
    assert nv.tp == 8
    assert pc.recommended.tp <= 4  # one socket's GPUs
    tp8 = next(r for r in pc.results if r.tp == 8)
    assert tp8.comm_share > 0.5  # TP=8 would spend most of each step crossing the sockets
    assert "inside one socket" in pc.reason


def test_multi_node_puts_pp_between_nodes():
    m = load_model("llama-3-405b")
    for net in ("ib-ndr", "eth-100g"):
        cl = make_cluster("h100-80gb", 16, "nvlink", gpus_per_node=8, network=net)
        plan = make_plan(m, cl)
        rec = plan.recommended
        assert (rec.tp, rec.pp) == (8, 2), net
        lay = ParallelLayout(tp=8, pp=2)
        assert all(cl.span(g).nodes == 1 for g in lay.tp_groups())
        assert cl.span([lay.rank(0, 0, 0), lay.rank(0, 1, 0)]).nodes == 2
        tp16 = next(r for r in plan.results if r.tp == 16)
        assert tp16.kv_kib_per_token == pytest.approx(2 * rec.kv_kib_per_token)  # KV heads replicated


def test_heads_experts_and_slo_rejections():
    smol = make_plan(load_model("smollm2-135m"), make_cluster("h100-80gb", 16))
    tp16 = next(r for r in smol.results if r.tp == 16)
    assert not tp16.ok and "heads" in tp16.reasons[0]
    pp32 = next(r for r in make_plan(load_model("smollm2-135m"), make_cluster("h100-80gb", 32, "nvlink", 8)).results
                if r.pp == 32)
    assert not pp32.ok and pp32.reasons[0].startswith("layers: pp=32 > 30")
    tp2 = next(r for r in smol.results if (r.tp, r.pp) == (2, 1))
    assert tp2.ok and tp2.kv_kib_per_token == 15.0  # 9 heads over 2 ranks: each needs 2 of 3 KV heads
    mix = make_plan(load_model("mixtral-8x7b"), make_cluster("h100-80gb", 16))
    ep16 = next(r for r in mix.results if r.ep == 16)
    assert not ep16.ok and "experts" in ep16.reasons[0]
    assert all(r.ep in (1, r.tp * r.dp) for r in mix.results)
    dense = make_plan(load_model("llama-3-8b"), make_cluster("h100-80gb", 4))
    assert all(r.ep == 1 for r in dense.results)
    slo = make_plan(load_model("llama-3-70b"), make_cluster("h100-80gb", 8), Workload(slo_tpot_ms=3))
    assert slo.recommended is None and "No layout meets the SLO" in slo.reason
    assert any("misses the SLO" in r for res in slo.results for r in res.reasons)
    fits = [r for r in slo.results if r.fits]
    assert fits and all("misses the SLO" in " ".join(r.reasons) for r in fits)


@pytest.mark.parametrize("gpu,slo", [
    ("l40s", None),  # both layouts decode with their KV caches full: 65 vs 50 in the seqs column
    ("a100-80gb", 10),  # the TPOT SLO lowers both batches (16 x 1 vs 2 x 2) far below their seqs (131 vs 116)
])
def test_reason_counts_the_sequences_the_table_shows(gpu, slo):
    plan = make_plan(load_model("llama-3-8b"), make_cluster(gpu, 2, "pcie"), Workload(slo_tpot_ms=slo))
    rec = plan.recommended
    ru = max((r for r in plan.results if r.ok and r is not rec), key=lambda r: r.throughput_tok_s)
    m = re.search(r"runs ([\d.]+)x as many sequences at once \(([^)]*)\)", plan.reason)
    assert m, plan.reason
    ratio, nums = float(m.group(1)), [int(n) for n in re.findall(r"\d+", m.group(2))]
    if slo is None:  # the ratio of the two rows' seqs column
        assert nums == [rec.max_seqs, ru.max_seqs] and rec.batch * rec.dp == rec.max_seqs
        assert ratio == pytest.approx(rec.max_seqs / ru.max_seqs, abs=0.05)
    else:  # the ratio of batch x dp, said to be that, with the seqs column's numbers beside it
        assert "batch x dp" in m.group(2) and rec.batch * rec.dp < rec.max_seqs
        assert nums == [rec.batch, rec.dp, ru.batch, ru.dp, rec.max_seqs, ru.max_seqs]
        assert ratio == pytest.approx(rec.batch * rec.dp / (ru.batch * ru.dp), abs=0.05)


# -- bad input ---------------------------------------------------------------------------------------

def test_unknown_presets_list_the_known_ones():
    with pytest.raises(PlanError, match="known GPUs: .*h100-80gb"):
        make_cluster("v100", 4)
    with pytest.raises(PlanError, match="presets: .*llama-3-70b.*mixtral-8x7b"):
        load_model("llama-9-1t")
    with pytest.raises(PlanError, match="no NVLink"):
        make_cluster("l40s", 4, "nvlink")
    with pytest.raises(PlanError, match="must divide"):
        make_cluster("h100-80gb", 12, "nvlink", gpus_per_node=8)


def test_config_json(tmp_path):
    cfg = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
           "num_experts_per_tok": 2, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))  # the folder works as well as the file
    assert m.total_params() == load_model("mixtral-8x7b").total_params()
    del cfg["num_hidden_layers"]
    with pytest.raises(PlanError, match="required field 'num_hidden_layers' is missing"):
        from_hf_config(cfg)
    cfg["num_hidden_layers"] = 32
    del cfg["num_experts_per_tok"]
    with pytest.raises(PlanError, match="num_experts_per_tok"):
        from_hf_config(cfg)
    qwen3 = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
             "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False}
    assert from_hf_config(qwen3).total_params() == load_model("qwen3-30b-a3b").total_params()
    with pytest.raises(PlanError, match="not found"):
        load_model(str(tmp_path / "nope.json"))


def test_no_layout_fits_names_the_smallest_gpu_count():
    with pytest.raises(PlanError, match=r"smallest GPU count that fits is 4 \(tp=4"):
        make_plan(load_model("llama-3-70b"), make_cluster("a100-40gb", 2))


@pytest.mark.parametrize("patch,field", [
    ({"hbm_gbps": -1}, "hbm_gbps"),
    ({"gemm_tflops": "fast"}, "gemm_tflops"),
    ({"allreduce": {"4": [[16384, 40.8], [65536]]}}, "allreduce.4[1]"),
    ({"allreduce": {"one": [[16384, 40.8]]}}, "allreduce.one"),
    ({"allreduce": []}, "allreduce"),
    ({"allreduce": {"4": []}}, "allreduce.4"),
    ({"send_recv": [[0, 5.0]]}, "send_recv[0][0]"),
    ({"version": 2}, "version"),
    ({"gpu_gemv_gbps": {"one": 3000}}, "gpu_gemv_gbps.one"),
    ({"gpu_gemv_gbps": {"1": 0}}, "gpu_gemv_gbps.1"),
    ({"gpu_gemv_gbps": []}, "gpu_gemv_gbps"),
])
def test_malformed_profile_names_the_field(patch, field):
    with pytest.raises(PlanError, match=re.escape(f"field '{field}'")):
        load_profile({**PROFILE, **patch})


def test_profile_missing_field_and_bad_file(tmp_path):
    data = dict(PROFILE)
    del data["gemm_tflops"]
    with pytest.raises(PlanError, match="missing required field 'gemm_tflops'"):
        load_profile(data)
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_profile(str(bad))


@pytest.mark.parametrize("argv,msg", [
    (["plan", "llama-3-70b", "--gpus", "8", "--gpu", "v100"], "unknown GPU 'v100'"),
    (["plan", "gpt-5", "--gpus", "8"], "unknown model 'gpt-5'"),
    (["plan", "llama-3-405b", "--gpus", "4"], "smallest GPU count that fits is 11"),
    (["plan", "llama-3-8b", "--gpus", "4", "--input-len", "9000"], "exceed --max-model-len"),
])
def test_run_plan_prints_the_error_and_returns_2(capsys, argv, msg):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_run_plan_bad_profile_returns_2(tmp_path, capsys):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({**PROFILE, "allreduce": {"4": [[16384, "x"]]}}))
    assert main(["plan", "llama-3-8b", "--gpus", "4", "--profile", str(path)]) == 2
    assert "allreduce.4[0][1]" in capsys.readouterr().err


def test_interconnect_defaults_to_the_gpu_presets(measured_files, capsys):
    def planned_link(argv):
        assert main(["plan", "llama-3-8b", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["cluster"]["interconnect"]

    assert planned_link(["--gpu", "l4", "--gpus", "1"]) == "pcie"  # no NVLink on an L4
    assert planned_link(["--gpus", "2"]) == "nvlink"  # h100-80gb
    assert planned_link(["--gpus", "2", "--interconnect", "pcie-cross-socket"]) == "pcie-cross-socket"
    assert make_cluster("l40s", 4).interconnect == "pcie" and make_cluster("a100-80gb", 4).interconnect == "nvlink"
    assert validate_files([measured_files[0]], gpu="l4").interconnect == "pcie"
    # asked for explicitly, NVLink on a GPU without it is still an error that says what to pass
    assert main(["plan", "llama-3-8b", "--gpu", "l4", "--gpus", "2", "--interconnect", "nvlink"]) == 2
    err = capsys.readouterr().err
    assert "l4 has no NVLink" in err and "--interconnect pcie" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "default: from the GPU preset" in " ".join(capsys.readouterr().out.split())


# -- output --------------------------------------------------------------------------------------------

def test_table_output(capsys):
    assert main(["plan", "llama-3-70b", "--gpus", "8", "--gpu", "h100-80gb", "--interconnect", "nvlink",
                 "--max-model-len", "8192", "--slo-tpot-ms", "30"]) == 0
    out = capsys.readouterr().out
    assert "tp=8 pp=1 ep=1 dp=1" in out and "RECOMMENDED" in out
    assert "does not fit" in out and "misses the SLO" in out
    assert out.strip().splitlines()[-1].startswith("Recommendation: tp=8 pp=1 ep=1 dp=1")


def test_json_output_shape(tmp_path, capsys):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(PROFILE))
    assert main(["plan", "mixtral-8x7b", "--gpus", "4", "--profile", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"model", "cluster", "workload", "assumptions", "layouts", "recommended", "reason"}
    assert data["model"]["total_params"] == load_model("mixtral-8x7b").total_params()
    assert data["assumptions"]["hardware_source"] == "profile"
    # (tp, pp, dp) factorizations of 4: 6; MoE adds ep = tp*dp wherever tp*dp > 1: 5 more
    assert len(data["layouts"]) == 11
    keys = {"tp", "pp", "ep", "dp", "ok", "reasons", "weights_gb", "kv_kib_per_token", "max_seqs", "ttft_ms_b1",
            "ttft_ms_full", "tpot_ms_b1", "tpot_ms_full", "throughput_tok_s", "comm_share", "bubble_share", "curve"}
    assert all(keys <= set(r) for r in data["layouts"])
    rec = data["recommended"]
    best = max(r["throughput_tok_s"] for r in data["layouts"] if r["ok"])
    assert rec["ok"] and rec["throughput_tok_s"] >= 0.97 * best
    assert rec["curve"][-1][0] == rec["batch"] or rec["batch"] in [p[0] for p in rec["curve"]]
    assert rec["name"] in data["reason"]


def test_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["plan", "llama-3-70b", "--gpus", "8", "--slo-tpot-ms", "30", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_output_into_a_closed_pipe_ends_quietly():
    # `shardlm plan --json | head -1`: 720 GPUs' layouts make ~180 KB of JSON, more than a pipe holds, so the
    # reader closes it while the planner still has most of it to write
    cmd = [sys.executable, "-m", "shardlm.entrypoints.cli", "plan", "tiny-llama", "--gpus", "720", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err  # the plan's own status: it has a recommendation
    assert "BrokenPipe" not in err and "Broken pipe" not in err and "Traceback" not in err, err


def test_planner_does_not_import_torch():
    code = "import sys, shardlm.planner.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- host calibration (profile step_overhead_us / layer_floor_us) ----------------------------------------

# 2 layers, h=64, 4 q / 2 KV heads of 16, f=128, V=256 (untied). Per layer: attn 64*16*(2*4+2*2) = 12288,
# MLP 3*64*128 = 24576, norms 128 parameters. The profile makes the numbers round: HBM 1 GB/s (1 byte per ns)
# and 1 TFLOP/s after the measured-efficiency factors (0.95, 0.85); all-reduces of <= 1 MB cost 10 us.
TINY = ModelSpec("tiny", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128, vocab=256)
# worked by hand for an engine that runs decode eagerly (a step at its own shape; graph padding: below)
HOST = {"version": 1, "device": "test GPU", "hbm_gbps": 1 / 0.95, "gemm_tflops": 1 / 0.85,
        "allreduce": {"2": [[1e6, 10.0]]}, "step_overhead_us": {"1": 1000, "2": 1500},
        "layer_floor_us": {"1": 200, "2": 50}, "engine": {"cuda_graphs": False}}


def _tiny_step(profile, tp, prefill=False, tokens=1, prompts=1, context=100, async_scheduling=True):
    cm = CostModel(TINY, make_cluster("h100-80gb", 2), load_profile(profile), async_scheduling=async_scheduling)
    lay = ParallelLayout(tp=tp)
    shards = stage_shards(TINY, lay)
    if prefill:
        return cm.prefill_step(lay, shards, tokens, prompts)[0]
    return cm.decode_step(lay, shards, tokens, context)[0]


def test_host_floor_decode_is_overhead_plus_max_per_layer():
    # tp=1, batch 1, context 100: a layer reads 2*(12288+128+24576) + 100 tokens * 2*2*16*2 bytes of KV
    # (86.784 us) plus its 99328 FLOPs (0.099 us: a decode step's skinny GEMMs do not hide the math under the
    # reads, so the two add), and its elementwise kernels move 28h + 30q + 26kv + 10f =
    # 1792 + 1920 + 832 + 1280 bytes plus the context's KV gathered and read again (2 * 100 * 128)
    elementwise_us = (5824 + 25600) / 1e3
    layer_us = 2 * (12288 + 128 + 24576) / 1e3 + 100 * 128 / 1e3 + 0.099328 + elementwise_us  # 118.307 us
    head_us = 2 * (256 * 64 + 64) / 1e3 + 0.032768  # LM head + final norm, not hidden by host time
    assert _tiny_step(HOST, 1) == pytest.approx((1000 + 2 * max(200, layer_us) + head_us) * 1e-6, rel=1e-9)
    assert _tiny_step(HOST, 1) == pytest.approx(1432.928768e-6, rel=1e-9)  # the floor (200 us) wins
    gpu_bound = {**HOST, "layer_floor_us": {"1": 50, "2": 50}}
    assert _tiny_step(gpu_bound, 1) == pytest.approx((1000 + 2 * layer_us + head_us) * 1e-6, rel=1e-9)
    # tp=2: per rank 2 q / 1 KV head, half the MLP: 2*(6144+128+12288) + 100*64 bytes = 43.52 us per layer
    # and 49664 FLOPs, elementwise 1792 + 960 + 416 + 640 + 2 * 100 * 64 bytes = 16.608 us, plus its 2
    # all-reduces (20 us) beats the 50 us floor; the head (128 vocab rows, 16.512 us + 16384 FLOPs) adds the
    # embedding all-reduce and the logits all-gather, 10 us each
    layer2 = (2 * (6144 + 128 + 12288) + 100 * 64) / 1e3 + 0.049664 + (3808 + 12800) / 1e3 + 20
    assert _tiny_step(HOST, 2) == pytest.approx((1500 + 2 * max(50, layer2) + 16.512 + 0.016384 + 20) * 1e-6,
                                                rel=1e-9)
    step = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(HOST)).stage_pass(
        ParallelLayout(), stage_shards(TINY, ParallelLayout())[0], 1, 100, prefill=False)
    assert (step.compute_s, step.comm_s) == pytest.approx((2 * layer_us * 1e-6 + head_us * 1e-6, 0.0))
    assert step.host_s == pytest.approx((1000 + 2 * (200 - layer_us)) * 1e-6)


def test_host_floor_prefill_and_plan():
    # one 50-token prompt at tp=1, floor 50 us: a layer reads 73984 weight bytes + writes 50*128 of KV, and
    # its elementwise kernels move 50 * 5824 bytes + the prompt's KV read, gathered and read (3 * 50 * 128)
    gpu_bound = {**HOST, "layer_floor_us": {"1": 50}, "step_overhead_us": {"1": 1000}}
    ttft = (1000 + 2 * (73984 + 50 * 128 + 50 * 5824 + 3 * 50 * 128) / 1e3 + 32.896) * 1e-6
    assert _tiny_step(gpu_bound, 1, prefill=True, tokens=50) == pytest.approx(ttft, rel=1e-9)
    plan = make_plan(TINY, make_cluster("h100-80gb", 1), Workload(150, 50, 100), load_profile(gpu_bound))
    assert plan.results[0].ttft_ms_b1 == pytest.approx(ttft * 1e3, rel=1e-9)
    assert plan.results[0].tpot_ms_b1 == pytest.approx((1000 + 2 * 118.307328 + 32.928768) * 1e-3, rel=1e-9)
    assert "host time measured" in " ".join(plan.notes) and plan.assumptions["host_model"].startswith("measured")
    # compute-bound prefill (1 GFLOP/s): 2 prompts of 8 tokens; causal attention is per prompt (s^2 each)
    slow = {**HOST, "gemm_tflops": 1e-3 / 0.85, "layer_floor_us": {"1": 200}, "step_overhead_us": {"1": 1000}}
    layer = (2 * 16 * 36864 + 2 * 4 * 16 * 2 * 8**2) / 1e3  # 1196.032 us of FLOPs > 200 us floor > 76 us bytes
    layer += (16 * 5824 + 3 * 16 * 128) / 1e3  # + the elementwise kernels, 99.328 us
    head = 2 * 2 * 256 * 64 / 1e3  # logits of the 2 last tokens: 65.536 us
    assert _tiny_step(slow, 1, prefill=True, tokens=16, prompts=2) == pytest.approx(
        (1000 + 2 * layer + head) * 1e-6, rel=1e-9)
    # a measured prefill overhead replaces the step overhead in prefill steps only
    measured = {**gpu_bound, "prefill_overhead_us": {"1": 4000}}
    assert _tiny_step(measured, 1, prefill=True, tokens=50) == pytest.approx(ttft + 3000e-6, rel=1e-9)
    assert _tiny_step(measured, 1) == pytest.approx(_tiny_step(gpu_bound, 1), rel=1e-12)
    plan = make_plan(TINY, make_cluster("h100-80gb", 1), Workload(150, 50, 100), load_profile(measured))
    assert "1000 us per step (4000 prefilling)" in " ".join(plan.notes)
    assert plan.assumptions["prefill_overhead_us_by_tp"] == {"1": pytest.approx(4000)}


def test_graph_decode_runs_at_the_padded_shape_and_eager_steps_take_the_eager_floor():
    graphs = {**HOST, "engine": {"cuda_graphs": True}, "eager_layer_floor_us": {"1": 400, "2": 100},
              "allreduce_graph": HOST["allreduce"]}
    eager_floor = {**HOST, "layer_floor_us": {"1": 400, "2": 100}}  # an eager engine whose floor is 400 us
    # 3 sequences at context 100 replay the (4, 256) graph: the work of 4 sequences at 256 (its GPU time beats the
    # 200 us floor, so eagerly that is the layer's time); in a graph the floor's small kernels add to it
    assert _tiny_step(graphs, 1, tokens=3, context=100) == pytest.approx(
        _tiny_step(HOST, 1, tokens=4, context=256) + 2 * 200e-6, rel=1e-12)
    # at tp=2 the floor (50 us) less the two all-reduces it holds (10 us each in the graph) adds per layer
    assert _tiny_step(graphs, 2, tokens=3, context=100) == pytest.approx(
        _tiny_step(HOST, 2, tokens=4, context=256) + 2 * 30e-6, rel=1e-12)
    # a prefill runs eagerly: the eager floor (a 1-token prompt's layer is ~83 us of GPU work, under both floors)
    assert _tiny_step(graphs, 1, prefill=True) == pytest.approx(_tiny_step(eager_floor, 1, prefill=True), rel=1e-12)
    assert _tiny_step(graphs, 1, prefill=True) == pytest.approx(_tiny_step(HOST, 1, prefill=True) + 2 * 200e-6)
    cm = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(graphs))
    assert cm.decode_shape(3, 100) == (4, 256, True)
    assert cm.decode_shape(200, 1000) == (256, 1024, True)
    assert cm.decode_shape(256, 2048) == (256, 2048, False)  # 256 x 2048 > GRAPH_TOKENS: no graph, eager
    assert cm.decode_shape(1, 9000) == (1, 9000, False)  # past the longest captured context
    # a bench file that ran eagerly is predicted eagerly whatever the profile's engine did; MoE never pads
    assert CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(graphs), cuda_graphs=False).decode_shape(3, 100) \
        == (3, 100, False)
    assert CostModel(load_model("mixtral-8x7b"), make_cluster("h100-80gb", 8)).decode_shape(3, 100) == (3, 100, False)


def test_decode_reads_weights_at_the_one_row_gemm_rate_and_each_further_sequence_costs_host_time():
    # one-row GEMMs of 1000 and 2000 bytes took 2 and 4 us: 0.5 GB/s at every size, half the copy-rate share
    # (1 GB/s) the hand-worked steps use; the KV cache and prefills keep the copy rate
    extra = {"gemv": [[1000, 2.0], [2000, 4.0]], "step_overhead_per_seq_us": {"1": 20}}
    gpu_bound = {**HOST, "layer_floor_us": {"1": 50, "2": 50}}
    cm = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile({**gpu_bound, **extra}))
    assert cm.decode_read_s(4 * 1500, 4, 1000) == pytest.approx((4 * 3 + 1) * 1e-6)
    # tp=1 batch 1 context 100: each layer's 73.984 us of weights take twice as long, the head's 32.896 us too
    assert _tiny_step({**gpu_bound, **extra}, 1) == pytest.approx(
        _tiny_step(gpu_bound, 1) + (2 * 73.984 + 32.896) * 1e-6, rel=1e-9)
    # 2 further sequences: 20 us of host time each, added in full without async scheduling; with it (the
    # engine's default) done while the GPU runs the step before, so only what passes the step's time costs
    no_seq = {**gpu_bound, **extra, "step_overhead_per_seq_us": {"1": 0}}
    assert _tiny_step({**gpu_bound, **extra}, 1, tokens=3, async_scheduling=False) - _tiny_step(
        no_seq, 1, tokens=3, async_scheduling=False) == pytest.approx(40e-6)
    assert _tiny_step({**gpu_bound, **extra}, 1, tokens=3) == pytest.approx(_tiny_step(no_seq, 1, tokens=3))
    host_bound = {**gpu_bound, **extra, "step_overhead_per_seq_us": {"1": 1e5}}  # 0.2 s for the two
    assert 0.2 < _tiny_step(host_bound, 1, tokens=3) < 0.2 + _tiny_step(no_seq, 1, tokens=3) - 1e-6
    assert _tiny_step({**gpu_bound, **extra}, 1, prefill=True, tokens=50) == pytest.approx(
        _tiny_step(gpu_bound, 1, prefill=True, tokens=50), rel=1e-12)


def test_fp8_decode_reads_weights_at_the_measured_fp8_rate_for_its_rows():
    """a profile's gemv_fp8 (the engine's FP8 path per weight bytes at 1, 8, 32 rows): an FP8 model's decode
    GEMMs take the curves' time at its batch, interpolated linearly between the measured rows (past the
    most: theirs); its LM head, in the model dtype, at the one-row bf16 curve; bf16 models as before"""
    fp8_curves = {"1": [[1000, 4.0], [2000, 8.0]], "8": [[1000, 8.0], [2000, 16.0]], "32": [[1000, 16.0], [2000, 32.0]]}
    base = {**HOST, "layer_floor_us": {"1": 50, "2": 50}, "gemv": [[1000, 2.0], [2000, 4.0]]}
    prof = load_profile({**base, "gemv_fp8": fp8_curves})
    assert sorted(prof.gemv_fp8) == [1, 8, 32]
    cm = CostModel(replace(TINY, quantization="fp8"), make_cluster("h100-80gb", 1), prof)
    for rows, per_byte_us in ((1, 4e-3), (4, 4e-3 + 4e-3 * 3 / 7), (8, 8e-3), (9, 8e-3 + 8e-3 / 24), (64, 16e-3)):
        assert cm.decode_read_s(4 * 1500, 4, 0, fp8_rows=rows) == pytest.approx(4 * 1500 * per_byte_us * 1e-6)
    assert cm.decode_read_s(4 * 1500, 4, 0) == pytest.approx(4 * 3e-6)  # not FP8: the bf16 curve
    fp8 = replace(TINY, quantization="fp8")
    assert _step({**base, "gemv_fp8": fp8_curves}, fp8, 1) > _step(base, fp8, 1)  # slower than the bf16 curve here
    assert _step({**base, "gemv_fp8": fp8_curves}, TINY, 1) == _step(base, TINY, 1)
    with pytest.raises(PlanError, match="gemv_fp8"):
        load_profile({**base, "gemv_fp8": {"0": [[1000, 1.0]]}})


def test_decode_gemms_take_the_measured_curve_at_their_rows_with_the_math_inside():
    """gemv_rows (bf16 GEMMs measured at 8 rows): a decode step of 8 sequences reads its weights at that
    curve and adds none of its GEMMs' FLOPs (the curve timed them); between 1 and 8 rows the curves are
    interpolated; past 8 rows the rows beyond add their share of the math"""
    base = {**HOST, "layer_floor_us": {"1": 50, "2": 50}, "gemv": [[1000, 2.0], [2000, 4.0]]}
    rows8 = {**base, "gemv_rows": {"8": [[1000, 6.0], [2000, 12.0]]}}
    cm = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(rows8))
    assert cm.measured_rows(False) == 8 and cm.measured_rows(True) == 8  # (no FP8 curves: the bf16 ones)
    assert CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(base)).measured_rows(False) == 1
    assert cm.decode_read_s(4 * 1500, 4, 0, rows=8) == pytest.approx(4 * 1500 * 6e-3 * 1e-6)
    assert cm.decode_read_s(4 * 1500, 4, 0, rows=4) == pytest.approx(4 * 1500 * (2e-3 + 4e-3 * 3 / 7) * 1e-6)
    assert cm.decode_read_s(4 * 1500, 4, 0, rows=20) == pytest.approx(4 * 1500 * 6e-3 * 1e-6)
    # batch 8: a layer's 73,984 bytes of weights take 443.904 us instead of 147.968 (one-row curve) and its
    # GEMMs' 589,824 FLOPs (0.589824 us) are not added; the LM head's 32,896 bytes 197.376 instead of 65.792
    # us, less its 262,144 FLOPs
    diff = 2 * (443.904 - 147.968 - 0.589824) + (197.376 - 65.792 - 0.262144)
    assert _tiny_step(rows8, 1, tokens=8) - _tiny_step(base, 1, tokens=8) == pytest.approx(diff * 1e-6, rel=1e-9)
    # batch 16: past the curve's 8 rows, half the GEMMs' FLOPs are added back
    gemm_flops = 2 * 2 * 16 * (12288 + 24576) + 2 * 16 * 256 * 64  # (2 layers' GEMMs, then the head)
    reads_1row, reads_8rows = (2 * 147.968 + 65.792) * 1e-6, (2 * 443.904 + 197.376) * 1e-6
    want = _tiny_step(base, 1, tokens=16) - reads_1row - gemm_flops * 1e-12 + reads_8rows + gemm_flops / 2 * 1e-12
    assert _tiny_step(rows8, 1, tokens=16) == pytest.approx(want, rel=1e-9)
    with pytest.raises(PlanError, match="gemv_rows"):
        load_profile({**base, "gemv_rows": {"x": [[1000, 1.0]]}})


def test_a_prefill_within_the_measured_rows_takes_the_curves_time():
    """a prefill of no more tokens than the GEMM curves' rows prices its dense layers' GEMMs at the curve for
    that many rows (the math inside), its attention math and KV write beside them; a longer one, and the
    head, the roofline as before"""
    base = {**HOST, "layer_floor_us": {"1": 50, "2": 50}, "gemv": [[1000, 2.0], [2000, 4.0]]}
    rows8 = {**base, "gemv_rows": {"8": [[1000, 6.0], [2000, 12.0]]}}
    assert _tiny_step(rows8, 1, prefill=True, tokens=16) == _tiny_step(base, 1, prefill=True, tokens=16)
    cm = CostModel(TINY, make_cluster("h100-80gb", 2), load_profile(rows8))
    # a layer of 8 prompt tokens: 73,984 bytes of weights in 4 GEMMs, 1,024 of KV written, 589,824 GEMM
    # FLOPs and 8,192 of attention (2 x 4 heads x 16 x 8 x 8)
    curve = cm.decode_read_s(73984, 4, 1024, rows=8) + 8192 / cm.flops_ps
    roofline = max((73984 + 1024) / cm.hbm_bps, (589824 + 8192) / cm.flops_ps)
    got = _tiny_step(rows8, 1, prefill=True, tokens=8) - _tiny_step(base, 1, prefill=True, tokens=8)
    assert got == pytest.approx(TINY.n_layers * (curve - roofline), rel=1e-9)


# TINY's own layers timed at 2 and 6 layers (decode at context 100, a 50-token prompt): decode 300 us a layer
# + 900 us at no layers, prefill 400 us a layer + 2200 us (tp=1); decode 100 us + 800 us (tp=2)
TIMED = {"model": "random:tiny", "shape": dict(TINY.layer_shape), "decode_context": 100, "prompt_len": 50,
         "times_ms": {"1": {"2": {"decode_step": 1.5, "ttft": 3.0}, "6": {"decode_step": 2.7, "ttft": 4.6}},
                      "2": {"2": {"decode_step": 1.0, "ttft": 3.0}, "6": {"decode_step": 1.4, "ttft": 4.6}}}}


def _step(profile, model, tp, **kw):
    cm = CostModel(model, make_cluster("h100-80gb", 2), load_profile(profile))
    lay = ParallelLayout(tp=tp)
    if kw.get("prefill"):
        return cm.prefill_step(lay, stage_shards(model, lay), kw["tokens"])[0]
    return cm.decode_step(lay, stage_shards(model, lay), kw.get("tokens", 1), kw.get("context", 100))[0]


@pytest.mark.parametrize("graphs", [False, True])
def test_timed_model_layers_reproduce_the_measured_line(graphs):
    base = {**HOST, "engine": {"cuda_graphs": graphs}, "allreduce_graph": HOST["allreduce"]}
    timed = {**base, "model_layers": TIMED}
    for layers, tp, decode_ms in ((2, 1, 1.5), (4, 1, 2.1), (10, 1, 3.9), (2, 2, 1.0), (4, 2, 1.2)):
        model = replace(TINY, n_layers=layers)  # same layer shape, any depth: the line through the two points
        assert _step(timed, model, tp) == pytest.approx(decode_ms * 1e-3, rel=1e-9)
    # the prefill line at tp=1 (host-bound: a 50-token layer's GPU work is under 400 us)
    assert _step(timed, replace(TINY, n_layers=4), 1, prefill=True, tokens=50) == pytest.approx(3.8e-3, rel=1e-9)
    # a larger step grows by what the formulas add, as without the timed layers
    model = replace(TINY, n_layers=4)
    grow = _step(timed, model, 1, tokens=3, context=400) - _step(timed, model, 1)
    if graphs:  # every graph layer adds the same correction: the growth is the formulas' own
        assert grow == pytest.approx(_step(base, model, 1, tokens=3, context=400) - _step(base, model, 1), rel=1e-9)
    else:  # eager: a 3 x 400 step's layer, 74 us of weights + 154 of KV + 307 gathered + 17 elementwise + its
        # GEMM and attention FLOPs, beats the 300 us timed floor by 252.8 us; the head's math grows by 2 x 32.768 ns
        layer = 73.984 + 153.6 + 307.2 + 3 * 5.824 + (3 * 73728 + 4 * 4 * 16 * 3 * 400) / 1e6
        assert grow == pytest.approx((4 * (layer - 300) + 2 * 0.032768) * 1e-6, rel=1e-9)
    # other shapes, and TP sizes the probe did not time, keep the tiny model's floor
    for other in (replace(TINY, ffn=256), replace(TINY, bytes_per_param=4)):  # another shape or weight dtype
        assert _step(timed, other, 1) == _step(base, other, 1)
    # FP8 weights or KV cache: the timed layers apply, corrected by what the formulas missed for the model as
    # timed (bf16 weights and KV), the reads their own; an eager floor loses the GPU work they save (the timed
    # layer's time may have been its GPU work): the same correction, a shorter step
    as_timed = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(timed))
    for fp8 in (CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(timed), kv_bytes=1),
                CostModel(replace(TINY, quantization="fp8"), make_cluster("h100-80gb", 1), load_profile(timed))):
        assert fp8.model_layers_apply
        (floor, fix, over), (floor0, fix0, over0) = (c.calibrated(1, prefill=False, graphed=graphs)
                                                     for c in (fp8, as_timed))
        assert (fix, over) == (fix0, over0) and (floor == floor0 if graphs else floor < floor0)
    fp8 = replace(TINY, quantization="fp8")
    assert _step(timed, fp8, 1) < _step(timed, TINY, 1)
    # an FP8 LM head: the same correction (found for the model as timed, its head in bf16), its reads halved
    assert _step(timed, replace(fp8, fp8_lm_head=True), 1) < _step(timed, fp8, 1)
    only_tp1 = {**base, "model_layers": {**TIMED, "times_ms": {"1": TIMED["times_ms"]["1"]}}}
    assert _step(only_tp1, TINY, 2) == _step(base, TINY, 2)
    assert _step(only_tp1, TINY, 1) == _step(timed, TINY, 1)


def test_replayed_decode_graphs_correct_a_graph_layer_at_each_batch():
    """model_layers.graph_us (the engine's decode graphs replayed alone at a few batches, two depths): a graph
    layer's correction is found at each replayed batch, so a layer at that batch with one key of context (as
    the replays ran; their attention stays in the correction) costs the replayed per-layer time; between the
    batches it is interpolated, past the last held; the host term, prefill and eager steps keep the
    batch-1 calibration; without graph_us nothing changes"""
    base = {**HOST, "engine": {"cuda_graphs": True}, "allreduce_graph": HOST["allreduce"]}
    # per layer: 300 us at batch 1, 500 at batch 8 (2 and 6 layers)
    graphs = {"1": {"2": {"1": 1000.0, "8": 1300.0}, "6": {"1": 2200.0, "8": 3300.0}}}
    replayed = {**base, "model_layers": {**TIMED, "graph_us": graphs}}
    with_graphs = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(replayed))
    plain = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile({**base, "model_layers": TIMED}))
    lay = ParallelLayout(tp=1)
    sh = stage_shards(TINY, lay)[0]
    for batch, per_layer in ((1, 300e-6), (8, 500e-6)):
        layer = replace(with_graphs._work(lay, sh, batch, 1.0, False, 1, True)[0], attention_s=0.0)
        floor = with_graphs.calibrated(1, False, True, batch=batch)[0]
        assert floor + with_graphs._gpu_s(layer, False) + layer.comm_s == pytest.approx(per_layer, rel=1e-9)
    f1, f4, f8, f64 = (with_graphs.calibrated(1, False, True, batch=b)[0] for b in (1, 4, 8, 64))
    assert f4 == pytest.approx(f1 + (f8 - f1) * 3 / 7) and f64 == f8 and f8 > f1
    assert with_graphs.calibrated(1, False, True, batch=8)[1:] == plain.calibrated(1, False, True, batch=8)[1:]
    assert with_graphs.calibrated(1, True, False) == plain.calibrated(1, True, False)
    assert plain.calibrated(1, False, True, batch=8) == plain.calibrated(1, False, True)
    # a decode step at batch 8 grows by the layers' corrections
    grow = _step(replayed, TINY, 1, tokens=8) - _step({**base, "model_layers": TIMED}, TINY, 1, tokens=8)
    assert grow == pytest.approx(TINY.n_layers * (f8 - plain.calibrated(1, False, True)[0]), rel=1e-6)
    plan = make_plan(TINY, make_cluster("h100-80gb", 1), Workload(150, 50, 100), load_profile(replayed))
    assert "(decode graphs replayed at batch 1, 8: a graph layer's correction taken at its batch)" in " ".join(plan.notes)
    eager = {**HOST, "engine": {"cuda_graphs": False}, "model_layers": {**TIMED, "graph_us": graphs}}
    assert _step(eager, TINY, 1, tokens=8) == _step({**eager, "model_layers": TIMED}, TINY, 1, tokens=8)


def test_fp8_decode_graphs_correct_an_fp8_layer():
    """model_layers.graph_us_fp8 (the decode graphs of the model with FP8 weights): an FP8 model's graph
    layer costs the FP8 replay's per-layer time at its batch (whatever its KV cache and LM head: a layer's
    correction), not the bf16 replay's correction on FP8 work; a bf16 model ignores them"""
    base = {**HOST, "engine": {"cuda_graphs": True}, "allreduce_graph": HOST["allreduce"]}
    graphs = {"1": {"2": {"1": 1000.0, "8": 1300.0}, "6": {"1": 2200.0, "8": 3300.0}}}  # 300 / 500 us a layer
    fp8_graphs = {"1": {"2": {"1": 800.0, "8": 1000.0}, "6": {"1": 1600.0, "8": 2200.0}}}  # 200 / 300 us
    both = load_profile({**base, "model_layers": {**TIMED, "graph_us": graphs, "graph_us_fp8": fp8_graphs}})
    bf16_only = load_profile({**base, "model_layers": {**TIMED, "graph_us": graphs}})
    lay = ParallelLayout(tp=1)
    fp8 = replace(TINY, quantization="fp8")
    for model, kv in ((fp8, 2), (fp8, 1), (replace(fp8, fp8_lm_head=True), 2)):
        cm = CostModel(model, make_cluster("h100-80gb", 1), both, kv_bytes=kv)
        own = CostModel(replace(model, fp8_lm_head=False), make_cluster("h100-80gb", 1), both)
        sh = stage_shards(fp8, lay)[0]
        for batch, per_layer in ((1, 200e-6), (8, 300e-6)):
            layer = replace(own._work(lay, sh, batch, 1.0, False, 1, True)[0], attention_s=0.0)
            floor = cm.calibrated(1, False, True, batch=batch)[0]
            assert floor + own._gpu_s(layer, False) + layer.comm_s == pytest.approx(per_layer, rel=1e-9)
        old = CostModel(model, make_cluster("h100-80gb", 1), bf16_only, kv_bytes=kv)
        assert cm.calibrated(1, False, True, batch=8)[0] != old.calibrated(1, False, True, batch=8)[0]
    assert (CostModel(TINY, make_cluster("h100-80gb", 1), both).calibrated(1, False, True, batch=8)
            == CostModel(TINY, make_cluster("h100-80gb", 1), bf16_only).calibrated(1, False, True, batch=8))
    plan = make_plan(fp8, make_cluster("h100-80gb", 1), Workload(150, 50, 100), both)
    assert ("(decode graphs replayed at batch 1, 8, bf16 and FP8 weights: a graph layer's correction"
            in " ".join(plan.notes))
    with pytest.raises(PlanError, match="graph_us_fp8"):
        load_profile({**base, "model_layers": {**TIMED, "graph_us_fp8": {"1": {"2": {"1": 800.0}}}}})


def test_timed_attention_takes_the_place_of_the_kv_read_and_the_attention_math():
    """model_layers' attention_us (the engine's decode attention on one rank's heads, per batch, against
    context): a dense layer's decode attention takes the curves' time, interpolated between the measured
    batches, instead of its KV read and attention FLOPs; the timed line is still reproduced at its own shape
    (the correction takes the curve in); an FP8 KV cache takes attention_us_fp8 (timed with an FP8 cache);
    without those, the torch attention path and untimed TP sizes keep the formula"""
    attn = {"1": {"1": [[100, 10.0], [1000, 40.0]], "4": [[100, 20.0], [1000, 100.0]]}}
    base = {**HOST, "engine": {"cuda_graphs": True, "attention_backend": "triton"},
            "allreduce_graph": HOST["allreduce"], "model_layers": TIMED}
    timed = {**base, "model_layers": {**TIMED, "attention_us": attn}}
    prof = load_profile(timed)
    ml = prof.model_layers
    assert ml.attention_us(1, 1, 550) == pytest.approx(25.0)
    assert ml.attention_us(1, 2.5, 100) == pytest.approx(15.0)  # halfway from batch 1 to 4
    assert ml.attention_us(1, 8, 1000) == pytest.approx(200.0)  # past the most measured: scaled by the batch
    assert ml.attention_us(2, 1, 100) is None
    one_gpu = make_cluster("h100-80gb", 1)
    assert CostModel(TINY, one_gpu, prof).timed_attention_s(1, 1, 550) == pytest.approx(25e-6)
    assert CostModel(TINY, one_gpu, prof, kv_bytes=1).timed_attention_s(1, 1, 550) == 0.0
    assert CostModel(TINY, one_gpu, prof, attention_backend="torch").timed_attention_s(1, 1, 550) == 0.0
    fp8_attn = {"1": {"1": [[100, 12.0], [1000, 30.0]]}}
    with_fp8 = load_profile({**base, "model_layers": {**TIMED, "attention_us": attn, "attention_us_fp8": fp8_attn}})
    assert with_fp8.model_layers.attention_us(1, 1, 550, fp8=True) == pytest.approx(21.0)
    assert CostModel(TINY, one_gpu, with_fp8, kv_bytes=1).timed_attention_s(1, 1, 550) == pytest.approx(21e-6)
    assert CostModel(TINY, one_gpu, with_fp8).timed_attention_s(1, 1, 550) == pytest.approx(25e-6)
    # a mixed step's decodes (the serving simulation) take the same curve over every layer, else their KV read
    lay, shards = ParallelLayout(tp=1), stage_shards(TINY, ParallelLayout(tp=1))
    layers = sum(sh.n_layers for sh in shards)
    assert CostModel(TINY, one_gpu, prof).decode_attention_s(lay, shards, 1, 550) == pytest.approx(layers * 25e-6)
    untimed = CostModel(TINY, one_gpu, prof, kv_bytes=1)
    assert untimed.decode_attention_s(lay, shards, 2, 550) == pytest.approx(
        2 * 550 * untimed.kv_per_token(shards[0]) / untimed.hbm_bps)
    model = replace(TINY, n_layers=4)
    assert _step(timed, model, 1) == pytest.approx(2.1e-3, rel=1e-9)  # (the line through the timed depths)
    # a context of 1000: each graph layer's attention takes 30 us more, and nothing else changes
    assert _step(timed, model, 1, context=1000) - _step(timed, model, 1) == pytest.approx(4 * 30e-6, rel=1e-9)
    # without the curve the layer reads 900 more tokens of KV (115.2 us) and does their attention math
    grow = _step(base, model, 1, context=1000) - _step(base, model, 1)
    assert grow == pytest.approx(4 * (115.2 + 4 * 4 * 16 * 900 / 1e6) * 1e-6, rel=1e-9)
    with pytest.raises(PlanError, match="attention_us"):
        load_profile({**base, "model_layers": {**TIMED, "attention_us": {"1": {"0": [[100, 1.0]]}}}})
    with pytest.raises(PlanError, match="attention_us_fp8"):
        load_profile({**base, "model_layers": {**TIMED, "attention_us_fp8": [[100, 1.0]]}})


def test_timed_layer_gemms_take_the_place_of_the_weight_curves():
    """model_layers' gemm_us (a dense layer's four GEMMs of this model per rows, bf16 and FP8): a decode step
    of a timed batch, and a prefill of no more tokens than the most rows, take the timed GEMMs instead of the
    weight reads and the GEMMs' FLOPs, interpolated between the measured rows; an FP8 model takes the FP8
    times; past the most rows, an untimed TP size or format, the curves as before; bad tables are refused"""
    gemms = {"1": {"bf16": {"1": 100.0, "8": 140.0}, "fp8": {"1": 60.0, "8": 90.0}}}
    base = {**HOST, "engine": {"cuda_graphs": True, "attention_backend": "triton"},
            "allreduce_graph": HOST["allreduce"], "model_layers": TIMED}
    timed = {**base, "model_layers": {**TIMED, "gemm_us": gemms}}
    ml = load_profile(timed).model_layers
    assert ml.gemm_us(1, 1, False) == 100.0 and ml.gemm_us(1, 4.5, False) == pytest.approx(120.0)
    assert ml.gemm_us(1, 8, True) == 90.0 and ml.gemm_us(1, 9, False) is None and ml.gemm_us(2, 1, False) is None
    one_gpu = make_cluster("h100-80gb", 1)
    model = replace(TINY, n_layers=4)
    lay, shards = ParallelLayout(tp=1), stage_shards(model, ParallelLayout(tp=1))
    untimed, cm = (CostModel(model, one_gpu, load_profile(p)) for p in (base, timed))
    assert cm.timed_gemm_s(1, 8, False) == pytest.approx(140e-6) and untimed.timed_gemm_s(1, 8, False) == 0.0
    # the timed model's own line is still reproduced (the correction takes the timed GEMMs in) ...
    assert _step(timed, model, 1) == pytest.approx(_step(base, model, 1), rel=1e-9)
    # ... and a batch of 8 adds each layer's timed growth (40 us) where the curves gave their own
    grow = cm.decode_step(lay, shards, 8, 100)[0] - cm.decode_step(lay, shards, 1, 100)[0]
    grow_untimed = untimed.decode_step(lay, shards, 8, 100)[0] - untimed.decode_step(lay, shards, 1, 100)[0]
    dense = [w for w in cm._work(lay, shards[0], 8, 100, prefill=False, prompts=1) if w.gemms == 4]
    old = [w for w in untimed._work(lay, shards[0], 8, 100, prefill=False, prompts=1) if w.gemms == 4]
    assert dense[0].timed_gemm_s == pytest.approx(140e-6) and old[0].timed_gemm_s == 0.0
    # (without curves the untimed layer's GEMMs grow by their FLOPs: 7 rows x 2 x 36,864 weights)
    assert grow - grow_untimed == pytest.approx(4 * (40e-6 - 7 * 2 * 36864 / cm.flops_ps), rel=1e-6)
    # a prefill of 8 tokens run eagerly: its layers' GEMMs as timed at 8 rows; of 9 (past the most rows): as
    # before; replayed as a mixed-step graph, 8 tokens run at 16 rows, past the most too
    eager = CostModel(model, one_gpu, load_profile(timed), cuda_graphs=False)
    assert eager._work(lay, shards[0], 8, 0, prefill=True, prompts=1)[0].timed_gemm_s == pytest.approx(140e-6)
    assert eager._work(lay, shards[0], 9, 0, prefill=True, prompts=1)[0].timed_gemm_s == 0.0
    assert cm._work(lay, shards[0], 8, 0, prefill=True, prompts=1)[0].timed_gemm_s == 0.0
    fp8 = CostModel(replace(model, quantization="fp8"), one_gpu, load_profile(timed))
    assert fp8._work(lay, shards[0], 1, 100, prefill=False, prompts=1)[0].timed_gemm_s == pytest.approx(60e-6)
    for bad, message in (({"1": {"int4": {"1": 1.0}}}, '"bf16" and/or "fp8"'), ({"1": {"bf16": {}}}, "map rows"),
                         ({"1": {"bf16": {"1": -2.0}}}, "gemm_us.1.bf16.1"), ({"x": {"bf16": {"1": 1.0}}}, "gemm_us")):
        with pytest.raises(PlanError, match=message):
            load_profile({**base, "model_layers": {**TIMED, "gemm_us": bad}})


def test_a_timed_correction_is_found_the_way_the_step_it_corrects_is_priced():
    """calibrated() prices the timed shape as the corrected step is priced: a prefill past the curves' rows
    (the roofline) takes a correction found at the roofline, though the timed prompt is within the curves'
    rows; a decode batch past the timed GEMMs' rows one found on the curves"""
    fast = {**TIMED, "times_ms": {"1": {"2": {"decode_step": 1.5, "ttft": 3.0}, "6": {"decode_step": 2.7, "ttft": 3.04}}}}
    base = {**HOST, "layer_floor_us": {"1": 50, "2": 50}, "gemv": [[1000, 2.0], [2000, 4.0]], "model_layers": fast}
    curves = {**base, "gemv_rows": {"64": [[1000, 9.0], [2000, 18.0]]}}  # (the timed 50-token prompt is within)
    model = replace(TINY, n_layers=4)
    assert _step(curves, model, 1, prefill=True, tokens=1024) == pytest.approx(
        _step(base, model, 1, prefill=True, tokens=1024), rel=1e-12)
    # (within the curves' rows they price it: the timed prompt is reproduced either way, a longer one is not)
    assert _step(curves, model, 1, prefill=True, tokens=50) == pytest.approx(_step(base, model, 1, prefill=True, tokens=50))
    assert _step(curves, model, 1, prefill=True, tokens=64) != pytest.approx(_step(base, model, 1, prefill=True, tokens=64))
    gemms = {**curves, "model_layers": {**fast, "gemm_us": {"1": {"bf16": {"1": 30.0, "64": 60.0}}}}}
    assert _step(gemms, model, 1, tokens=200) == pytest.approx(_step(curves, model, 1, tokens=200), rel=1e-12)


def test_timed_layers_faster_than_predicted_correct_the_gpu_work():
    # tp=1 decode timed at 50 us a layer (1.0 ms at 2 layers, 1.2 at 6): under the 118.3 us the formulas give
    fast = {**TIMED, "times_ms": {"1": {"2": {"decode_step": 1.0, "ttft": 3.0}, "6": {"decode_step": 1.2, "ttft": 4.6}}}}
    timed = {**HOST, "model_layers": fast}
    assert _step(timed, TINY, 1) == pytest.approx(1.0e-3, rel=1e-9)
    assert _step(timed, replace(TINY, n_layers=4), 1) == pytest.approx(1.1e-3, rel=1e-9)
    cm = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(timed))
    floor, gpu_fix, overhead = cm.calibrated(1, prefill=False, graphed=False)
    assert (floor, gpu_fix, overhead) == pytest.approx((50e-6, (50 - 118.307328) * 1e-6, (900 - 32.928768) * 1e-6))
    plan = make_plan(TINY, make_cluster("h100-80gb", 2), Workload(150, 50, 100), load_profile(timed))
    assert "layers of this shape timed by the probe (random:tiny), used at tp=1; tp=2 not timed" in " ".join(plan.notes)
    other = make_plan(replace(TINY, vocab=512), make_cluster("h100-80gb", 1), Workload(150, 50, 100), load_profile(timed))
    assert "of another layer shape or dtype" in " ".join(other.notes)
    assert "`shardlm probe --model` with this model (random:<preset> or its config.json)" in " ".join(other.notes)
    untimed = make_plan(TINY, make_cluster("h100-80gb", 1), Workload(150, 50, 100), load_profile(HOST))
    assert "this model's own layers not timed" in " ".join(untimed.notes)


@pytest.mark.parametrize("patch,msg", [
    ({"shape": {"hidden": 64}}, "field 'model_layers.shape'"),
    ({"prompt_len": 0}, "field 'model_layers.prompt_len'"),
    ({"decode_context": -1}, "field 'model_layers.decode_context'"),
    ({"times_ms": {}}, "field 'model_layers.times_ms'"),
    ({"times_ms": {"0": {}}}, "field 'model_layers.times_ms.0'"),
    ({"times_ms": {"1": {"2": {"decode_step": 1.0, "ttft": 2.0}}}}, "field 'model_layers.times_ms.1'"),
    ({"times_ms": {"1": {"2": {"decode_step": 1.0, "ttft": 2.0}, "x": {}}}}, "field 'model_layers.times_ms.1.x'"),
    ({"times_ms": {"1": {"2": {"decode_step": 1.0}, "4": {"decode_step": 2.0, "ttft": 3.0}}}},
     "field 'model_layers.times_ms.1.2.ttft'"),
    ({"times_ms": {"1": {"2": {"decode_step": -1.0, "ttft": 2.0}, "4": {"decode_step": 2.0, "ttft": 3.0}}}},
     "field 'model_layers.times_ms.1.2.decode_step'"),
    ({"model": None}, "field 'model_layers' is missing 'model'"),
    ({"times_ms": {"1": {"2": {"decode_step": 1.0, "ttft": 2.0}, " 2": {"decode_step": 2.0, "ttft": 3.0}}}},
     "field 'model_layers.times_ms.1. 2'"),
    ({"times_ms": {"1": {"2": [1.0, 2.0], "4": {"decode_step": 2.0, "ttft": 3.0}}}}, "field 'model_layers.times_ms.1.2'"),
    ({"times_ms": {"1": {"2": {"decode_step": 1e308, "ttft": 2.0}, "4": {"decode_step": 2.0, "ttft": 3.0}}}},
     "field 'model_layers.times_ms.1.2.decode_step'"),
    ({"times_ms": {"1": TIMED["times_ms"]["1"], " 1": TIMED["times_ms"]["1"]}}, "field 'model_layers.times_ms. 1'"),
    ({"shape": {**TIMED["shape"], "hidden": "64"}}, "field 'model_layers.shape.hidden'"),
    ({"shape": {**TIMED["shape"], "qk_norm": 0}}, "field 'model_layers.shape.qk_norm'"),
    ({"graph_us": {"1": {"2": {"1": 900.0}}}}, "field 'model_layers.graph_us.1'"),  # one depth
    ({"graph_us": {"1": {"2": {"1": 900.0}, "6": {"8": 1000.0}}}}, "field 'model_layers.graph_us.1'"),
    ({"graph_us": {"1": {"2": {"1": -1.0}, "6": {"1": 1000.0}}}}, "field 'model_layers.graph_us.1.2.1'"),
    ({"graph_us": {"1": {"2": {"0": 1.0}, "6": {"0": 1000.0}}}}, "field 'model_layers.graph_us.1.2.0'"),
    ({"graph_us": [900.0]}, "field 'model_layers.graph_us'"),
])
def test_malformed_model_layers_name_the_field(patch, msg):
    layers = {k: v for k, v in {**TIMED, **patch}.items() if v is not None}
    with pytest.raises(PlanError, match=re.escape(msg)):
        load_profile({**HOST, "model_layers": layers})
    no_host = {k: v for k, v in HOST.items() if k not in ("step_overhead_us", "layer_floor_us")}
    with pytest.raises(PlanError, match="'model_layers' needs 'step_overhead_us' and 'layer_floor_us'"):
        load_profile({**no_host, "model_layers": TIMED})


def test_host_table_interpolates_in_log2_tp():
    base = {**HOST, "step_overhead_us": {"1": 1000, "4": 3000}, "layer_floor_us": {"2": 200, "4": 100}}
    prof = load_profile(base)
    so, lf = prof.step_overhead, prof.layer_floor
    assert so.at(2) == pytest.approx(2000)  # halfway in log2
    assert so.at(3) == pytest.approx(1000 + 2000 * math.log2(3) / 2)
    assert so.at(8) == pytest.approx(4000)  # the last segment extended: +1000 per doubling
    assert lf.at(1) == 200  # below the smallest measured size: held
    assert lf.at(8) == 100  # a falling last segment is not extended below the largest's value
    assert load_profile({**HOST, "step_overhead_us": {"2": 7}}).step_overhead.at(16) == 7


def test_without_host_fields_the_graph_assumptions_stay():
    graph = {k: v for k, v in HOST.items() if k not in ("step_overhead_us", "layer_floor_us")}
    cm = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(graph))
    assert not cm.host_calibrated
    step = _tiny_step(graph, 1)  # roofline of the stage, >= 2 x 15 us, + its elementwise kernels: 269 us
    # async scheduling: the 500 us of host work per step, done while the GPU runs the previous step, set the pace
    assert step == pytest.approx(500e-6, rel=1e-9)
    lay = ParallelLayout()
    sync = CostModel(TINY, make_cluster("h100-80gb", 1), load_profile(graph), async_scheduling=False)
    assert sync.decode_step(lay, stage_shards(TINY, lay), 1, 100)[0] == pytest.approx(
        (2 * 86.784 + 32.896 + 2 * 31.424 + 500) * 1e-6, rel=1e-9)  # the synchronous engine: one after the other
    plan = make_plan(TINY, make_cluster("h100-80gb", 1), Workload(150, 50, 100), load_profile(graph))
    assert "no measured host time" in " ".join(plan.notes)


def test_host_profile_fields_parse():
    prof = load_profile({**HOST, "topology": {"interconnect": "pcie", "raw": "PIX"}, "engine": {"cuda_graphs": False}})
    assert prof.host_calibrated and prof.step_overhead.values == {1: 1000.0, 2: 1500.0}
    assert (prof.topology, prof.topology_raw, prof.cuda_graphs) == ("pcie", "PIX", False)
    assert not load_profile(PROFILE).host_calibrated
    # a one-GPU host measures no group: its TP collectives fall back to the --interconnect preset
    one = load_profile({**HOST, "allreduce": {}, "all_to_all": {}})
    cm = CostModel(TINY, make_cluster("h100-80gb", 4), one)
    assert one.allreduce is None and cm.allreduce([0, 1, 2, 3], 16384) == pytest.approx((8 + 1.5 * 16384 / 360e3) * 1e-6)
    assert cm.allreduce([0, 1, 2, 3], 16384, nccl=True) == pytest.approx((12 + 1.5 * 16384 / 360e3) * 1e-6)
    assert "measured no all-reduce" in " ".join(make_plan(TINY, make_cluster("h100-80gb", 2), Workload(150), one).notes)


@pytest.mark.parametrize("patch,msg", [
    ({"layer_floor_us": None}, "'step_overhead_us' needs 'layer_floor_us'"),
    ({"step_overhead_us": {"0": 5}}, "field 'step_overhead_us.0'"),
    ({"step_overhead_us": {"one": 5}}, "field 'step_overhead_us.one'"),
    ({"layer_floor_us": {"1": -5}}, "field 'layer_floor_us.1'"),
    ({"layer_floor_us": {"1": "fast"}}, "field 'layer_floor_us.1'"),
    ({"step_overhead_us": []}, "field 'step_overhead_us'"),
    ({"topology": {"interconnect": "infiniband"}}, "field 'topology.interconnect'"),
    ({"topology": {"interconnect": "nvlink", "raw": 5}}, "field 'topology.raw'"),
    ({"topology": "nvlink"}, "field 'topology'"),
    ({"engine": {"cuda_graphs": "no"}}, "field 'engine.cuda_graphs'"),
    ({"engine": []}, "field 'engine'"),
    ({"prefill_overhead_us": {"1": -1}}, "field 'prefill_overhead_us.1'"),
    ({"prefill_overhead_us": {"1": 5}, "step_overhead_us": None, "layer_floor_us": None},
     "'prefill_overhead_us' needs 'step_overhead_us' and 'layer_floor_us'"),
    ({"eager_layer_floor_us": {"1": -3}}, "field 'eager_layer_floor_us.1'"),
    ({"eager_layer_floor_us": {"2": 5}, "step_overhead_us": None, "layer_floor_us": None},
     "'eager_layer_floor_us' needs 'step_overhead_us' and 'layer_floor_us'"),
])
def test_malformed_host_fields_name_the_field(patch, msg):
    data = {**HOST, **patch}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(PlanError, match=re.escape(msg)):
        load_profile(data)


# -- engine models ------------------------------------------------------------------------------------

def test_engine_configs_describe_the_same_models():
    assert load_model("random:llama-3-8b").total_params() == load_model("llama-3-8b").total_params()
    for name, cfg in ENGINE_PRESETS.items():  # the engine's own parameter count (it ignores biases)
        spec = from_engine_config(cfg.to_dict(), name)
        assert spec.total_params() - (spec.attention_bias and spec.n_layers * spec.head_dim * (
            spec.n_heads + 2 * spec.n_kv_heads)) == cfg.num_params(), name
    assert load_model("random:tiny-qwen2").attention_bias and load_model("tiny-uneven").tied_embeddings
    assert load_model(ENGINE_PRESETS["tiny-llama"].to_dict()).hidden == 64
    with pytest.raises(PlanError, match="presets: .*tiny-llama"):
        load_model("random:gpt-9")


# -- plan --validate -----------------------------------------------------------------------------------

# tiny-llama (2 layers, h=64, f=160, V=512) on HOST_TINY (HBM 100 GB/s): every layer is host-bound (its GPU
# time, <= 60 us in these rows, is under the 1000 us floor), so TTFT = 2000 + 2 x 1000 + the LM head's
# 0.65664 us, and TPOT the same plus the head's FLOPs at batch b (2 * b * 512 * 64 at 1 TFLOP/s: a decode step's
# math adds to its reads).
HOST_TINY = {**HOST, "hbm_gbps": 100 / 0.95, "step_overhead_us": {"1": 2000}, "layer_floor_us": {"1": 1000}}
PRED_MS = (2000 + 2 * 1000 + 2 * (512 * 64 + 64) / 1e5) / 1e3


def pred_tpot_ms(batch):
    return PRED_MS + 2 * batch * 512 * 64 / 1e9


def _measured(model, rows):
    return {"model": model, "tensor_parallel_size": 1, "dtype": "bfloat16", "device": "cuda",
            "results": [{"batch": b, "input_len": 128, "output_len": 64, "ttft_ms": PRED_MS / (1 + e1 / 100),
                         "tpot_ms": pred_tpot_ms(b) / (1 + e2 / 100), "tpot_p50_ms": 1.0, "output_tok_per_s": 9.0}
                        for b, e1, e2 in rows]}


@pytest.fixture
def measured_files(tmp_path):
    a, b, prof = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "probe.json"
    a.write_text(json.dumps(_measured("random:tiny-llama", [(1, 5, 10), (4, -15, -20)])))
    b.write_text(json.dumps(_measured("tiny-llama", [(1, 25, 30), (2, 100, -40)])))
    prof.write_text(json.dumps(HOST_TINY))
    return str(a), str(b), str(prof)


def test_validate_errors_and_medians(measured_files):
    a, b, prof = measured_files
    v = validate_files([a, b], profile=load_profile(prof))
    assert [r.batch for r in v.rows] == [1, 4, 1, 2] and v.host_model == "measured"
    for r, (e1, e2) in zip(v.rows, [(5, 10), (-15, -20), (25, 30), (100, -40)]):
        assert r.ttft_ms_pred == pytest.approx(PRED_MS, rel=1e-9)
        assert r.tpot_ms_pred == pytest.approx(pred_tpot_ms(r.batch), rel=1e-9)
        assert (r.ttft_err_pct, r.tpot_err_pct) == pytest.approx((e1, e2), rel=1e-9)
        assert r.context == 128 + 32 and r.layout == "tp=1 pp=1 ep=1"
    # |TTFT| 5, 15, 25, 100 -> median (15+25)/2; |TPOT| 10, 20, 30, 40 -> 25
    assert (v.median_abs_ttft_err_pct, v.median_abs_tpot_err_pct) == pytest.approx((20.0, 25.0))
    assert validate_files([a], profile=load_profile(prof)).median_abs_tpot_err_pct == pytest.approx(15.0)
    assert v.median_abs_itl_err_pct is None and v.rows[0].itl_err_pct is None  # no itl_p50_ms in these files
    # a note about every file is said once, without their names
    assert [n for n in v.notes if "own layers not timed" in n] == [n for n in v.notes if n.startswith("this model's")]
    assert len([n for n in v.notes if "own layers not timed" in n]) == 1


def test_validate_against_the_median_inter_token_latency(tmp_path):
    """Where bench wrote itl_p50_ms, each row also compares the TPOT prediction with it."""
    data = _measured("random:tiny-llama", [(1, 0, 0), (4, 0, 0), (8, 0, 0)])
    for r, e in zip(data["results"], (-20, 10, 50)):  # the prediction is e% off each median
        r["itl_p50_ms"] = pred_tpot_ms(r["batch"]) / (1 + e / 100)
    del data["results"][2]["itl_p50_ms"]  # a row without it is left out of the ITL median
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    v = validate_files([str(path)], profile=load_profile(HOST_TINY))
    assert [r.itl_err_pct for r in v.rows] == [pytest.approx(-20), pytest.approx(10), None]
    assert v.median_abs_itl_err_pct == pytest.approx(15.0) and v.median_abs_tpot_err_pct == pytest.approx(0, abs=1e-9)
    data["results"][0]["itl_p50_ms"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=re.escape("field 'results[0].itl_p50_ms'")):
        validate_files([str(path)])


def test_validate_reads_the_pipeline_and_expert_layout(tmp_path):
    """A PP or EP bench file is predicted on its own layout, not as plain TP."""
    path = tmp_path / "pp.json"
    path.write_text(json.dumps({**_measured("random:tiny-llama", [(1, 0, 0)]), "pipeline_parallel_size": 2}))
    assert validate_files([str(path)]).rows[0].layout == "tp=1 pp=2 ep=1"
    path.write_text(json.dumps({**_measured("mixtral-8x7b", [(1, 0, 0)]), "tensor_parallel_size": 4,
                                "expert_parallel_size": 4}))
    assert validate_files([str(path)]).rows[0].layout == "tp=4 pp=1 ep=4"


def test_validate_predicts_an_fp8_run_as_fp8(tmp_path):
    """bench writes the engine's quantization and kv_cache_dtype: an FP8 run of the 8B model is predicted
    with its linear layers at a byte (and its KV cache at a byte), a bf16 one as before"""
    runs = {}
    for name, extra in (("bf16", {}), ("fp8", {"quantization": "fp8"}), ("fp8kv", {"kv_cache_dtype": "fp8"})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**_measured("llama-3-8b", [(1, 0, 0)]), "cuda_graphs": True, **extra}))
        runs[name] = validate_files([str(path)], gpu="h200").rows[0].tpot_ms_pred
    assert runs["fp8"] < 0.7 * runs["bf16"] and runs["fp8kv"] < runs["bf16"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**_measured("llama-3-8b", [(1, 0, 0)]), "quantization": "int4"}))
    with pytest.raises(PlanError, match="quantization"):
        validate_files([str(path)])


def test_validate_predicts_the_whole_batch_prefill(tmp_path):
    # 1 GFLOP/s: batch 2 x 8 prompt tokens = 16 tokens of tiny-llama's 43008 matmul parameters per layer plus
    # causal attention per prompt (2 x 4 heads x 16 x 8^2) is 1392.64 us of FLOPs, over the 1000 us floor,
    # then the elementwise kernels: 16 x (28h + 30q + 26kv + 10f = 6144) + 3 x 16 x 128 bytes of KV at
    # 100 GB/s; the LM head computes logits for the 2 last tokens (2 x 2 x 512 x 64 FLOPs = 131.072 us)
    prof = load_profile({**HOST_TINY, "gemm_tflops": 1e-3 / 0.85})
    ttft = 2000 + 2 * ((2 * 16 * 43008 + 2 * 4 * 16 * 2 * 8**2) / 1e3 + (16 * 6144 + 3 * 16 * 128) / 1e5) + 131.072
    # decode at batch 2, context 8 + 2/2: 176.64 us of FLOPs per layer, under the floor; the head's reads
    # (0.65664 us) add to its FLOPs
    tpot = 2000 + 2 * 1000 + 131.072 + 0.65664
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": "random:tiny-llama", "tensor_parallel_size": 1, "results": [
        {"batch": 2, "input_len": 8, "output_len": 2, "ttft_ms": ttft / 1e3, "tpot_ms": tpot / 2e3}]}))
    row = validate_files([str(path)], profile=prof).rows[0]
    assert (row.ttft_ms_pred, row.tpot_ms_pred) == pytest.approx((ttft / 1e3, tpot / 1e3), rel=1e-9)
    assert (row.ttft_err_pct, row.tpot_err_pct) == pytest.approx((0.0, 100.0), abs=1e-6)


def test_validate_cli_table_and_json(measured_files, capsys):
    a, b, prof = measured_files
    assert main(["plan", "--validate", a, b, "--profile", prof]) == 0
    out = capsys.readouterr().out
    assert "median |error| over 4 rows: TTFT 20.0%, TPOT 25.0%\n" in out + "\n" and "+100%" in out and "-40%" in out
    assert main(["plan", "--validate", a, b, "--profile", prof, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["median_abs_tpot_err_pct"] == pytest.approx(25.0) and len(data["rows"]) == 4
    assert data["rows"][3]["ttft_err_pct"] == pytest.approx(100.0) and data["rows"][0]["tpot_p50_ms_meas"] == 1.0
    # MODEL replaces the files' model: llama-3-8b's 32 host-bound layers instead of 2
    assert main(["plan", "llama-3-8b", "--validate", a, "--profile", prof, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["tpot_ms_pred"] > 30


@pytest.mark.parametrize("patch,msg", [
    ({"results": []}, "field 'results'"),
    ({"results": None}, "field 'results'"),
    ({"tensor_parallel_size": 0}, "field 'tensor_parallel_size'"),
    ({"tensor_parallel_size": 5}, "layout tp=5 pp=1 dp=1 ep=1: heads"),
    ({"expert_parallel_size": 3}, "field 'expert_parallel_size' must be 1 or tensor_parallel_size"),
    ({"model": "random:gpt-9"}, "field 'model' 'random:gpt-9'"),
    ({"model": 7}, "field 'model'"),
    ({"dtype": "int4"}, "field 'dtype'"),
    ({"device": "cpu"}, "field 'device'"),
    ({"results": [{"batch": 1, "input_len": 128, "output_len": 64, "ttft_ms": 1.0}]}, "missing field 'tpot_ms'"),
    ({"results": [{"batch": 1, "input_len": 128, "output_len": 64, "ttft_ms": 1.0, "tpot_ms": -2}]},
     "field 'results[0].tpot_ms'"),
    ({"results": [{"batch": 0, "input_len": 128, "output_len": 64, "ttft_ms": 1.0, "tpot_ms": 2}]},
     "field 'results[0].batch'"),
])
def test_validate_bad_measured_file(tmp_path, capsys, patch, msg):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**_measured("random:tiny-llama", [(1, 0, 0)]), **patch}))
    with pytest.raises(PlanError, match=re.escape(msg)) as info:
        validate_files([str(path)])
    assert str(path) in str(info.value)
    assert main(["plan", "--validate", str(path)]) == 2 and msg in capsys.readouterr().err


def test_validate_unreadable_files_and_missing_args(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    for path, msg in ((str(bad), "not valid JSON"), (str(tmp_path / "none.json"), "not found")):
        with pytest.raises(PlanError, match=msg):
            validate_files([path])
    missing = json.dumps({"model": "random:tiny-llama", "results": []})
    (tmp_path / "m.json").write_text(missing)
    with pytest.raises(PlanError, match="missing required field 'tensor_parallel_size'"):
        validate_files([str(tmp_path / "m.json")])
    assert main(["plan", "--gpus", "4"]) == 2 and "MODEL" in capsys.readouterr().err
    assert main(["plan", "llama-3-8b"]) == 2 and "--gpus" in capsys.readouterr().err


# -- recommend_for_engine ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,preset", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"), ("NVIDIA A10G", "a10g"), ("NVIDIA B200", "b200"), ("h100", "h100-80gb"),
])
def test_gpu_preset_from_device_name(name, preset):
    assert gpu_preset_from_name(name) == preset


def test_unknown_device_name_lists_presets():
    for name in ("Tesla V100-SXM2-16GB", "NVIDIA H100 NVL", ""):
        with pytest.raises(PlanError, match="h100-80gb, h100-pcie, h200"):
            gpu_preset_from_name(name)


def test_recommend_for_engine_only_tp():
    cfg = ENGINE_PRESETS["llama-3-8b"].to_dict()
    rec = recommend_for_engine(cfg, 4, "NVIDIA H100 80GB HBM3", None, 4096)
    assert (rec["tp"], rec["pp"], rec["dp"], rec["ep"]) == (4, 1, 1, 1)
    assert "Only layouts with tp parallelism were considered" in rec["reason"] and "nvlink (default)" in rec["reason"]
    rows = [ln for ln in rec["table"].splitlines() if ln.startswith("tp=")]
    assert [ln.split()[:4] for ln in rows] == [[f"tp={t}", "pp=1", "ep=1", "dp=1"] for t in (1, 2, 3, 4)]
    every = recommend_for_engine(cfg, 4, "h100", None, 4096, supported=("tp", "pp", "dp"))
    assert "dp=4" in every["table"] and "pp=2" in every["table"] and "Only layouts" not in every["reason"]
    with pytest.raises(PlanError, match="supported degrees"):
        recommend_for_engine(cfg, 4, "h100", None, 4096, supported=("tp", "zz"))


def test_recommend_for_engine_follows_measured_host_time(tmp_path):
    # graph-captured assumptions: more GPUs win for SmolLM2; an eager engine's measured host floor that
    # grows with TP makes one GPU the better choice (dp is not supported, so the others stay idle)
    prof = tmp_path / "probe.json"
    prof.write_text(json.dumps({**PROFILE, "step_overhead_us": {"1": 3000, "4": 8000},
                                "layer_floor_us": {"1": 2200, "4": 3000}, "topology": {"interconnect": "pcie"}}))
    cfg = ENGINE_PRESETS["smollm2-135m"].to_dict()
    assert recommend_for_engine(cfg, 4, "h100", "nvlink", 4096)["tp"] > 1
    rec = recommend_for_engine(cfg, 4, None, None, 4096, str(prof))  # device and topology from the profile
    assert rec["tp"] == 1 and "It uses 1 of the 4 GPUs" in rec["reason"]
    assert "GPU preset h100-80gb, interconnect pcie (the profile's measured 'pcie' topology)" in rec["reason"]


def test_recommend_for_engine_names_the_smallest_gpu_count():
    with pytest.raises(PlanError, match=r"only tp parallelism .* smallest GPU count that fits is 2 \(tp=2 pp=1"):
        recommend_for_engine(ENGINE_PRESETS["llama-3-70b"].to_dict(), 1, "h100", None, 8192)
    # 2 heads cap TP at 2: with TP alone a 200 GB model never fits, while PP would from 3 GPUs
    big = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 2,
           "num_key_value_heads": 2, "intermediate_size": 36000, "vocab_size": 32000}
    with pytest.raises(PlanError, match="nor on up to 4096 GPUs"):
        recommend_for_engine(big, 2, "h100", None, 1024)
    with pytest.raises(PlanError, match="smallest GPU count that fits is 3"):
        recommend_for_engine(big, 2, "h100", None, 1024, supported=("tp", "pp", "dp"))


def test_fp8_weights_halve_the_linear_layers_and_may_be_recommended():
    """quantization='fp8' (the engine's): the decoder's linear layers at a byte a weight, the embedding and
    LM head at two; decode reads half the linear bytes; --allow-fp8 adds an FP8 row per layout and the
    recommendation may take one (Llama-3-70B on 2 x H200: FP8 at TP=2 beats every bf16 layout)"""
    from shardlm.planner.cost import weights_per_gpu

    m = load_model("llama-3-70b")
    fp8 = replace(m, quantization="fp8")
    other = m.embedding_params() + m.n_layers * m.norm_params()
    assert weights_per_gpu(fp8, 1) == (m.total_params() - other) + 2 * other
    assert weights_per_gpu(m, 1) == 2 * m.total_params()
    cluster = make_cluster("h200", 2)
    lay = ParallelLayout(tp=2)
    sh = stage_shards(m, lay)[0]
    bf16_step = CostModel(m, cluster).stage_pass(lay, sh, 1, 1024, prefill=False)
    fp8_step = CostModel(fp8, cluster).stage_pass(lay, stage_shards(fp8, lay)[0], 1, 1024, prefill=False)
    layers = sh.n_layers * (sh.attn + sh.mlp)
    assert bf16_step.hbm_bytes - fp8_step.hbm_bytes == pytest.approx(layers, rel=1e-9)
    plain = make_plan(m, cluster, Workload(max_model_len=8192))
    assert all(r.quantization is None for r in plain.results)
    both = make_plan(m, cluster, Workload(max_model_len=8192), allow_fp8=True)
    assert len(both.results) == 2 * len(plain.results)
    assert both.recommended.quantization == "fp8" and both.recommended.name.endswith(" fp8")
    one_gpu = next(r for r in both.results if r.quantization == "fp8" and r.dp == 2)
    assert one_gpu.fits and not next(r for r in plain.results if r.dp == 2).fits  # 70B in FP8 fits one H200
    assert any("fp8" in n for n in both.notes)


def test_an_fp8_lm_head_holds_and_reads_the_head_at_a_byte(tmp_path, capsys):
    """fp8_lm_head (the engine's): the head at a byte a weight in memory and in a decode step's reads, a tied
    head as a copy of its own beside the bf16 embedding; validate reads it from the bench file, which may only
    say so with quantization 'fp8'"""
    from shardlm.planner.cost import weights_per_gpu

    m = replace(load_model("llama-3-8b"), quantization="fp8")
    head = m.vocab * m.hidden
    assert weights_per_gpu(m, 1) - weights_per_gpu(replace(m, fp8_lm_head=True), 1) == head
    tied = replace(m, tied_embeddings=True)
    assert weights_per_gpu(replace(tied, fp8_lm_head=True), 1) - weights_per_gpu(tied, 1) == head
    cluster, lay = make_cluster("h200", 1), ParallelLayout(tp=1)
    steps = [CostModel(spec, cluster).stage_pass(lay, stage_shards(spec, lay)[0], 1, 1024, prefill=False)
             for spec in (m, replace(m, fp8_lm_head=True))]
    assert steps[0].hbm_bytes - steps[1].hbm_bytes == pytest.approx(head, rel=1e-9)
    tpot = {}
    for name, extra in (("bf16-head", {}), ("fp8-head", {"fp8_lm_head": True})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**_measured("llama-3-8b", [(1, 0, 0)]), "cuda_graphs": True,
                                    "quantization": "fp8", **extra}))
        tpot[name] = validate_files([str(path)], gpu="h200").rows[0].tpot_ms_pred
    assert tpot["fp8-head"] < tpot["bf16-head"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**_measured("llama-3-8b", [(1, 0, 0)]), "fp8_lm_head": True}))
    with pytest.raises(PlanError, match="fp8_lm_head"):
        validate_files([str(path)])
    # `plan --fp8-lm-head`: with --quantization fp8 (the weights a byte less a head row); alone, refused
    argv = ["plan", "llama-3-8b", "--gpus", "1", "--gpu", "h200", "--quantization", "fp8", "--json"]
    weights = []
    for extra in ([], ["--fp8-lm-head"]):
        assert main(argv + extra) == 0
        weights.append(json.loads(capsys.readouterr().out)["layouts"][0]["weights_gb"])
    assert weights[0] - weights[1] == pytest.approx(head / 1e9, abs=0.01)
    assert main(["plan", "llama-3-8b", "--gpus", "1", "--fp8-lm-head"]) == 2
    assert "set quantization 'fp8' too" in capsys.readouterr().err


def test_an_fp8_checkpoint_config_plans_as_fp8(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "quantization_config": {"quant_method": "fbgemm_fp8"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).quantization == "fp8"
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}  # the planner still reads the shapes
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).quantization is None


def test_the_recommendation_check_compares_the_planners_pick_with_the_best_measured():
    """plan --validate's recommendation check: per workload measured at two layouts or more, the layout the
    planner predicts best (latency: the shortest TPOT; throughput: decode tokens/s per GPU) against the best
    measured, missing past 10%; a layout measured at one workload only is not compared"""
    from shardlm.planner.validate import ValidationRow, recommendation_checks

    def row(layout, gpus, pred, meas, batch=8):
        return ValidationRow(file="f", model="m", layout=layout, tp=gpus, gpus=gpus, batch=batch, input_len=128,
                             output_len=64, context=160, ttft_ms_pred=1, ttft_ms_meas=1, ttft_err_pct=0,
                             tpot_ms_pred=pred, tpot_ms_meas=meas, tpot_err_pct=0)

    # tp=2 predicted fastest and measured fastest (latency); per GPU tp=1 is predicted to make more tokens
    # (8 / 10 > 8 / 6 / 2) but measures 8 / 12 = 0.67 against tp=2's 8 / 5 / 2 = 0.8 a ms: 16.7% short
    checks = recommendation_checks([row("tp=1", 1, 10.0, 12.0), row("tp=2", 2, 6.0, 5.0), row("tp=4", 4, 20, 20, 1)])
    latency, throughput = checks
    assert (latency.objective, latency.recommended, latency.best, latency.shortfall_pct, latency.ok) == (
        "latency", "tp=2", "tp=2", 0.0, True)
    assert (throughput.recommended, throughput.best, throughput.layouts) == ("tp=1", "tp=2", 2)
    assert throughput.shortfall_pct == pytest.approx(100 * (0.8 - 8 / 12) / 0.8) and not throughput.ok
    # a pick within 10% of the best passes; a layout measured twice counts at its median
    close = recommendation_checks([row("a", 1, 5.0, 10.5), row("b", 1, 6.0, 10.0), row("b", 1, 6.0, 30.0),
                                   row("b", 1, 6.0, 9.0)])[0]
    assert (close.recommended, close.best, close.ok) == ("a", "b", True)
    assert close.shortfall_pct == pytest.approx(5.0)


def test_validate_predicts_the_chunked_prefills_a_batch_decodes_beside(tmp_path):
    """bench writes its step budget: a batch whose prompts exceed it prefills in chunks, and its mean TPOT
    carries the chunks the early sequences decode beside (a request of chunk c waits on C - c of them, each
    about a chunk's prefill); the decode step, compared with the median inter-token latency, does not"""
    data = _measured("random:tiny-llama", [(8, 0, 0)])
    data["results"][0]["itl_p50_ms"] = 1.0
    whole, chunked = tmp_path / "whole.json", tmp_path / "chunked.json"
    whole.write_text(json.dumps(data))
    chunked.write_text(json.dumps({**data, "max_num_batched_tokens": 256}))
    a, b = validate_files([str(whole), str(chunked)]).rows
    chunks, steps = 8 * 128 // 256, 63  # 4 chunks; output_len 64
    waits = sum(min(chunks - c, steps) for c in range(1, chunks + 1)) / chunks  # 1.5 chunks a request
    assert b.ttft_ms_pred == pytest.approx(a.ttft_ms_pred)
    assert b.tpot_ms_pred == pytest.approx(a.tpot_ms_pred + a.ttft_ms_pred / chunks * waits / steps)
    assert b.itl_err_pct == pytest.approx(a.itl_err_pct)


def _serve_cm():
    return CostModel(load_model("llama-3-8b"), make_cluster("h200", 1))


def test_the_serving_simulation_follows_the_schedulers_steps():
    """planner/serving.py: a request alone waits one prefill step for its first token and then a decode step
    a token; requests sent together share steps (decodes first, prompts in arrival order within the token
    budget, a long prompt chunked over steps); max_num_seqs holds the rest back; replicas take the least
    loaded"""
    from shardlm.planner.serving import Request, percentile, simulate

    cm, lay = _serve_cm(), ParallelLayout(tp=1)
    shards = stage_shards(cm.model, lay)
    alone = simulate(cm, lay, [Request(0.0, 100, 10)], 8, 1024)[0]
    assert alone.ttft_s == pytest.approx(cm.prefill_step(lay, shards, 100, prompts=1)[0])
    steps = [cm.decode_step(lay, shards, 1, round(100 + g, -1))[0] for g in range(1, 10)]
    assert alone.tpot_s == pytest.approx(sum(steps) / 9) and alone.e2e_s == pytest.approx(alone.ttft_s + sum(steps))
    # three prompts of 600 tokens at once, 1024 a step: step 1 the first and 424 of the second, step 2 the
    # first's decode, the second's other 176 and the third whole
    three = simulate(cm, lay, [Request(0.0, 600, 4)] * 3, 8, 1024)
    first = cm.prefill_step(lay, shards, 1024, prompts=2)[0]
    assert three[0].ttft_s == pytest.approx(first)
    assert three[1].ttft_s == three[2].ttft_s == pytest.approx(
        first + cm.prefill_step(lay, shards, 777, prompts=3)[0] + 600 * cm.kv_per_token(shards[0]) / cm.hbm_bps)
    # one running sequence at most: the second request starts when the first is done
    one_seq = simulate(cm, lay, [Request(0.0, 100, 10), Request(0.0, 100, 10)], 1, 1024)
    assert one_seq[1].ttft_s > one_seq[0].e2e_s
    # two replicas: two requests at once run apart, each as if alone
    apart = simulate(cm, lay, [Request(0.0, 100, 10), Request(0.0, 100, 10)], 8, 1024, replicas=2)
    assert all(s == pytest.approx(alone) for s in apart)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) == 0.0
    with pytest.raises(ValueError, match="max_num_seqs"):
        simulate(cm, lay, [Request(0.0, 1, 2)], 0, 1024)
    assert alone.engine_ttft_s == alone.ttft_s  # (an idle engine takes a request in at once)


def test_async_scheduling_plans_a_step_ahead_of_the_requests_that_arrive():
    """With async scheduling the step after the one under way was planned as that one started: a request that
    arrives during a step joins the step after the next (the engine takes it in when the step under way
    ends: engine_ttft_s counts from there), unless the engine has nothing else to run"""
    from shardlm.planner.serving import Request, simulate

    cm, lay = _serve_cm(), ParallelLayout(tp=1)
    shards = stage_shards(cm.model, lay)
    prefill = cm.prefill_step(lay, shards, 100, prompts=1)[0]
    decode = cm.decode_step(lay, shards, 1, 100)[0]
    reqs = [Request(0.0, 100, 10), Request(prefill / 2, 100, 10)]
    sync, ahead = simulate(cm, lay, reqs, 8, 1024), simulate(cm, lay, reqs, 8, 1024, async_scheduling=True)
    assert sync[0].ttft_s == ahead[0].ttft_s == prefill
    both = cm.prefill_step(lay, shards, 101, prompts=2)[0] + 100 * cm.kv_per_token(shards[0]) / cm.hbm_bps
    assert sync[1].ttft_s == pytest.approx(prefill / 2 + both)  # the next step: A's decode and B's prompt
    assert ahead[1].ttft_s == pytest.approx(prefill / 2 + decode + both)  # one more: A's decode, planned ahead
    assert ahead[1].engine_ttft_s == pytest.approx(ahead[1].ttft_s - prefill / 2)
    # A done with its first token: nothing was planned ahead, so B's prompt runs next, as without async
    reqs = [Request(0.0, 100, 1), Request(prefill / 2, 100, 10)]
    assert simulate(cm, lay, reqs, 8, 1024, async_scheduling=True)[1].ttft_s == pytest.approx(prefill / 2 + prefill)


def test_a_step_with_prompt_chunks_runs_at_its_mixed_graphs_padded_rows():
    """The engine replays steps with prompt chunks as CUDA graphs of MIXED_SIZES tokens (worker/step_graphs.py):
    a step of 300 tokens runs its GEMMs, elementwise kernels and all-reduces over 512 rows, its attention and
    K/V writes over its own 300, and takes a logits row per sequence slot (min(512, MAX_NUM_SEQS)); eagerly
    (no graphs, the torch attention path, MoE, past the largest size) as it is"""
    model, lay = load_model("llama-3-8b"), ParallelLayout(tp=2)
    cm = CostModel(model, make_cluster("h200", 2))
    assert cm.mixed_rows(300) == (512.0, 256.0) and cm.mixed_rows(16) == (16.0, 16.0)
    assert cm.mixed_rows(2048) == (2048.0, 256.0) and cm.mixed_rows(2049) == (2049, None)
    assert cm.mixed_rows(300, context=20000) == (300, None)  # a sequence past MIXED_MAX_CONTEXT: eager
    assert CostModel(model, make_cluster("h200", 2), max_num_seqs=8).mixed_rows(300) == (512.0, 8.0)
    for eager in (CostModel(model, make_cluster("h200", 2), cuda_graphs=False),
                  CostModel(model, make_cluster("h200", 2), attention_backend="torch"),
                  CostModel(load_model("mixtral-8x7b"), make_cluster("h200", 2))):
        assert eager.mixed_rows(300) == (300, None)
    sh = stage_shards(model, lay)[0]
    (w300, head300), (w512, _) = ((w[0], w[-1]) for w in (cm._work(lay, sh, t, 0, True, 1) for t in (300, 512)))
    assert w300.gemm_flops == w512.gemm_flops and w300.act_bytes == w512.act_bytes and w300.comm_s == w512.comm_s
    # its all-reduces run inside the graph: the profile's in-graph sweep prices them
    graph_sweep = {**HOST, "engine": {"cuda_graphs": True, "attention_backend": "triton"},
                   "allreduce_graph": {"2": [[1024, 3.0], [1 << 30, 7.0]]}}
    timed = CostModel(model, make_cluster("h200", 2), load_profile(graph_sweep))
    ar = [timed.allreduce(lay.tp_groups()[0], 512 * model.hidden * 2, graphed=g) for g in (True, False)]
    assert ar[0] != ar[1] and timed._work(lay, sh, 300, 0, True, 1)[0].comm_s == pytest.approx(2 * ar[0])
    assert w300.kv_bytes == pytest.approx(w512.kv_bytes * 300 / 512) and w300.flops < w512.flops
    assert head300.gemm_flops == 2 * 256 * sh.head_rows * model.hidden
    eager = CostModel(model, make_cluster("h200", 2), cuda_graphs=False)
    e300 = eager._work(lay, sh, 300, 0, True, 1)
    assert e300[0].gemm_flops == w512.gemm_flops * 300 / 512 and e300[-1].gemm_flops == 2 * sh.head_rows * model.hidden
    assert cm.prefill_step(lay, [sh], 256)[0] < cm.prefill_step(lay, [sh], 300)[0] < cm.prefill_step(lay, [sh], 512)[0]


def test_the_probes_serving_overhead_adds_to_each_served_requests_ttft_and_e2e():
    """profile serving_overhead_us (`probe --serving`): every simulated request's TTFT and E2E grow by it, its
    TPOT and the engine's own TTFT do not; a bad value is named"""
    from shardlm.planner.serving import Request, simulate

    base = {**HOST, "engine": {"cuda_graphs": True}}
    model, lay = load_model("llama-3-8b"), ParallelLayout(tp=1)
    reqs = [Request(0.0, 300, 20), Request(0.01, 500, 30), Request(0.02, 100, 10)]
    plain, slow = (simulate(CostModel(model, make_cluster("h200", 1), load_profile(p)), lay, reqs, 8, 1024,
                            async_scheduling=True)
                   for p in (base, {**base, "serving_overhead_us": 4000.0}))
    for a, b in zip(plain, slow):
        assert b.ttft_s == pytest.approx(a.ttft_s + 4e-3) and b.e2e_s == pytest.approx(a.e2e_s + 4e-3)
        assert b.tpot_s == pytest.approx(a.tpot_s) and b.engine_ttft_s == a.engine_ttft_s
    for bad in (-1.0, "4 ms"):
        with pytest.raises(PlanError, match="serving_overhead_us"):
            load_profile({**base, "serving_overhead_us": bad})
    # `plan`'s TTFT (and its TTFT SLO) is a served request's too
    plans = [make_plan(model, make_cluster("h200", 1), Workload(150, 50, 100), load_profile(p))
             for p in (base, {**base, "serving_overhead_us": 4000.0})]
    (a, b) = (next(r for r in p.results if r.tp == 1 and not r.reasons) for p in plans)
    assert b.ttft_ms_b1 == pytest.approx(a.ttft_ms_b1 + 4.0) and b.tpot_ms_b1 == a.tpot_ms_b1
    assert "TTFT holds 4.0 ms of the server's own" in " ".join(plans[1].notes)


def _serve_file(tmp_path, **engine):
    requests = [{"sent_s": 0.05 * i, "prompt": 100 + 10 * i, "tokens": 16, "ttft": 0.01, "tpot": 0.005,
                 "e2e": 0.1, "ok": True} for i in range(20)]
    data = {"request_rate": 20.0, "per_request": requests,
            "ttft_ms": {"mean": 12.0, "p50": 10.0, "p90": 20.0, "p99": 30.0},
            "tpot_ms": {"mean": 5.0, "p50": 5.0, "p90": 6.0, "p99": 7.0},
            "engine": {"model": "random:llama-3-8b", "tensor_parallel_size": 1, "dtype": "bfloat16",
                       "device": "cuda", "cuda_graphs": True, "attention_backend": "triton",
                       "async_scheduling": True, "quantization": None, "kv_cache_dtype": "auto",
                       "max_num_seqs": 256, "max_num_batched_tokens": 1024, "data_parallel_size": 1, **engine}}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(data))
    return str(path), data


def test_validate_simulates_a_bench_serve_run(tmp_path):
    """plan --validate takes bench serve's JSON: its requests (when sent, prompt, tokens) replayed through the
    serving simulation on the engine it recorded (the server's /engine), percentiles against the measured"""
    from shardlm.planner.serving import Request, percentiles_ms, simulate

    path, data = _serve_file(tmp_path)
    v = validate_files([path], gpu="h200")
    assert v.rows == [] and v.median_abs_tpot_err_pct is None and [r.metric for r in v.serving] == ["ttft", "tpot"]
    cm = CostModel(load_model("llama-3-8b"), make_cluster("h200", 1), cuda_graphs=True, attention_backend="triton")
    want = percentiles_ms(simulate(cm, ParallelLayout(tp=1), [Request(r["sent_s"], r["prompt"], r["tokens"])
                                                              for r in data["per_request"]], 256, 1024,
                                   async_scheduling=True))
    ttft = v.serving[0]
    assert ttft.pred_ms == pytest.approx(want["ttft_ms"]) and ttft.requests == 20 and ttft.request_rate == 20.0
    assert ttft.err_pct["p90"] == pytest.approx(100 * (want["ttft_ms"]["p90"] - 20.0) / 20.0)
    text = format_validation(v)
    assert "serving (bench serve runs" in text and "median |error| over the serving percentiles" in text
    two = validate_files([_serve_file(tmp_path, data_parallel_size=2)[0]], gpu="h200").serving[1]
    assert two.layout.endswith(" dp=2") and two.pred_ms["p99"] <= v.serving[1].pred_ms["p99"]
    assert not any("prefix cache" in n for n in v.notes)
    # a run whose prompts the server's prefix cache held (bench serve's prefix_cache): named in a note
    for hits, named in ((40.0, False), (600.0, True)):
        data["prefix_cache"] = {"query_tokens": 3000.0, "hit_tokens": hits}
        (tmp_path / "serve.json").write_text(json.dumps(data))
        notes = validate_files([path], gpu="h200").notes
        assert any("20% of its prompt tokens came from the server's prefix cache" in n for n in notes) == named
    # the engine's own mean TTFT (bench serve's engine_ms) beside the simulation's: what the server adds, named
    data["engine_ms"] = {"ttft_mean": 7.5, "queue_mean": 1.0, "prefill_mean": 6.5}
    (tmp_path / "serve.json").write_text(json.dumps(data))
    notes = validate_files([path], gpu="h200").notes
    assert any("mean TTFT 12.0 ms at the client" in n and "took the request in) 7.5 ms" in n
               and "The rest, 4.5 ms measured" in n for n in notes), notes


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("engine"), "without the server's engine settings"),
    (lambda d: d["engine"].pop("max_num_seqs"), "'engine.max_num_seqs'"),
    (lambda d: d["engine"].update(tensor_parallel_size=0), "'engine.tensor_parallel_size'"),
    (lambda d: d["per_request"][3].pop("sent_s"), "per_request[3]"),
    (lambda d: d["ttft_ms"].pop("p90"), "'ttft_ms.p90'"),
    (lambda d: d.update(prefix_cache={"query_tokens": 10}), "'prefix_cache'"),
    (lambda d: d.update(engine_ms={"ttft_mean": -1}), "'engine_ms.ttft_mean'"),
])
def test_a_bad_bench_serve_file_is_refused_naming_the_field(tmp_path, change, message):
    path, data = _serve_file(tmp_path)
    change(data)
    (tmp_path / "serve.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=re.escape(message)):
        validate_files([path], gpu="h200")
