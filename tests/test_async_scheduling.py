"""Async scheduling: the driver sends step N+1 before step N's tokens come back; its decodes read those
tokens on the workers (PREV_TOKEN). The outputs must be exactly those of the synchronous engine."""

import pytest

from shardlm import LLM, SamplingParams
from shardlm.common.messages import PREV_TOKEN, SeqPlan

PROMPTS = [{"prompt_token_ids": [5 + i, 6, 7 + 2 * i] * (1 + i % 3)} for i in range(6)]


def run(async_scheduling: bool, params, tp: int = 1):
    """Token ids, finish and stop reasons, logprobs of every completion; and the plans the workers got."""
    with LLM("random:probe-tiny", tensor_parallel_size=tp, async_scheduling=async_scheduling, block_size=8) as llm:
        plans, submit = [], llm.engine.executor.submit
        llm.engine.executor.submit = lambda plan: (plans.append(plan), submit(plan))[1]
        outs = llm.generate(PROMPTS, params)
        assert not llm.engine.has_unfinished_requests() and llm.engine.stats().blocks.usage == 0.0
    got = [[(c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob) for c in o.outputs] for o in outs]
    return got, plans


def prev_tokens(plans) -> int:
    return sum(s.tokens == [PREV_TOKEN] for p in plans for s in p.seqs)


def same(a, b):
    for ra, rb in zip(a, b, strict=True):
        for (ta, fa, sa, la), (tb, fb, sb, lb) in zip(ra, rb, strict=True):
            assert (ta, fa, sa) == (tb, fb, sb)
            assert la == pytest.approx(lb, abs=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_async_matches_sync_greedy(tp):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < tp:  # (CPU workers otherwise: any count)
        pytest.skip(f"needs {tp} GPUs")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    sync, sync_plans = run(False, params, tp)
    fast, fast_plans = run(True, params, tp)
    same(sync, fast)
    assert prev_tokens(sync_plans) == 0
    # every decode but a sequence's first follows a step that samples it: nearly all go ahead
    assert prev_tokens(fast_plans) >= len(PROMPTS) * 8


def test_sequences_that_stop_with_a_step_in_flight():
    """Stop tokens end sequences while their next step already runs: its token is dropped (also for a
    completion whose sibling goes on); max_tokens, seeds and n > 1 come out as in the synchronous engine."""
    def params(stops):
        return [SamplingParams(max_tokens=6 + i, temperature=0.9 if i % 2 else 0, seed=i, n=2 if i % 2 else 1,
                               stop_token_ids=stops, ignore_eos=True) for i in range(len(PROMPTS))]
    probe, _ = run(False, params([]))
    stops = sorted({row[0][0][3] for row in probe[1::2]})  # the 4th token of each sampled request's first completion
    sync, _ = run(False, params(stops))
    fast, plans = run(True, params(stops))
    same(sync, fast)
    assert prev_tokens(plans) > 0
    # some request has a completion that stopped early while its sibling went on
    assert any(len({len(ids) for ids, *_ in row}) > 1 for row in fast[1::2])


def test_a_prev_token_the_worker_did_not_sample_is_refused():
    from shardlm.worker.model_runner import ModelRunner

    runner = type("R", (), {"sampled_rows": {3: 0}})()
    ok = ModelRunner.prev_rows(runner, [SeqPlan(3, [PREV_TOKEN], 5, [0], True), SeqPlan(4, [9], 2, [0], True)])
    assert ok == [0, -1]
    with pytest.raises(RuntimeError, match="sequence 7: the plan asks for the token sampled in the previous step"):
        ModelRunner.prev_rows(runner, [SeqPlan(7, [PREV_TOKEN], 5, [0], True)])
