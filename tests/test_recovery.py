"""A worker group that fails mid-run is replaced and every request completes as if nothing happened.

The fault hook (SHARDLM_FAULT_INJECT, worker/faults.py) makes one rank of the first worker group die or
stall at a chosen step and point; the replacement group is started without it. Greedy outputs must equal
an undisturbed run's, token for token and character for character.
"""

import os
import signal

import pytest

from shardlm import LLM, SamplingParams
from shardlm.engine.executor import WorkerError

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

CASES = {  # name: (engine arguments, fault)
    "prefill": (dict(model="random:tiny-llama", tensor_parallel_size=2), "rank=1,step=1,point=step,action=kill"),
    "decode": (dict(model="random:tiny-llama", tensor_parallel_size=2), "rank=0,step=5,point=step,action=kill"),
    "pipeline transfer": (dict(model="random:tiny-llama", pipeline_parallel_size=2),
                          "rank=0,step=4,point=stage_send,action=kill"),
    "moe all-to-all": (dict(model="random:tiny-mixtral", tensor_parallel_size=2, enable_expert_parallel=True),
                       "rank=1,step=4,point=all_to_all,action=kill"),
    "stalled rank": (dict(model="random:tiny-llama", tensor_parallel_size=2, step_timeout_s=3.0),
                     "rank=1,step=5,point=step,action=stall"),
}


def _generate(kwargs):
    with LLM(**kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
        return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs], list(llm.engine.recovery.history)


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_rank_is_replaced_and_nothing_is_lost(case, monkeypatch):
    kwargs, fault = CASES[case]
    expected, history = _generate(kwargs)
    assert history == []
    monkeypatch.setenv("SHARDLM_FAULT_INJECT", fault)
    got, history = _generate(kwargs)
    assert got == expected
    assert len(history) == 1
    assert history[0].cause == ("hung" if "stall" in fault else "died")
    assert history[0].generation == 1


def test_a_worker_killed_between_steps_is_replaced():
    """kill -9 from outside, while requests are half done: generate() still returns every completion whole."""
    kwargs = dict(model="random:tiny-llama", tensor_parallel_size=2)
    expected, _ = _generate(kwargs)
    with LLM(**kwargs) as llm:
        engine = llm.engine
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), None, p, GREEDY)
        done = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].text)
            steps += 1
            if steps == 4:
                os.kill(engine.executor.procs[1].pid, signal.SIGKILL)
        assert [done[str(i)] for i in range(len(PROMPTS))] == expected
        assert [r.cause for r in engine.recovery.history] == ["died"]


def test_a_crash_loop_ends_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("SHARDLM_FAULT_INJECT", "rank=1,step=2,point=step,action=kill")
    with LLM(model="random:tiny-llama", tensor_parallel_size=2, max_worker_restarts=0) as llm:
        with pytest.raises(WorkerError, match="gave up replacing the worker group.*max_worker_restarts=0"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
