"""Constrained decoding's pace beside unconstrained requests in the same steps (issue 18).

Runs one offline batch: `--constrained` requests under a regex that cannot end before they stop by
max_tokens) and `--plain` unconstrained ones, all with --output-len tokens, and reports each group's
time per output token (from its first token to its last). Under async scheduling a constrained sequence
is planned ahead with its masks sent after the plan (StepPlan.masks_follow); an engine that cannot do
that runs it at every other step. Compare engines in one call by pointing PYTHONPATH at another checkout
(e.g. .baseline/): the script uses only the public LLM API.

    python scripts/structured_bench.py --model random:llama-3-8b --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny-llama")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--constrained", type=int, default=8, help="requests under the regex")
    p.add_argument("--plain", type=int, default=8, help="unconstrained requests in the same batch")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--regex", default="[a-z]{4096}", help="a constraint that lasts past --output-len tokens")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()

    from shardlm import LLM, SamplingParams

    constrained = SamplingParams(max_tokens=a.output_len, temperature=1.0, seed=1, ignore_eos=True,
                                 structured_outputs={"regex": a.regex})
    plain = SamplingParams(max_tokens=a.output_len, temperature=1.0, seed=1, ignore_eos=True)
    prompts = [f"request {i}: write something" for i in range(a.constrained + a.plain)]
    params = [constrained] * a.constrained + [plain] * a.plain
    with LLM(a.model, tensor_parallel_size=a.tensor_parallel_size) as llm:
        llm.generate(prompts[:2], [constrained, plain])  # warm-up: compile, first grammar
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0

    def tpot_ms(group: list) -> float:
        return statistics.mean((o.metrics.last_token_time - o.metrics.first_token_time)
                               / max(1, len(o.outputs[0].token_ids) - 1) * 1e3 for o in group)

    result = {"model": a.model, "tensor_parallel_size": a.tensor_parallel_size, "output_len": a.output_len,
              "regex": a.regex, "wall_s": wall,
              "constrained": {"requests": a.constrained, "tpot_ms": tpot_ms(outs[: a.constrained]) if a.constrained else None,
                              "tokens": sum(len(o.outputs[0].token_ids) for o in outs[: a.constrained])},
              "plain": {"requests": a.plain, "tpot_ms": tpot_ms(outs[a.constrained:]) if a.plain else None,
                        "tokens": sum(len(o.outputs[0].token_ids) for o in outs[a.constrained:])}}
    for name in ("constrained", "plain"):
        g = result[name]
        if g["requests"]:
            print(f"{name:>12}: {g['requests']} requests, {g['tokens']} tokens, {g['tpot_ms']:.2f} ms per output token")
    print(f"{'wall':>12}: {wall:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
