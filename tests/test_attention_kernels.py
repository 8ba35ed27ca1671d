"""Paged attention and rotary + cache write: which path runs where, the kernels' launch plan, the torch
reference against a plain per-sequence attention, and the Triton kernels against the reference (on the
GPU, and in Triton's CPU interpreter where triton is installed)."""

import importlib.util
import os
import random
import subprocess
import sys

import pytest
import torch

from shardlm.worker.kernels import paged_attention as pa
from shardlm.worker.kernels import rope_cache
from shardlm.worker.layers.norm_rope import RotaryEmbedding

CPU = torch.device("cpu")


def test_the_backend_is_triton_on_cuda_and_torch_elsewhere():
    assert pa.resolve_backend("auto", CPU) == "torch"
    assert pa.resolve_backend("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="runs on CUDA devices only: use --attention-backend torch"):
        pa.resolve_backend("triton", CPU)
    with pytest.raises(ValueError, match="attention backend 'flash' is not one of torch, triton"):
        pa.resolve_backend("flash", CPU)


def test_head_layout_maps_each_kv_head_to_its_query_heads():
    gqa = pa.HeadLayout(8, 2, 64, tuple(i // 4 for i in range(8)), CPU)
    assert gqa.group == 4 and gqa.g_pad == 4
    assert gqa.head_map.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    uneven = pa.HeadLayout(5, 3, 64, (0, 0, 1, 2, 2), CPU)  # a TP split cut a group: KV heads replicated
    assert uneven.group == 0 and uneven.g_pad == 2
    assert uneven.head_map.tolist() == [[0, 1], [2, -1], [3, 4]]


def _launch_rows(launch):
    return list(zip(launch.tile_seq.tolist(), launch.tile_q0.tolist()))


def test_the_launch_plan_covers_every_new_token_once():
    q_lens = [1, 1, 300, 3, 17]
    launches = pa.plan_launches(q_lens, g_pad=4, max_ctx=400, n_kv=8, device=CPU, sms=132)
    small, large = launches
    assert (small.block_m, large.block_m) == (pa.SMALL_M, pa.LARGE_M)
    # decodes and short chunks (<= 16 / 4 tokens) in small tiles, prompt chunks in tiles of 128 / 4 tokens
    assert _launch_rows(small) == [(0, 0), (1, 0), (3, 0), (-1, 0)]
    assert _launch_rows(large) == [(2, i * 32) for i in range(10)] + [(4, 0), (-1, 0)]
    for launch in launches:
        assert len(launch.tile_seq) % 4 == 0  # padded with unused tiles: aligned int32 tables
    covered = sorted((s, q0 + i) for launch in launches for s, q0 in _launch_rows(launch) if s >= 0
                     for i in range(launch.block_m // 4) if q0 + i < q_lens[s])
    assert covered == [(s, i) for s, q in enumerate(q_lens) for i in range(q)]


def test_split_kv_only_for_few_long_contexts():
    # batch 1 at 32k on 132 SMs: 8 programs -> 64 parts of 512 keys (~4 programs per SM)
    assert pa.split_plan(tiles=1, tokens=1, n_kv=8, max_ctx=32768, block_n=64, sms=132) == (64, 512)
    splits, split_len = pa.split_plan(tiles=4, tokens=4, n_kv=8, max_ctx=3000, block_n=64, sms=132)
    assert splits == 6 and split_len % 64 == 0 and splits * split_len >= 3000 > (splits - 1) * split_len
    assert pa.split_plan(tiles=1, tokens=1, n_kv=8, max_ctx=600, block_n=64, sms=132)[0] == 2  # parts >= 512 keys
    assert pa.split_plan(tiles=32, tokens=32, n_kv=8, max_ctx=8192, block_n=64, sms=132) == (1, 0)  # SMs busy
    assert pa.split_plan(tiles=1, tokens=1, n_kv=8, max_ctx=100, block_n=64, sms=132) == (1, 0)  # short
    # the workspace's rows: a step of 300 tokens (decodes beside a prompt chunk) splits into at most 6 parts
    assert pa.split_plan(tiles=1, tokens=300, n_kv=1, max_ctx=9000, block_n=64, sms=132)[0] == 6
    assert pa.split_plan(tiles=1, tokens=1500, n_kv=1, max_ctx=9000, block_n=64, sms=132) == (1, 0)


def test_split_kv_partials_fit_the_workspace():
    ws = pa.SplitWorkspace(4, 16, CPU)
    for splits in (2, 6, 64):
        out, lse = ws.parts(splits)
        assert out.shape == (splits, pa.SPLIT_ROWS // splits, 4, 16) and lse.shape == (splits, pa.SPLIT_ROWS // splits, 4)
        assert out.data_ptr() == ws.out.data_ptr()


def random_batch(n_q, n_kv, d, block_size, q_lens, starts, dtype, device, kv_index=None, seed=0):
    """Random q and caches, block tables of shuffled blocks: (q, k_cache, v_cache, tables, heads)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    kv_index = kv_index or tuple(i // (n_q // n_kv) for i in range(n_q))
    ctx = [s + q for s, q in zip(starts, q_lens)]
    blocks = [-(-c // block_size) for c in ctx]
    order = list(range(sum(blocks) + 2))
    rng.shuffle(order)
    tables = [order[sum(blocks[:i]): sum(blocks[:i + 1])] for i in range(len(ctx))]
    slots = len(order) * block_size
    k_cache = torch.randn(slots, n_kv, d, generator=gen).to(device, dtype)
    v_cache = torch.randn(slots, n_kv, d, generator=gen).to(device, dtype)
    q = torch.randn(sum(q_lens), n_q, d, generator=gen).to(device, dtype)
    return q, k_cache, v_cache, tables, pa.HeadLayout(n_q, n_kv, d, kv_index, device)


def plain_attention(q, k_cache, v_cache, tables, starts, q_lens, block_size, kv_index):
    """One sequence and one head at a time, in float64: what both paths must compute."""
    outs, t = [], 0
    for bt, start, n in zip(tables, starts, q_lens):
        ctx = start + n
        slots = torch.tensor([bt[p // block_size] * block_size + p % block_size for p in range(ctx)])
        k, v = k_cache[slots].double(), v_cache[slots].double()  # [ctx, n_kv, d]
        qs = q[t: t + n].double()
        rows = []
        for i in range(n):
            heads = []
            for h, kvh in enumerate(kv_index):
                scores = (k[: start + i + 1, kvh] @ qs[i, h]) / q.shape[-1] ** 0.5
                heads.append(torch.softmax(scores, 0) @ v[: start + i + 1, kvh])
            rows.append(torch.cat(heads))
        outs.append(torch.stack(rows))
        t += n
    return torch.cat(outs)


CASES = [  # (n_q, n_kv, d, block_size, q_lens, starts, kv_index)
    (4, 1, 16, 16, [1, 1, 1], [5, 40, 0], None),  # decodes, one KV head for four query heads
    (4, 2, 16, 16, [1, 3, 20], [0, 17, 9], None),  # a decode, a short chunk, a prompt after a cached prefix
    (8, 8, 32, 32, [70], [0], None),  # a whole prompt, no GQA
    (6, 4, 16, 16, [1, 5, 2], [30, 2, 0], (0, 0, 1, 2, 2, 3)),  # uneven groups (a TP split)
    (3, 1, 8, 16, [1, 40], [20, 0], None),  # head_dim 8 (the tiny test models'): padded to 16 in the kernel
    (2, 2, 24, 16, [2, 1], [7, 33], None),  # a head_dim that is no power of two
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_torch_path_is_plain_causal_attention_over_the_blocks(case):
    n_q, n_kv, d, bs, q_lens, starts, kv_index = CASES[case]
    q, kc, vc, tables, heads = random_batch(n_q, n_kv, d, bs, q_lens, starts, torch.float32, CPU, kv_index)
    meta = pa.build_metadata(starts, q_lens, tables, bs, CPU, torch.float32, "torch")
    got = pa.paged_attention_torch(q, kc, vc, meta, heads)
    want = plain_attention(q, kc, vc, tables, starts, q_lens, bs, kv_index or [i // (n_q // n_kv) for i in range(n_q)])
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_an_fp8_cache_reads_as_its_rounded_values(case):
    """kv_cache_dtype fp8: the torch path over an e4m3 cache equals it over a float32 cache holding the same
    rounded values (widened as read, scale 1); the cache write rounds K and V to e4m3"""
    n_q, n_kv, d, bs, q_lens, starts, kv_index = CASES[case]
    q, kc, vc, tables, heads = random_batch(n_q, n_kv, d, bs, q_lens, starts, torch.float32, CPU, kv_index)
    meta = pa.build_metadata(starts, q_lens, tables, bs, CPU, torch.float32, "torch")
    k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    got = pa.paged_attention_torch(q, k8, v8, meta, heads)
    assert torch.equal(got, pa.paged_attention_torch(q, k8.float(), v8.float(), meta, heads))
    assert not torch.equal(got, pa.paged_attention_torch(q, kc, vc, meta, heads))  # the rounding shows


def test_the_cache_write_rounds_to_fp8():
    from shardlm.worker.kernels import rope_cache
    from shardlm.worker.layers.norm_rope import RotaryEmbedding

    d = 16
    rope = RotaryEmbedding(d, 64, 10000.0, None, CPU).lookup(torch.tensor([0, 3, 7]), torch.float32)
    q, k, v = torch.randn(3, 4, d), torch.randn(3, 2, d), torch.randn(3, 2, d)
    slots = torch.tensor([5, 0, 7])
    k8, v8 = (torch.zeros(8, 2, d, dtype=torch.float8_e4m3fn) for _ in range(2))
    kf, vf = torch.zeros(8, 2, d), torch.zeros(8, 2, d)
    _, k_rot = rope_cache.rope_and_cache_torch(rope, q, k, v, k8, v8, slots)
    rope_cache.rope_and_cache_torch(rope, q, k, v, kf, vf, slots)
    assert torch.equal(k8.float(), kf.to(torch.float8_e4m3fn).float()) and torch.equal(v8[slots].float(),
                                                                                       v.to(torch.float8_e4m3fn).float())


INTERPRETED = """
import torch
from shardlm.worker.kernels import paged_attention as pa, rope_cache
from test_attention_kernels import CASES, random_batch
from shardlm.worker.layers.norm_rope import RotaryEmbedding
cpu = torch.device("cpu")
SPLIT = [(4, 1, 16, 16, [1, 2], [1100, 150], None), (4, 1, 16, 16, [40, 1, 1], [0, 1100, 700], None)]
for n_q, n_kv, d, bs, q_lens, starts, kv_index in CASES + SPLIT:
    q, kc, vc, tables, heads = random_batch(n_q, n_kv, d, bs, q_lens, starts, torch.float32, cpu, kv_index)
    ref = pa.paged_attention_torch(q, kc, vc, pa.build_metadata(starts, q_lens, tables, bs, cpu, torch.float32), heads)
    meta = pa.build_metadata(starts, q_lens, tables, bs, cpu, torch.float32, "triton", heads, sms=4)
    meta.workspace = pa.SplitWorkspace(n_q, d, cpu)
    got = pa.paged_attention_triton(q, kc, vc, meta, heads)
    assert (got - ref).abs().max() < 1e-5, (q_lens, starts, (got - ref).abs().max())
    assert 1100 not in starts or meta.launches[0].splits > 1
    # an FP8 cache: the kernel widens what it reads (scale 1)
    k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    ref8 = pa.paged_attention_torch(q, k8, v8, pa.build_metadata(starts, q_lens, tables, bs, cpu, torch.float32), heads)
    got8 = pa.paged_attention_triton(q, k8, v8, meta, heads)
    assert (got8 - ref8).abs().max() < 1e-5, (q_lens, starts, (got8 - ref8).abs().max())
for d in (16, 24):
    rope = RotaryEmbedding(d, 64, 10000.0, None, cpu).lookup(torch.tensor([0, 3, 7]), torch.float32)
    qkv = torch.randn(3, 8 * d)
    views = lambda x: (x[:, :4 * d].view(3, 4, d), x[:, 4 * d:6 * d].view(3, 2, d), x[:, 6 * d:].view(3, 2, d))
    caches = [torch.zeros(8, 2, d) for _ in range(4)]
    slots = torch.tensor([5, 0, 7])
    want = rope_cache.rope_and_cache_torch(rope, *views(qkv.clone()), caches[0], caches[1], slots)
    got = rope_cache.rope_and_cache_triton(rope, *views(qkv), caches[2], caches[3], slots)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want + tuple(caches[:2]), got + tuple(caches[2:])))
print("interpreted kernels agree")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_kernels_in_the_cpu_interpreter():
    """The kernels' indexing, masking and split-KV merge, run by Triton's interpreter (TRITON_INTERPRET=1 must
    be set before triton is imported: a fresh process)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    if "only 0-dimensional arrays can be converted" in out.stderr:
        pytest.skip("this triton's interpreter cannot run with this numpy (scalar loads are 1-d arrays)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interpreted kernels agree" in out.stdout


# ---- GPU: the kernels against the reference ----------------------------------------------------
GPU_CASES = [  # (n_q, n_kv, d, block_size, q_lens, starts, kv_index)
    (32, 8, 128, 16, [1] * 7 + [64, 513], [0, 1, 15, 16, 1000, 4095, 32767, 0, 2000], None),  # GQA 4, 1..32k
    (32, 4, 128, 32, [1, 1, 300], [8191, 100, 777], None),  # GQA 8, block 32, a prefix-cache start
    (16, 16, 64, 16, [1, 2, 17, 1000], [3, 5000, 40, 0], None),  # no GQA, head_dim 64, a 1k prompt
    (9, 3, 64, 32, [1, 40], [2048, 9], (0, 0, 0, 1, 1, 1, 1, 2, 2)),  # uneven groups
    (32, 8, 128, 16, [1], [32767], None),  # batch 1, 32k context: split-KV
    (32, 8, 128, 16, [4096], [0], None),  # a 4k causal prompt
    (9, 3, 8, 16, [1, 1, 30], [5, 70, 0], None),  # head_dim 8 (the tiny test checkpoints')
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_triton_attention_matches_the_reference(case, dtype):
    """Relative error against float32 attention on the same (rounded) inputs under 1e-2: bf16 keeps 8 bits of
    mantissa, and the kernel rounds P to bf16 before P @ V, as flash attention does (~2^-8 per product,
    averaging out over the context); fp16 lands lower. Every output element is written (NaN poison)."""
    from shardlm.worker.kernels import triton_attention

    n_q, n_kv, d, bs, q_lens, starts, kv_index = GPU_CASES[case]
    dev = torch.device("cuda")
    q, kc, vc, tables, heads = random_batch(n_q, n_kv, d, bs, q_lens, starts, dtype, dev, kv_index, seed=case)
    ref_meta = pa.build_metadata(starts, q_lens, tables, bs, dev, torch.float32)
    ref = pa.paged_attention_torch(q.float(), kc.float(), vc.float(), ref_meta, heads)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    meta = pa.build_metadata(starts, q_lens, tables, bs, dev, dtype, "triton", heads, sms)
    meta.workspace = pa.SplitWorkspace(n_q, d, dev)
    out = torch.full((q.shape[0], n_q, d), float("nan"), dtype=dtype, device=dev)
    for launch in meta.launches:
        triton_attention.attention(q, kc, vc, out, meta, launch, heads)
    out = out.view(-1, n_q * d).float()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    if case == 4:
        assert meta.launches[0].splits > 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rope_and_cache_matches_the_reference(dtype):
    dev = torch.device("cuda")
    rot = RotaryEmbedding(128, 40000, 500000.0, None, dev)
    positions = torch.tensor([0, 1, 77, 32767, 39999], device=dev)
    rope = rot.lookup(positions, dtype)
    n_q, n_kv = 32, 8
    qkv = torch.randn(5, (n_q + 2 * n_kv) * 128, device=dev).to(dtype)

    def views(x):
        return (x[:, : n_q * 128].view(5, n_q, 128), x[:, n_q * 128: (n_q + n_kv) * 128].view(5, n_kv, 128),
                x[:, (n_q + n_kv) * 128:].view(5, n_kv, 128))

    caches = [torch.full((64, n_kv, 128), float("nan"), device=dev, dtype=dtype) for _ in range(4)]
    slots = torch.tensor([5, 0, 63, 17, 30], device=dev)
    want = rope_cache.rope_and_cache_torch(rope, *views(qkv.clone()), caches[0], caches[1], slots)
    got = rope_cache.rope_and_cache_triton(rope, *views(qkv), caches[2], caches[3], slots)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # the kernel rounds once (float32 inside), HF twice
    for a, b in zip(want + (caches[0][slots], caches[1][slots]), got + (caches[2][slots], caches[3][slots])):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    assert torch.isnan(caches[2][1]).all()  # only the new tokens' slots are written


# ---- residual add + RMSNorm, SiLU x up --------------------------------------------------------------
def test_the_torch_add_norm_and_silu_mul_are_the_unfused_ops():
    from shardlm.worker.kernels import norm_act

    x, r, w = torch.randn(4, 24), torch.randn(4, 24), torch.randn(24)
    normed, residual = norm_act.add_rms_norm_torch(x, r, w, 1e-6)
    assert torch.equal(residual, x + r)
    assert torch.allclose(normed, w * (x + r) * torch.rsqrt(((x + r) ** 2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)
    normed, residual = norm_act.add_rms_norm_torch(x, None, w, 1e-6)
    assert residual is x
    gu = torch.randn(3, 10)
    assert torch.allclose(norm_act.silu_mul_torch(gu), torch.sigmoid(gu[:, :5]) * gu[:, :5] * gu[:, 5:], atol=1e-6)


NORM_ACT = """
import torch
from shardlm.worker.kernels import norm_act
from test_attention_kernels import check_e4m3
for n in (72, 4096):
    x, r, w = torch.randn(5, n), torch.randn(5, n), torch.randn(n)
    for res in (None, r):
        want, got = norm_act.add_rms_norm_torch(x, res, w, 1e-5), norm_act.add_rms_norm_triton(x, res, w, 1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))
    gu = torch.randn(5, 2 * n)
    assert torch.allclose(norm_act.silu_mul_torch(gu), norm_act.silu_mul_triton(gu), atol=1e-6)
check_e4m3(torch.float32, torch.device("cpu"), (72, 4096), (72, 5000, 17000), interpreted=True)
print("interpreted kernels agree")
"""


def check_e4m3(dtype, dev, norm_widths, silu_widths, interpreted=False):
    """The e4m3 norm and SiLU x up kernels (for an FP8 layer on e4m3 activations) give what the plain kernel
    and then the activation quantisation kernel give (triton_fp8.quantize_activations): bitwise in the
    interpreter; on a GPU the scales within 1e-5 and at most 0.1% of the e4m3 values one step apart (a float32
    sum of squares may come out an ulp apart between two compilations: a float32 row keeps it), and within
    e4m3's rounding of the plain output (not checked where `interpreted`: this Triton's interpreter rounds
    some values to e4m3 wrongly, e.g. -127.6 to -64, in every kernel alike); past SILU_E4M3_ROW features
    (17000, 20000) SiLU x up reads its row in pieces"""
    from shardlm.worker.kernels import norm_act
    from shardlm.worker.kernels.triton_fp8 import quantize_activations

    def same(e, plain):
        q, s = quantize_activations(plain)
        assert e.dtype == plain.dtype and e.q.shape == q.shape
        if interpreted:
            assert torch.equal(e.scale, s) and torch.equal(e.q.view(torch.uint8), q.view(torch.uint8))
        else:
            assert torch.allclose(e.scale, s, rtol=1e-5, atol=0)
            apart = (e.q.view(torch.uint8).int() - q.view(torch.uint8).int()).abs()
            assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3
            assert ((e.q.float() * e.scale - plain.float()).norm() / plain.float().norm()).item() < 0.05

    gen = torch.Generator(device=dev).manual_seed(1)
    for n in norm_widths:
        x, r = (torch.randn(5, n, device=dev, generator=gen).to(dtype) for _ in range(2))
        w = torch.randn(n, device=dev, generator=gen).to(dtype)
        for res in (None, r):
            (e, e_res), (plain, plain_res) = (norm_act.add_rms_norm_e4m3_triton(x, res, w, 1e-5),
                                              norm_act.add_rms_norm_triton(x, res, w, 1e-5))
            same(e, plain)
            assert torch.equal(e_res, plain_res)
    for f in silu_widths:
        gu = 3 * torch.randn(5, 2 * f, device=dev, generator=gen).to(dtype)
        same(norm_act.silu_mul_e4m3_triton(gu), norm_act.silu_mul_triton(gu))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_norm_and_activation_kernels_in_the_cpu_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    out = subprocess.run([sys.executable, "-c", NORM_ACT], env=env, capture_output=True, text=True, timeout=600)
    if "only 0-dimensional arrays can be converted" in out.stderr:
        pytest.skip("this triton's interpreter cannot run with this numpy (scalar loads are 1-d arrays)")
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_add_norm_and_silu_mul_match_the_reference(dtype):
    """The kernels round where the torch ops round: bf16 results equal to the last bit but for rsqrt's and
    exp's float32 rounding (one bf16 ulp at most). Their e4m3 variants: check_e4m3."""
    from shardlm.worker.kernels import norm_act

    dev = torch.device("cuda")
    x, r = torch.randn(37, 4096, device=dev).to(dtype), torch.randn(37, 4096, device=dev).to(dtype)
    w = torch.randn(4096, device=dev).to(dtype)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for res in (None, r):
        for a, b in zip(norm_act.add_rms_norm_torch(x, res, w, 1e-5), norm_act.add_rms_norm_triton(x, res, w, 1e-5)):
            assert torch.allclose(a.float(), b.float(), **tol)
    gu = torch.randn(37, 2 * 14336, device=dev).to(dtype)
    assert torch.allclose(norm_act.silu_mul_torch(gu).float(), norm_act.silu_mul_triton(gu).float(), **tol)
    check_e4m3(dtype, dev, (4096, 8192), (14336, 3584, 20000))


def test_programmatic_dependent_launch_only_within_pdl_launches(monkeypatch):
    """kernels.pdl: on a capable GPU only inside pdl_launches (the decode graphs' capture), nested scopes restore
    the outer one, and SHARDLM_NO_PDL=1 turns it off there too; never on the CPU"""
    from shardlm.worker import kernels

    monkeypatch.setattr(kernels, "_pdl_capable", lambda index: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SHARDLM_NO_PDL", raising=False)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not kernels.pdl(gpu)
    with kernels.pdl_launches():
        assert kernels.pdl(gpu) and not kernels.pdl(cpu)
        with kernels.pdl_launches():
            assert kernels.pdl(gpu)
        assert kernels.pdl(gpu)
        monkeypatch.setenv("SHARDLM_NO_PDL", "1")
        assert not kernels.pdl(gpu)
    monkeypatch.delenv("SHARDLM_NO_PDL")
    assert not kernels.pdl(gpu)


def test_warm_up_decodes_at_a_context_split_kv_cuts():
    """warm_up compiles both small-tile variants before the first request: its decode at WARM_UP_CONTEXT (as a
    cache of that many slots allows) is cut into parts where SMs are plenty, and not where there is one"""
    cpu = torch.device("cpu")
    split = pa.plan_launches([1], 4, pa.WARM_UP_CONTEXT, 8, cpu, 1 << 20)[0]
    assert split.splits >= 2 and split.split_len % pa.BLOCK_N == 0
    assert pa.plan_launches([1], 4, pa.WARM_UP_CONTEXT, 8, cpu, 1)[0].splits == 1
