"""SamplingParams validation and the sampler's behaviour (no processes)."""

import pytest
import torch

from shardlm.common.messages import SeqPlan
from shardlm.engine.sampling_params import SamplingError, SamplingParams
from shardlm.worker.sampler import Sampler


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(logprobs=50), "logprobs"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed="x"), "seed"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)


def test_stop_string_becomes_list():
    assert SamplingParams(stop="END").stop == ["END"]


def seq(seq_id, **kw):
    """The plan row of a sequence sampled with SamplingParams(**kw)."""
    return SeqPlan(seq_id, [0], 0, [0], True, SamplingParams(**kw).sampling_spec())


def test_greedy_and_top_k_1_pick_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    s = Sampler(torch.device("cpu"))
    out = s.sample(logits, [seq(0, temperature=0), seq(1, temperature=1.0, top_k=1), seq(2, temperature=0.7, top_p=1e-6)])
    assert [o.token for o in out] == logits.argmax(-1).tolist()
    assert [o.seq_id for o in out] == [0, 1, 2]
    assert all(o.rank == 1 for o in out)


def test_seed_reproduces_and_differs_between_seeds():
    logits = torch.zeros(1, 1000)  # uniform: any bias would show
    def draw(seed):
        s = Sampler(torch.device("cpu"))
        return [s.sample(logits, [seq(7, temperature=1.0, seed=seed)])[0].token for _ in range(5)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(torch.device("cpu"))
    seen = {s.sample(logits, [seq(1, temperature=1.0, top_p=0.7, seed=i)])[0].token for i in range(200)}
    assert seen == {0, 1}


def test_logprobs_are_of_the_model_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = Sampler(torch.device("cpu"))
    (out,) = s.sample(logits, [seq(1, temperature=0, logprobs=2)])
    ref = torch.log_softmax(logits, -1)[0]
    assert [t for t, _ in out.top] == [0, 1]
    assert [lp for _, lp in out.top] == pytest.approx(ref[:2].tolist())
    assert out.logprob == pytest.approx(ref[0].item())
