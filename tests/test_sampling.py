"""SamplingParams validation and the sampler's behaviour (no processes)."""

import pytest
import torch

from shardlm.common.messages import SamplingSpec, SeqPlan
from shardlm.engine.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    SamplingError,
    SamplingParams,
)
from shardlm.worker.sampler import Sampler


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(logprobs=50), "logprobs"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed="x"), "seed"),
    # values a sampler or torch cannot take: each must stop here, never reach a worker
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=MAX_TEMPERATURE * 2), "temperature"), (dict(temperature=True), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=float("-inf")), "top_p"),
    (dict(seed=2**64), "seed"), (dict(seed=INT64_MAX + 1), "seed"), (dict(seed=INT64_MIN - 1), "seed"),
    (dict(n=MAX_N + 1), "n"), (dict(n=True), "n"), (dict(top_k=2**63), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(stop=["x"] * (MAX_STOP + 1)), "stop"), (dict(stop="x" * (MAX_STOP_CHARS + 1)), "stop"),
    (dict(stop=5), "stop"), (dict(stop_token_ids=[2**63]), "stop_token_ids"),
    (dict(stop_token_ids=list(range(MAX_STOP + 1))), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=11), "repetition_penalty"), (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(logit_bias={5: 101}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={i: 1 for i in range(301)}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(logit_bias={"²": 1}), "logit_bias"), (dict(min_tokens=-1), "min_tokens"),
    (dict(structured_outputs={"json_object": "yes"}), "structured_outputs"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(n=3, best_of=2), "best_of"),
    (dict(best_of=MAX_N + 1), "best_of"), (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (dict(structured_outputs={"choice": []}), "structured_outputs"), (dict(structured_outputs={"jsn": {}}), "structured_outputs"),
    (dict(structured_outputs="json"), "structured_outputs"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(SamplingError, match=field) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_temperatures_below_the_minimum_sample_greedily():
    assert SamplingParams(temperature=MIN_TEMPERATURE / 10).sampling_spec().greedy
    assert SamplingParams(temperature=1e-300).sampling_spec().greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).sampling_spec().greedy


@pytest.mark.parametrize("seed", [INT64_MIN, -1, 0, INT64_MAX])
def test_every_completions_seed_fits_torch(seed):
    params = SamplingParams(seed=seed, n=MAX_N)
    for i in (0, 1, MAX_N - 1):
        torch.Generator().manual_seed(params.sampling_spec(i).seed)  # raises if out of range


def test_stop_string_becomes_list():
    assert SamplingParams(stop="END").stop == ["END"]


def seq(seq_id, **kw):
    """The plan row of a sequence sampled with SamplingParams(**kw)."""
    return SeqPlan(seq_id, [0], 0, [0], True, SamplingParams(**kw).sampling_spec())


def test_greedy_and_top_k_1_pick_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    s = Sampler(torch.device("cpu"))
    out = s.sample(logits, [seq(0, temperature=0), seq(1, temperature=1.0, top_k=1), seq(2, temperature=0.7, top_p=1e-6)]).result()
    assert [o.token for o in out] == logits.argmax(-1).tolist()
    assert [o.seq_id for o in out] == [0, 1, 2]
    assert all(o.rank == 1 for o in out)


def test_seed_reproduces_and_differs_between_seeds():
    logits = torch.zeros(1, 1000)  # uniform: any bias would show
    def draw(seed):
        s = Sampler(torch.device("cpu"))
        return [s.sample(logits, [seq(7, temperature=1.0, seed=seed)]).result()[0].token for _ in range(5)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(torch.device("cpu"))
    seen = {s.sample(logits, [seq(1, temperature=1.0, top_p=0.7, seed=i)]).result()[0].token for i in range(200)}
    assert seen == {0, 1}


def test_logprobs_are_of_the_model_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = Sampler(torch.device("cpu"))
    (out,) = s.sample(logits, [seq(1, temperature=0, logprobs=2)]).result()
    ref = torch.log_softmax(logits, -1)[0]
    assert [t for t, _ in out.top] == [0, 1]
    assert [lp for _, lp in out.top] == pytest.approx(ref[:2].tolist())
    assert out.logprob == pytest.approx(ref[0].item())


def test_a_row_that_breaks_fails_alone():
    """A row whose values break sampling (validation bypassed) gets an error; the other rows are sampled."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    s = Sampler(torch.device("cpu"))
    rows = [seq(0, temperature=0),
            SeqPlan(1, [0], 0, [0], True, SamplingSpec(temperature=float("nan"))),
            seq(2, temperature=1.0, top_k=1, logprobs=2),
            SeqPlan(3, [0], 0, [0], True, SamplingSpec(temperature=1.0, seed=2**64))]  # beyond manual_seed
    out = s.sample(logits, rows).result()
    assert [o.seq_id for o in out] == [0, 1, 2, 3]
    assert out[0].error is None and out[0].token == logits[0].argmax().item()
    assert out[2].error is None and out[2].token == logits[2].argmax().item() and len(out[2].top) == 2
    assert "temperature=nan" in out[1].error and (out[1].token, out[1].rank, out[1].top) == (0, 0, None)
    assert "seed=18446744073709551616" in out[3].error


def test_extreme_but_valid_values_sample():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    s = Sampler(torch.device("cpu"))
    # a top_p below float32's smallest number still keeps the top token; logprobs beyond the vocabulary are clamped
    (tiny_p,) = s.sample(logits, [seq(1, temperature=1.0, top_p=1e-300, logprobs=20)]).result()
    assert tiny_p.error is None and tiny_p.token == 1 and len(tiny_p.top) == 4
    (hot,) = s.sample(logits, [seq(2, temperature=MAX_TEMPERATURE, top_k=2**63 - 1, seed=INT64_MIN)]).result()
    assert hot.error is None


def test_random_rows_follow_their_distribution():
    """The exponential race draws token i with probability p_i (after temperature and top-k), in a batch
    that mixes greedy, seeded and unseeded rows."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = torch.log(p).repeat(3, 1)
    s = Sampler(torch.device("cpu"))
    counts = torch.zeros(3, 4)
    for i in range(4000):
        out = s.sample(logits, [seq(0, temperature=1.0), seq(1, temperature=0), seq(2, temperature=1.0, top_k=2)])
        for row, o in enumerate(out.result()):
            counts[row, o.token] += 1
    assert torch.allclose(counts[0] / 4000, p, atol=0.03)
    assert counts[1].tolist() == [4000, 0, 0, 0]
    assert torch.allclose(counts[2] / 4000, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.03)


def test_a_seeded_row_ignores_its_batch():
    """A seeded row draws from its own generator: the same tokens alone or among other rows."""
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    def draw(rows, pick):
        s = Sampler(torch.device("cpu"))
        return [s.sample(logits[: len(rows)], rows).result()[pick].token for _ in range(8)]
    alone = draw([seq(5, temperature=1.0, seed=11)], 0)
    logits[:2] = logits[0]  # the same logits for the seeded row in both batches
    among = draw([seq(9, temperature=0.8), seq(5, temperature=1.0, seed=11)], 1)
    assert alone == among


def test_tokens_stay_on_the_device_until_asked():
    """sample() hands the next step its tokens as a tensor (async scheduling reads them on the device)."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    batch = Sampler(torch.device("cpu")).sample(logits, [seq(0, temperature=0), seq(1, temperature=0)])
    assert batch.tokens.tolist() == [1, 0] and batch.ready()


@pytest.mark.parametrize("vocab", [50, 49152, 128256, 151936, 50261])
def test_two_stage_reductions_equal_torch(vocab):
    """the sampler's argmax / logsumexp in parts (fast on a GPU at small batch) give torch's answer, ties and
    NaN included; 50261 (a prime) takes the one-part path"""
    from shardlm.worker.sampler import _argmax, _logsumexp, _parts
    torch.manual_seed(vocab)
    x = torch.randn(5, vocab)
    x[1, 7] = x[1, vocab - 3] = x[1].max() + 1  # a tie: the first one wins
    x[2, vocab // 2] = float("nan")
    x[3] = 0.0  # every entry equal
    assert _argmax(x).tolist() == x.argmax(-1).tolist() == [x[0].argmax(), 7, vocab // 2, 0, x[4].argmax()]
    torch.testing.assert_close(_logsumexp(x), torch.logsumexp(x, -1), equal_nan=True)
    assert (_parts(vocab) > 1) == (vocab in (49152, 128256, 151936))  # 50 and 50261: one part


def row(seq_id, ban=None, history=None, **kw):
    return SeqPlan(seq_id, [0], 0, [0], True, SamplingParams(**kw).sampling_spec(), ban=ban, history=history)


def test_logit_bias_and_bans_move_the_pick_not_the_logprobs():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    s = Sampler(torch.device("cpu"))
    out = s.sample(logits, [row(0, temperature=0, logit_bias={"3": 100}), row(1, temperature=0, ban=[0, 1]),
                            row(2, temperature=0)]).result()
    assert [o.token for o in out] == [3, 2, 0]
    ref = torch.log_softmax(logits[0], -1)
    assert out[0].logprob == pytest.approx(ref[3].item()) and out[0].rank == 4  # the model's own view


def test_penalties_follow_the_completion_on_the_device():
    """presence/frequency count the completion (seeded from the history, then each pick); repetition also
    counts the prompt, dividing positive logits and multiplying negative ones (Hugging Face's rule)"""
    s = Sampler(torch.device("cpu"))
    logits = torch.tensor([[2.0, 1.8, 1.6, -1.0]])
    # history: prompt [1], completion [0]: presence 0.5 takes token 0 to 1.5 -> token 1 wins
    picks = [s.sample(logits, [row(9, history=(1, [1, 0]) if i == 0 else None, temperature=0,
                                   presence_penalty=0.5)]).result()[0].token for i in range(3)]
    assert picks == [1, 2, 0]  # presence counts once: 0, 1 and 2 at 1.5, 1.3 and 1.1 -> 0 again
    # frequency: each repeat costs another 0.3
    s2 = Sampler(torch.device("cpu"))
    picks = [s2.sample(logits, [row(4, history=(1, [3]) if i == 0 else None, temperature=0,
                                    frequency_penalty=0.3)]).result()[0].token for i in range(4)]
    assert picks == [0, 1, 0, 2]  # 0 (2.0 -> 1.7), 1 (1.8 -> 1.5), 0 (1.7 -> 1.4), then 2 (1.6) leads
    # repetition over the prompt: token 0 in the prompt: 2.0 / 2 = 1.0 < 1.8
    s3 = Sampler(torch.device("cpu"))
    (out,) = s3.sample(logits, [row(5, history=(2, [0, 3]), temperature=0, repetition_penalty=2.0)]).result()
    assert out.token == 1
    s3.forget([5])
    assert 5 not in s3.penalties.slots and s3.penalties.free


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(torch.device("cpu"))
    seen = {s.sample(logits, [row(1, temperature=1.0, min_p=0.5, seed=i)]).result()[0].token for i in range(200)}
    assert seen == {0, 1}  # 0.15 and 0.05 are under 0.5 x 0.5


def test_the_wire_carries_the_new_fields_and_stays_short_without_them():
    plain = SamplingParams().sampling_spec()
    assert len(plain.to_wire()) == 5 and SamplingSpec.from_wire(plain.to_wire()) == plain
    full = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.2, repetition_penalty=1.3, min_p=0.1,
                          logit_bias={7: -100, 3: 2.5}).sampling_spec()
    assert SamplingSpec.from_wire(full.to_wire()) == full and full.logit_bias == ((3, 2.5), (7, -100.0))
    r = row(3, ban=[2], history=(1, [5, 6]), presence_penalty=0.5)
    back = SeqPlan.from_wire(r.to_wire())
    assert (back.ban, back.history, back.sampling) == ([2], (1, [5, 6]), r.sampling)
    assert len(row(3).to_wire()) == 7
