"""The engine's RMSNorm and rotary against Hugging Face's own functions, bit for bit, in bf16 and float32
(the engine computes them with fewer kernels: one rms_norm reading the model dtype, a roll instead of
rotate_half's negate + concatenate, q and k rotated in one go)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from shardlm.worker.kernels.rope_cache import rotate
from shardlm.worker.layers.norm_rope import RMSNorm, RotaryEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_hf(dtype):
    torch.manual_seed(0)
    ours = RMSNorm("n", 96, 1e-5, torch.device("cpu"), dtype)
    ours.weight.data.copy_(torch.randn(96).to(dtype))
    hf = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    hf.weight.data.copy_(ours.weight.data)
    x = (torch.randn(7, 96) * 3).to(dtype)
    assert torch.equal(ours(x), hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_of_q_and_k_equals_hf(dtype):
    torch.manual_seed(0)
    n_q, n_kv, d, tokens = 6, 2, 32, 5
    rotary = RotaryEmbedding(d, 64, 10000.0, None, torch.device("cpu"))
    positions = torch.tensor([0, 3, 4, 17, 63])
    qk = torch.randn(tokens, n_q + n_kv, d).to(dtype)
    rope = rotary.lookup(positions, dtype)
    q, k = rotate(rope, qk[:, :n_q]), rotate(rope, qk[:, n_q:])
    # HF: [batch, heads, tokens, d] with cos/sin [batch, tokens, d]
    cos, sin = rotary.cos[positions].to(dtype)[None], rotary.sin[positions].to(dtype)[None]
    hq, hk = apply_rotary_pos_emb(qk[:, :n_q].transpose(0, 1)[None], qk[:, n_q:].transpose(0, 1)[None], cos, sin)
    assert torch.equal(q, hq[0].transpose(0, 1)) and torch.equal(k, hk[0].transpose(0, 1))
