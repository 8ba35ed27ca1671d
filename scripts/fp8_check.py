"""FP8 against bf16 on one model (issue 19's quality check; a GPU with FP8 tensor cores, or the CPU's
reference path for a tiny model):

    python scripts/fp8_check.py --model random:llama-3-8b --json fp8_check.json

1. next-token logits after --prompts random prompts: cosine similarity of the FP8 engine's to the bf16
   engine's (the last prompt position, full vocabulary);
2. greedy top-1 agreement over --steps teacher-forced steps: bf16 generates greedily, then FP8 reads the
   prompt + those tokens (prompt_logprobs) and the fraction of positions where its most likely token is
   bf16's choice is reported.
With --reference, FP8 also runs on its reference path (dequantised weights): what the kernels add to
the error of the FP8 weights themselves. With --fp8-lm-head, FP8 also runs with its LM head in FP8
(fp8_lm_head): what that adds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny-llama")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--forced", type=int, default=4, help="prompts whose greedy continuation is teacher-forced")
    p.add_argument("--reference", action="store_true",
                   help="also FP8 on its reference path (SHARDLM_FP8_REFERENCE=1): the kernels' share of the error")
    p.add_argument("--fp8-lm-head", action="store_true", help="also FP8 with the LM head in FP8 (fp8_lm_head)")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from shardlm import LLM, SamplingParams

    rng = random.Random(0)
    prompts, runs = None, {}
    fp8 = {"quantization": "fp8"}
    variants = ([("bf16", {}), ("fp8", fp8)] + ([("fp8-reference", fp8)] if a.reference else [])
                + ([("fp8-head", {**fp8, "fp8_lm_head": True})] if a.fp8_lm_head else []))
    for name, settings in variants:
        os.environ["SHARDLM_FP8_REFERENCE"] = "1" if name == "fp8-reference" else "0"  # (the workers inherit it)
        with LLM(a.model, **settings) as llm:
            vocab = llm.engine.source.config.vocab_size
            if prompts is None:
                prompts = [[rng.randrange(10, min(vocab, 30000)) for _ in range(a.prompt_len)] for _ in range(a.prompts)]
            llm.engine.return_logits = True
            outs = llm.generate([{"prompt_token_ids": t} for t in prompts], SamplingParams(max_tokens=1, temperature=0))
            runs[name] = {"logits": np.stack([llm.engine.logits_log[(o.request_id, 0)][0] for o in outs])}
            llm.engine.return_logits = False
            if name == "bf16":
                greedy = llm.generate([{"prompt_token_ids": t} for t in prompts[: a.forced]],
                                      SamplingParams(max_tokens=a.steps, temperature=0, ignore_eos=True))
                forced = [t + o.outputs[0].token_ids for t, o in zip(prompts, greedy)]
                continue
            outs = llm.generate([{"prompt_token_ids": t} for t in forced],
                                SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
            # the positions bf16 generated: is bf16's greedy choice this engine's most likely token there?
            ranks = [o.prompt_logprobs[pos][t[pos]].rank for t, o in zip(forced, outs) for pos in range(a.prompt_len, len(t))]
            runs[name].update(agreement=float(np.mean([r == 1 for r in ranks])), positions=len(ranks))
    b = runs["bf16"]["logits"]
    result = {"model": a.model, "prompts": a.prompts, "steps": a.steps}
    for name, _ in variants[1:]:
        f = runs[name]["logits"]
        cos = (b * f).sum(1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(f, axis=1))
        top1 = float((b.argmax(1) == f.argmax(1)).mean())
        result[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                        "next_token_top1_agreement": top1, "forced_top1_agreement": runs[name]["agreement"],
                        "forced_positions": runs[name]["positions"]}
        print(f"{name} vs bf16: next-token logits of {a.prompts} prompts: cosine mean {cos.mean():.5f}, min "
              f"{cos.min():.5f}, top-1 equal {top1:.3f}; teacher-forced greedy top-1 agreement over "
              f"{runs[name]['positions']} positions: {runs[name]['agreement']:.4f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
