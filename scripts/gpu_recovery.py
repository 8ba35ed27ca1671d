"""Recovery time on a GPU host: how long from a rank's death (or hang) to the replacement group's first
step, beside the cold start of the same engine, in one call. Greedy outputs must equal the undisturbed run.

    python scripts/gpu_recovery.py [model] [tp] [--dtype D] [--json out.json]

Besides the times: how many of each completion's tokens match the undisturbed run before the first
difference, and the same for a second undisturbed run (recomputing a context in one prefill rounds
differently from decoding it token by token; in bf16, on random weights whose logits are nearly flat,
that alone can flip a greedy choice).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from shardlm import LLM, SamplingParams

MODEL = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "random:llama-3-8b"
TP = int(sys.argv[2]) if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else 2
OUT = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
DTYPE = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "auto"
PROMPTS = [[(11 * i + j) % 30000 + 100 for j in range(64 + 16 * i)] for i in range(8)]
PARAMS = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def run(llm: LLM, fault: tuple[int, int] | None) -> tuple[list[list[int]], float | None]:
    """Every prompt to completion; fault = (step, signal) sent to rank 1 at that step. Returns the
    token ids and, with a fault, seconds from the signal to the first completed step after it."""
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", None, p, PARAMS)
    done, steps, t_fault, recovered, generation = {}, 0, None, None, engine.recovery.generation
    while engine.has_unfinished_requests():
        outs = engine.step()
        if t_fault is not None and recovered is None and outs and engine.recovery.generation > generation:
            recovered = time.monotonic() - t_fault  # the replacement group's first tokens
        for out in outs:
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if fault is not None and steps == fault[0]:
            t_fault = time.monotonic()
            os.kill(engine.executor.procs[1].pid, fault[1])
    return [done[f"r{i}"] for i in range(len(PROMPTS))], recovered


def _prefixes(got: list[list[int]], want: list[list[int]]) -> list[int]:
    """Per completion: tokens equal to the reference before the first difference."""
    return [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w)) for g, w in zip(got, want)]


def main() -> None:
    t0 = time.monotonic()
    llm = LLM(MODEL, tensor_parallel_size=TP, step_timeout_s=10.0, dtype=DTYPE)
    cold = time.monotonic() - t0
    reference, _ = run(llm, None)
    again, _ = run(llm, None)
    result = {"model": MODEL, "tp": TP, "dtype": llm.engine.dtype, "cold_start_s": round(cold, 2),
              "undisturbed_again": {"identical": again == reference, "matching_prefix": _prefixes(again, reference)}}
    for name, sig in (("killed", signal.SIGKILL), ("stalled", signal.SIGSTOP)):
        tokens, recovered = run(llm, (12, sig))
        last = llm.engine.recovery.history[-1]
        result[name] = {"identical": tokens == reference, "matching_prefix": _prefixes(tokens, reference),
                        "signal_to_next_step_s": round(recovered or -1, 2),
                        "replacement_start_s": round(last.seconds, 2), "cause": last.cause}
        print(name, result[name], flush=True)
    llm.shutdown()
    print(json.dumps(result, indent=1))
    if OUT:
        with open(OUT, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
