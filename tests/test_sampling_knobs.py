"""The sampling knobs vLLM users send (penalties, logit_bias, min_p, min_tokens), through the engine: against
Hugging Face's own logits processors where it has them, at TP 1 and 2, under async scheduling and chunked
prefill."""

from __future__ import annotations

import pytest
import torch
from hf_models import PROMPTS

from shardlm import LLM, SamplingParams
from shardlm.engine.sampling_params import SamplingError


def hf_generate(model, prompt, steps, **kw):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("tp", [1, 2])
def test_repetition_penalty_matches_hf(tp, tiny_models):
    """Hugging Face's RepetitionPenaltyLogitsProcessor (prompt and completion, divide positive logits,
    multiply negative) against the sampler's, greedy, float32; a 4-token budget chunks the longer prompts"""
    folder, model = tiny_models["llama-uneven-tied"]
    refs = [hf_generate(model, p, 12, repetition_penalty=1.8) for p in PROMPTS]
    plain = [hf_generate(model, p, 12) for p in PROMPTS]
    assert refs != plain  # the penalty changes what greedy decoding picks here (else this test shows nothing)
    with LLM(str(folder), tensor_parallel_size=tp, max_num_batched_tokens=8) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.8))
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_presence_and_frequency_penalties_stop_repeats(tiny_models):
    """a tiny random model repeats itself greedily; a frequency penalty large enough makes every token of a
    completion new until the vocabulary of likely tokens runs out"""
    folder, _ = tiny_models["llama-uneven-tied"]
    with LLM(str(folder)) as llm:
        plain, pen = (llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True, **kw)) for kw in ({}, {"presence_penalty": 2.0,
                                                                                "frequency_penalty": 2.0}))
    repeats = [len(o.outputs[0].token_ids) - len(set(o.outputs[0].token_ids)) for o in plain]
    assert sum(repeats) > 0  # without penalties the tiny model repeats (else this test shows nothing)
    for o in pen:
        ids = o.outputs[0].token_ids
        assert len(set(ids)) >= len(ids) - 2, ids


def test_logit_bias_forces_a_token_and_min_tokens_holds_off_eos(tiny_models):
    folder, _ = tiny_models["llama-uneven-tied"]
    with LLM(str(folder)) as llm:
        eos = sorted(llm.engine.tokenizer.eos_token_ids)[0]
        (forced,) = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                                 SamplingParams(max_tokens=5, temperature=0, logit_bias={7: 100}))
        assert forced.outputs[0].token_ids == [7] * 5
        # EOS pushed to the top: without min_tokens it ends at once; with it, after exactly 4 tokens
        short, held = (llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(
            max_tokens=10, temperature=0, logit_bias={eos: 100}, **kw))[0].outputs[0] for kw in ({}, {"min_tokens": 4}))
        assert short.token_ids == [eos] and short.finish_reason == "stop"
        assert len(held.token_ids) == 5 and held.token_ids[-1] == eos and eos not in held.token_ids[:4]
        with pytest.raises(SamplingError, match="outside the vocabulary"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(logit_bias={10**6: 1}))


def test_best_of_returns_the_n_most_likely_of_its_completions(tiny_models):
    """best_of=4, n=2 samples the same 4 completions as n=4 (same seeds) and returns the 2 with the highest
    cumulative log-probability, numbered 0 and 1 best first; it cannot stream"""
    folder, _ = tiny_models["llama-uneven-tied"]
    kw = dict(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    with LLM(str(folder)) as llm:
        (four,) = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(n=4, **kw))
        (best,) = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(n=2, best_of=4, **kw))
        with pytest.raises(SamplingError, match="best_of > n cannot stream"):
            next(llm.stream({"prompt_token_ids": PROMPTS[1]}, SamplingParams(n=2, best_of=4, **kw)))
    ranked = sorted(four.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked]
    assert [o.index for o in best.outputs] == [0, 1]
    assert len({tuple(o.token_ids) for o in four.outputs}) > 2  # the 4 differ (else the ranking shows nothing)


@pytest.mark.parametrize("layout", [dict(), dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_prompt_logprobs_match_hf(layout, tiny_models):
    """prompt_logprobs=k: every prompt token after the first gets its log-probability under Hugging Face's
    logits at the position before (float32), its rank, and the k most likely tokens there; a 5-token budget
    cuts the prompts into chunks, and the prefix cache (the same prompt twice) must not skip positions."""
    folder, model = tiny_models["llama-uneven-tied"]
    prompts = PROMPTS[:2] + [PROMPTS[1]]
    with LLM(str(folder), max_num_batched_tokens=5, block_size=4, **layout) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)] * 2
                            + [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0, n=2)])
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        k = 3 if out is not outs[2] else 0
        for pos in range(1, len(prompt)):
            lps, want = got[pos], ref[pos - 1]
            token = prompt[pos]
            assert lps[token].logprob == pytest.approx(want[token].item(), abs=1e-4)
            assert lps[token].rank == int((want > want[token]).sum()) + 1
            top = want.topk(k).indices.tolist()
            assert set(lps) == set(top) | {token}
            assert {t for t, lp in lps.items() if lp.rank <= k} == set(top)
            for t in top:
                assert lps[t].logprob == pytest.approx(want[t].item(), abs=1e-4)


def test_prompt_logprobs_off_and_out_of_range():
    with LLM("random:tiny-llama") as llm:
        (out,) = llm.generate(["hello"], SamplingParams(max_tokens=1))
        assert out.prompt_logprobs is None
        for bad in (-1, 21, 1.5, True):
            with pytest.raises(SamplingError, match="prompt_logprobs"):
                llm.generate(["hello"], SamplingParams(prompt_logprobs=bad))


@pytest.mark.parametrize("tp", [1, 2])
def test_a_profiled_step_leaves_seeded_and_penalized_requests_as_they_were(tp, tiny_models):
    """profile_step runs a decode step twice and throws it away: the seeded generators' draws and the
    penalty counts it made are undone, so every token is the one a run without the profile gives (the
    first profile of a penalized request also carries its history: the driver must send it again)."""
    folder, _ = tiny_models["llama-uneven-tied"]
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True, frequency_penalty=1.5),
              SamplingParams(max_tokens=12, temperature=0.8, seed=12, ignore_eos=True, repetition_penalty=1.6)]

    def run(profile_at: set[int]) -> list[list[int]]:
        with LLM(str(folder), tensor_parallel_size=tp) as llm:
            engine = llm.engine
            for i, (p, sp) in enumerate(zip(PROMPTS[:2], params)):
                engine.add_request(str(i), None, p, sp)
            outs, step = {}, 0
            while engine.has_unfinished_requests():
                if step in profile_at and not engine.scheduler.waiting and engine.scheduler.running:
                    engine.profile_step()
                for o in engine.step():
                    outs[o.request_id] = o.outputs[0].token_ids
                step += 1
        return [outs["0"], outs["1"]]

    plain = run(set())
    assert run({2, 3, 6}) == plain


def test_a_preempted_penalized_sequence_gives_back_its_counts_and_resumes_the_same():
    """A KV cache of a few blocks preempts sequences: each preempted penalized sequence's row of token
    counts is released on the workers (StepPlan.release) and seeded again from its history when it resumes,
    so the tokens equal those of a cache that never preempts."""
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True, frequency_penalty=1.0,
                            presence_penalty=0.5)
    prompts = [{"prompt_token_ids": list(range(3 + i, 40 + i))} for i in range(4)]
    kw = dict(block_size=8, max_model_len=64)
    with LLM("random:tiny-llama", **kw) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    block_bytes = 2 * 2 * 2 * 16 * 4 * 8  # layers x (k, v) x kv heads x head_dim x float32 x block
    with LLM("random:tiny-llama", kv_cache_memory_bytes=12 * block_bytes, **kw) as llm:
        released, submit = [], llm.engine.executor.submit
        llm.engine.executor.submit = lambda plan: (released.extend(plan.release), submit(plan))
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.stats().scheduler.num_preemptions > 0 and released
    assert got == want
