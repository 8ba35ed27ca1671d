"""FP8 weights (worker/layers/fp8.py) on the CPU reference path: quantised at load, or read from an FP8
checkpoint with its scales, at TP 1/2/3 and PP 2, against a float32 Hugging Face model built from the same
dequantised weights (greedy tokens equal, logits within 1e-4 relative); bad FP8 checkpoints fail at load
naming the tensor."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hf_models import PROMPTS, STEPS, check_against_hf, hf_greedy
from safetensors.torch import load_file, save_file

from shardlm import LLM, SamplingParams
from shardlm.common.config import ConfigError
from shardlm.worker.layers.fp8 import FP8, dequantize_rows, quantize_rows

LAYOUTS = [dict(), dict(tensor_parallel_size=2), dict(tensor_parallel_size=3), dict(pipeline_parallel_size=2)]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAME = "llama-uneven-tied"  # 9 heads over 3 KV heads, a vocabulary no TP degree divides


def is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and name.split(".")[-2] in LINEARS


def is_experts(name: str) -> bool:
    """transformers' fused expert weights: [E, out, in] (gate_up_proj: gate rows, then up rows)"""
    return name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")


def dequantised_model(model: torch.nn.Module) -> torch.nn.Module:
    """The float32 model whose every decoder linear weight (each expert's too) is quantise-then-dequantise of
    the original, row by row; the router stays as it is."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if is_linear(name):
                p.copy_(dequantize_rows(*quantize_rows(p), torch.float32))
            elif is_experts(name):
                for e in range(p.shape[0]):
                    p[e].copy_(dequantize_rows(*quantize_rows(p[e]), torch.float32))
    return ref


def refs_of(model):
    return [hf_greedy(model, p, STEPS) for p in PROMPTS]


@pytest.fixture(scope="module")
def quantised_refs(tiny_models):
    return refs_of(dequantised_model(tiny_models[NAME][1]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantised_at_load_is_the_dequantised_model(layout, tiny_models, quantised_refs):
    folder, _ = tiny_models[NAME]
    with LLM(str(folder), quantization="fp8", block_size=8, **layout) as llm:
        check_against_hf(llm, quantised_refs)


def test_fp8_is_close_to_the_model_but_not_the_same(tiny_models, quantised_refs):
    """the test above could not pass by accident: the dequantised model's first logits (after the prompt,
    before greedy paths can part) differ from the original's, by a little"""
    _, model = tiny_models[NAME]
    plain = refs_of(model)
    diff = max((a[1][0] - b[1][0]).abs().max().item() / a[1][0].abs().max().item()
               for a, b in zip(plain, quantised_refs))
    assert 1e-3 < diff < 0.1


def fp8_head_model(model: torch.nn.Module) -> torch.nn.Module:
    """dequantised_model with an LM head of its own: the tied embedding's rows quantised and dequantised (the
    embedding itself as it is)"""
    ref = dequantised_model(model)
    head = dequantize_rows(*quantize_rows(ref.get_input_embeddings().weight.detach()), torch.float32)
    ref.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return ref


@pytest.mark.parametrize("layout", [dict(), dict(tensor_parallel_size=3), dict(pipeline_parallel_size=2)])
def test_an_fp8_lm_head_is_the_dequantised_head(layout, tiny_models, quantised_refs):
    """fp8_lm_head: the tied head quantised per vocab row into a copy of its own, at TP 3 (a vocabulary no
    degree divides: uneven row shards) and PP 2 (the head on another stage than the embedding); its first
    logits differ from the bf16-head model's (the test can fail), by a little"""
    folder, model = tiny_models[NAME]
    refs = refs_of(fp8_head_model(model))
    diff = max((a[1][0] - b[1][0]).abs().max().item() / a[1][0].abs().max().item()
               for a, b in zip(refs, quantised_refs))
    assert 1e-4 < diff < 0.1
    with LLM(str(folder), quantization="fp8", fp8_lm_head=True, block_size=8, **layout) as llm:
        check_against_hf(llm, refs)


def test_a_checkpoint_with_an_fp8_lm_head_is_read_with_fp8_lm_head(tiny_models, tmp_path):
    """an FP8 checkpoint whose (untied) LM head is stored in e4m3 with its scales too: read as stored with
    fp8_lm_head, exactly the dequantised model; without it, refused naming the flag"""
    folder, model = tiny_models["qwen2-bias-untied"]
    dst = tmp_path / "ckpt"
    write_fp8_checkpoint(folder, dst, per_tensor=set())
    tensors = load_file(str(dst / "model.safetensors"))
    q, s = quantize_rows(tensors["lm_head.weight"])
    tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = q, s[:, None]
    save_file(tensors, str(dst / "model.safetensors"))
    ref = checkpoint_model(model, dst)
    with torch.no_grad():
        ref.lm_head.weight.copy_(q.float() * s[:, None])
    with pytest.raises(Exception, match=r"lm_head.weight is stored in FP8.*fp8_lm_head=True"):
        LLM(str(dst))
    with LLM(str(dst), fp8_lm_head=True, tensor_parallel_size=2, block_size=8) as llm:
        check_against_hf(llm, refs_of(ref))


def test_an_fp8_lm_head_needs_fp8_weights(tiny_models):
    folder, _ = tiny_models[NAME]
    with pytest.raises(ConfigError, match="fp8_lm_head.*quantization='fp8'"):
        LLM(str(folder), fp8_lm_head=True)


def write_fp8_checkpoint(src, dst, per_tensor: set[str]) -> None:
    """src's checkpoint with every decoder linear weight in e4m3 and a weight_scale beside it (per output
    channel as [out, 1], or one per tensor for the module names in per_tensor), compressed-tensors style."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if not is_linear(name):
            out[name] = t
            continue
        module = name.split(".")[-2]
        if module in per_tensor:
            scale = (t.abs().max() / 448.0).reshape(1)
            out[name], out[name.replace(".weight", ".weight_scale")] = (t / scale).to(FP8), scale
        else:
            q, s = quantize_rows(t)
            out[name], out[name.replace(".weight", ".weight_scale")] = q, s[:, None]
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel"}, "targets": ["Linear"]}},
        "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))


def checkpoint_model(model, folder):
    """The float32 HF model of an FP8 checkpoint: its weights dequantised"""
    ref = copy.deepcopy(model)
    tensors = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if is_linear(name):
                scale = tensors[name.replace(".weight", ".weight_scale")].reshape(-1)
                p.copy_(tensors[name].float() * (scale[:, None] if scale.numel() > 1 else scale))
    return ref


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_models, tmp_path_factory):
    folder, model = tiny_models[NAME]
    dst = tmp_path_factory.mktemp("fp8") / "ckpt"
    write_fp8_checkpoint(folder, dst, per_tensor={"k_proj", "o_proj"})
    return dst, refs_of(checkpoint_model(model, dst))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_fp8_checkpoint_loads_with_its_scales_at_any_layout(layout, fp8_checkpoint):
    """per-channel and per-tensor scales, cut like their rows (q/k/v, gate/up) or whole (o_proj, down_proj
    split by columns); the config's quantization_config turns FP8 on without the flag"""
    folder, refs = fp8_checkpoint
    with LLM(str(folder), block_size=8, **layout) as llm:
        check_against_hf(llm, refs)


def test_bad_fp8_checkpoints_fail_at_load_naming_the_tensor(fp8_checkpoint, tmp_path):
    folder, _ = fp8_checkpoint
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight_scale"
    for label, change, says in (
            ("missing", lambda t: t.pop(name), f"model.layers.1.mlp.down_proj.weight is stored in FP8.*no {name}"),
            ("shape", lambda t: t.__setitem__(name, torch.ones(3, 2)), f"{name} has shape \\(3, 2\\)")):
        bad = tmp_path / label
        shutil.copytree(folder, bad)
        broken = dict(tensors)
        change(broken)
        save_file(broken, str(bad / "model.safetensors"))
        with pytest.raises(Exception, match=says):
            LLM(str(bad), tensor_parallel_size=2)


def test_unsupported_quantization_is_refused_naming_it(tiny_models, tmp_path):
    folder, _ = tiny_models[NAME]
    bad = tmp_path / "gptq"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quant_method='gptq'.*not supported"):
        LLM(str(bad))
    with pytest.raises(ConfigError, match="quantization must be"):
        LLM(str(folder), quantization="int4")


@pytest.mark.parametrize("name", ["qwen2-bias-untied", "mistral", "qwen3", "qwen3-moe"])
def test_every_architecture_in_fp8_is_its_dequantised_model(name, tiny_models):
    """the architectures the tests above leave out, at TP=2: a biased qkv (the bias added after the scales),
    a sliding window, Qwen3's q/k norms after an FP8 qkv, Qwen3-MoE's experts"""
    folder, model = tiny_models[name]
    with LLM(str(folder), quantization="fp8", block_size=8, tensor_parallel_size=2) as llm:
        check_against_hf(llm, refs_of(dequantised_model(model)))


@pytest.mark.parametrize("name, layout", [
    ("qwen2-moe", dict()), ("qwen2-moe", dict(tensor_parallel_size=2)),
    ("qwen2-moe", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    ("mixtral", dict(tensor_parallel_size=3)), ("mixtral", dict(tensor_parallel_size=2, enable_expert_parallel=True))])
def test_fp8_experts_are_the_dequantised_model(name, layout, tiny_models):
    """every expert (sliced over TP: the down projection's scales from whole rows; whole under EP) and the
    shared expert in FP8, the router in the model dtype"""
    folder, model = tiny_models[name]
    with LLM(str(folder), quantization="fp8", block_size=8, **layout) as llm:
        check_against_hf(llm, refs_of(dequantised_model(model)))


@pytest.mark.parametrize("layout", [dict(), dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_an_fp8_kv_cache_holds_four_times_the_float32_tokens_and_stays_close(layout, tiny_models):
    """kv_cache_dtype='fp8': K and V in e4m3 (a byte each; float32 on the CPU takes four), so the same memory
    holds 4x the blocks; the first logits move by the rounding of K and V (more than float32 noise, less
    than 10% of the largest; with FP8 weights too, less than 20%)"""
    folder, _ = tiny_models[NAME]
    kw = dict(block_size=8, kv_cache_memory_bytes=1 << 20, **layout)
    blocks, first = {}, {}
    for name, extra in (("plain", {}), ("kv", dict(kv_cache_dtype="fp8")),
                        ("both", dict(kv_cache_dtype="fp8_e4m3", quantization="fp8"))):
        with LLM(str(folder), **kw, **extra) as llm:
            blocks[name] = llm.engine.stats().blocks.num_blocks
            llm.engine.return_logits = True
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=1, temperature=0))
            first[name] = torch.stack([torch.from_numpy(llm.engine.logits_log[(o.request_id, 0)][0]) for o in outs])
    assert blocks["kv"] == blocks["both"] and 4 * blocks["plain"] <= blocks["kv"] < 4 * (blocks["plain"] + 1)
    for name, most in (("kv", 0.1), ("both", 0.2)):
        rel = ((first[name] - first["plain"]).abs().max() / first["plain"].abs().max()).item()
        assert 1e-4 < rel < most, (name, rel)


KERNELS = """
import torch
from shardlm.worker.kernels import triton_fp8
from shardlm.worker.kernels.triton_fp8 import Config, fp8_gemm_small_m, quantize_activations, workspace
from shardlm.worker.layers.fp8 import fp8_linear_kernels, fp8_linear_torch, quantize_rows
torch.manual_seed(0)
tma_launches, tma_kernel = [], triton_fp8._fp8_tma_kernel
class Counted:  # (the TMA configurations below must run the TMA kernel, not fall back to pointer loads)
    def __getitem__(self, grid):
        tma_launches.append(grid)
        return tma_kernel[grid]
triton_fp8._fp8_tma_kernel = Counted()
for m, n, k, cfg in [(1, 40, 96, Config(True, 16, 32, 3, 4, 2)), (3, 33, 100, Config(True, 16, 32, 2, 4, 2)),
                     (4, 64, 128, Config(True, 16, 32, 1, 4, 2)), (5, 40, 96, Config(False, 16, 32, 2, 4, 2)),
                     (17, 48, 80, Config(False, 32, 16, 4, 4, 2)), (64, 32, 64, Config(False, 16, 16, 1, 4, 2)),
                     (6, 40, 96, Config(False, 16, 32, 2, 4, 2, swap=True)),
                     (20, 70, 80, Config(False, 32, 16, 1, 4, 2, swap=True)),
                     (20, 70, 80, Config(False, 32, 16, 1, 4, 2, tma=True)),
                     (5, 40, 96, Config(False, 16, 32, 2, 4, 2, swap=True, tma=True))]:
    # (the interpreter's bf16 tl.dot is wrong: the tensor-core kernel runs on fp16 here, bf16 on the GPU)
    x = torch.randn(m, k).to(torch.bfloat16 if cfg.gemv else torch.float16)
    w, s = quantize_rows(torch.randn(n, k) * 0.02)
    bias = torch.randn(n).to(x.dtype)
    for b in (None, bias):
        want = fp8_linear_torch(x.float(), w, s, None if b is None else b.float())
        got = fp8_gemm_small_m(x, w, s, b, config=cfg).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, (m, n, k, cfg)
    if not cfg.gemv:  # activations in e4m3 too: their rounding (3 mantissa bits) is the difference
        xq, xs = quantize_activations(x)
        got = fp8_gemm_small_m(xq, w, s, bias, x_scale=xs, out_dtype=torch.float16, config=cfg).float()
        assert ((got - want).norm() / want.norm()).item() < 6e-2, (m, "a8")
    assert not workspace(torch.device("cpu"))[1].any(), "split-K left a counter set"
assert len(tma_launches) == 2, tma_launches  # (the two tma=True cases' e4m3 runs)
# more rows than SMALL_M through a matrix torch._scaled_mm does not take (40 rows: no multiple of 16): the
# Triton kernel, SMALL_M rows at a time
x, (w, s) = torch.randn(70, 96).to(torch.float16), quantize_rows(torch.randn(40, 96) * 0.02)
want = fp8_linear_torch(x.float(), w, s)
assert ((fp8_linear_kernels(x, w, s).float() - want).norm() / want.norm()).item() < 6e-2, "chunks"
print("interpreted kernels agree")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_fp8_kernels_in_the_cpu_interpreter():
    """The FP8 small-batch kernels' indexing, masking (TMA loads too) and split-K (partial sums through the workspace, the
    last program of a block adding them up and resetting its counter), run by Triton's interpreter, against
    the dequantising reference"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, timeout=600)
    if "only 0-dimensional arrays can be converted" in out.stderr:
        pytest.skip("this triton's interpreter cannot run with this numpy (scalar loads are 1-d arrays)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interpreted kernels agree" in out.stdout


def test_the_grouped_fp8_expert_gemm_takes_the_experts_as_stored():
    """fp8_grouped_mm (torch._scaled_grouped_mm, Hopper) on tensors shaped as SparseMoE stores its FP8 experts
    (w13 [experts, 2f, h] with a scale per row [experts, 2f]; w2 [experts, h, f], [experts, h]): torch's own
    shape and layout checks, run on meta tensors here, accept them and refuse a scale of the wrong shape"""
    from shardlm.worker.layers.fp8 import fp8_grouped_mm

    meta, E, h, f, rows = torch.device("meta"), 4, 64, 48, 10
    offs = torch.empty(E, device=meta, dtype=torch.int32)
    x = torch.empty(rows, h, device=meta, dtype=FP8)
    w13, s13 = torch.empty(E, 2 * f, h, device=meta, dtype=FP8), torch.empty(E, 2 * f, device=meta)
    w2, s2 = torch.empty(E, h, f, device=meta, dtype=FP8), torch.empty(E, h, device=meta)
    gate_up = fp8_grouped_mm(x, torch.empty(rows, device=meta), w13, s13, offs, torch.bfloat16)
    assert gate_up.shape == (rows, 2 * f) and gate_up.dtype == torch.bfloat16
    act = torch.empty(rows, f, device=meta, dtype=FP8)
    assert fp8_grouped_mm(act, torch.empty(rows, device=meta), w2, s2, offs, torch.bfloat16).shape == (rows, h)
    with pytest.raises(RuntimeError, match="scale_b"):
        fp8_grouped_mm(x, torch.empty(rows, device=meta), w13, torch.empty(E, h, device=meta), offs, torch.bfloat16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_step_profile_counts_every_fp8_gemm_kernel_as_gemm():
    """profile_step's split of a step's GPU time (gemm, attention, other) knows every FP8 GEMM kernel by its
    name; the activation quantisation is other"""
    import triton

    from shardlm.worker.kernels import triton_fp8
    from shardlm.worker.profiling import _kernel_kind

    launched = [name for name, f in vars(triton_fp8).items() if isinstance(f, triton.JITFunction)
                and name.endswith("_kernel")]
    assert len(launched) >= 4, launched
    for name in launched:
        assert _kernel_kind(name) == ("other" if "quantize" in name else "gemm"), name


@pytest.mark.parametrize("rows, large", [(1, False), (3, False), (1, True)])
def test_the_norms_and_silu_hand_fp8_layers_their_input_quantised(rows, large, monkeypatch):
    """Where an FP8 layer runs on e4m3 activations (layers/fp8.py takes_e4m3: the GPU path, emulated here by
    the reference arithmetic with per-token activation quantisation), the RMSNorm before qkv_proj and
    gate_up_proj and the SiLU x up before down_proj hand it E4M3Rows: a decoder layer's output is bitwise the
    one it gives when every layer quantises its own input, and o_proj (after attention) gets a tensor; one
    row (narrower than WIDE_N, smaller than LARGE_BYTES) is multiplied weight-only, and nothing is handed over
    quantised; one row of matrices past LARGE_BYTES (70B's) is handed over as more rows are"""
    import dataclasses

    from shardlm.common.layout import ParallelLayout
    from shardlm.common.presets import preset
    from shardlm.worker.distributed import ParallelContext
    from shardlm.worker.layers import fp8, linear
    from shardlm.worker.models.llama import LlamaDecoderLayer
    from shardlm.worker.weights import RandomReader

    arrived = []

    def emulated(x, weight, scale, bias=None):
        arrived.append((weight.shape, type(x).__name__))
        if not isinstance(x, fp8.E4M3Rows) and fp8.e4m3_activations(x.shape[0], *weight.shape):
            x = fp8.quantize_activations_torch(x)
        return fp8.fp8_linear_torch(x, weight, scale, bias)

    monkeypatch.setattr(linear, "fp8_path", lambda device: emulated)
    monkeypatch.setattr(fp8, "fp8_linear_kernels", emulated)  # (what takes_e4m3 recognises)
    if large:
        monkeypatch.setattr(fp8, "LARGE_BYTES", 1)
    cfg = dataclasses.replace(preset("tiny-llama"), quantization="fp8")
    ctx = ParallelContext(ParallelLayout(), 0, torch.device("cpu"), None, (0, 1))
    layer = LlamaDecoderLayer(0, cfg, ctx, torch.float32)
    for module in layer.modules():
        if module is not layer and hasattr(module, "load"):
            module.load(RandomReader(0))
    monkeypatch.setattr(layer.self_attn.attn, "forward", lambda rope, q, k, v, meta: q.reshape(q.shape[0], -1))
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(rows, cfg.hidden_size, generator=gen) for _ in range(2))
    fused = layer(None, x, residual, None)
    handed = arrived[:]
    arrived.clear()
    monkeypatch.setattr(linear, "takes_e4m3", lambda *a: False)
    alone = layer(None, x, residual, None)
    assert all(torch.equal(a, b) for a, b in zip(fused, alone))
    q, kv, d, h, f = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                      cfg.intermediate_size)
    kind = "E4M3Rows" if rows > 1 or large else "Tensor"
    assert handed == [(((q + 2 * kv) * d, h), kind), ((h, q * d), "Tensor"), ((2 * f, h), kind), ((h, f), kind)]
    assert all(k == "Tensor" for _, k in arrived)


def test_which_one_row_steps_run_on_e4m3_activations():
    """e4m3_activations: more than A8_ABOVE rows always; one row for a wide matrix (WIDE_N: 8B's gate_up) or a
    large one (LARGE_BYTES: 70B's qkv, o, down at TP=1), not for 8B's qkv, o, down or 70B's qkv at TP=2"""
    from shardlm.worker.layers.fp8 import e4m3_activations

    for n, k, a8 in ((28672, 4096, True), (10240, 8192, True), (8192, 8192, True), (8192, 28672, True),
                     (6144, 4096, False), (4096, 4096, False), (4096, 14336, False), (5120, 8192, False)):
        assert e4m3_activations(1, n, k) == a8, (n, k)
        assert e4m3_activations(2, n, k)
