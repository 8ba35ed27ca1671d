"""Hugging Face transformers baseline on one GPU: random Llama-3-8B shape, bf16, eager generate().

Same workload as `shardlm bench latency`: prompt 128 random tokens, 128 new tokens, greedy.
Prints one JSON line per batch size (TTFT = a 1-token generate; TPOT = (E2E - TTFT) / 127).
"""

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def timed(ids, new):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


for batch in [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,16").split(",")]:
    ids = torch.randint(3, cfg.vocab_size, (batch, 128), device="cuda")
    timed(ids, 8)  # warm-up
    ttft = timed(ids, 1)
    e2e = timed(ids, 128)
    print(json.dumps({"impl": "hf-transformers", "batch": batch, "ttft_ms": ttft * 1e3,
                      "tpot_ms": (e2e - ttft) / 127 * 1e3, "output_tok_per_s": batch * 128 / e2e}), flush=True)
