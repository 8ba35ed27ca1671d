"""Mixture-of-experts models against Hugging Face: tensor-parallel experts and expert parallelism
(CPU, gloo, float32), routing statistics and expert placement."""

import copy
import json

import pytest
import torch
from hf_models import PROMPTS, STEPS, check_against_hf, hf_greedy

from shardlm import LLM, SamplingParams
from shardlm.common.config import ConfigError, ModelConfig
from shardlm.common.presets import preset
from shardlm.engine.moe_placement import (
    balanced,
    plan_placement,
    rank_loads,
    round_robin,
)
from shardlm.worker.layers.moe import choose_copies, count

MOE_MODELS = ["mixtral", "qwen2-moe", "qwen3-moe"]


# EP=2 and EP=4 (qwen2-moe's 6 experts split 2/2/1/1), tensor-parallel experts at TP=2, and EP over
# the TP ranks of two pipeline stages. These small steps take the fixed-capacity all-to-all;
# "ep4-variable" forces the exact-size one that large prefills use.
LAYOUTS = {
    "tp1": dict(tensor_parallel_size=1),
    "tp2-experts": dict(tensor_parallel_size=2),
    "ep2": dict(tensor_parallel_size=2, enable_expert_parallel=True),
    "ep4": dict(tensor_parallel_size=4, enable_expert_parallel=True),
    "ep4-variable": dict(tensor_parallel_size=4, enable_expert_parallel=True),
    "ep2-pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2, enable_expert_parallel=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_matches_hf(layout, tiny_models, hf_refs, monkeypatch):
    if layout == "ep4-variable":
        monkeypatch.setenv("SHARDLM_EP_PADDED_MAX_ROWS", "0")  # read by the workers when they build their layers
    for name in MOE_MODELS:
        if layout == "ep2-pp2" and name != "qwen2-moe":  # one model is enough for the PP combination
            continue
        with LLM(str(tiny_models[name][0]), block_size=8, **LAYOUTS[layout]) as llm:
            check_against_hf(llm, hf_refs[name])
            stats = llm.engine.expert_stats()
            cfg = llm.engine.source.config
            # every routed token counted once: prompt + generated tokens (less the last) x top-k, per MoE layer
            routed = sum(len(p) + STEPS - 1 for p in PROMPTS) * cfg.num_experts_per_tok
            moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
            assert sorted(stats["tokens_per_expert"]) == moe_layers
            assert all(sum(c) == routed for c in stats["tokens_per_expert"].values())
            if llm.engine.layout.ep == 1:
                assert set(stats["step_imbalance"]) == {1.0}
            else:
                assert max(stats["step_imbalance"]) > 1.0  # skew is visible


def test_routing_forced_to_one_pair_of_experts(tiny_models, tmp_path, monkeypatch):
    """A zero router gives every token the same experts: half the EP ranks get nothing and it still
    matches, with the exact-size all-to-all (empty sends) and the fixed-capacity one (all padding)."""
    _, model = tiny_models["mixtral"]
    forced = copy.deepcopy(model)
    with torch.no_grad():
        for pname, p in forced.named_parameters():
            if pname.endswith("mlp.gate.weight"):
                p.zero_()
    forced.save_pretrained(tmp_path / "forced")
    refs = [hf_greedy(forced, p, STEPS) for p in PROMPTS]
    for padded_max_rows in ("0", "1024"):
        monkeypatch.setenv("SHARDLM_EP_PADDED_MAX_ROWS", padded_max_rows)
        with LLM(str(tmp_path / "forced"), tensor_parallel_size=4, enable_expert_parallel=True, block_size=8) as llm:
            check_against_hf(llm, refs)
            stats = llm.engine.expert_stats()
        for counts in stats["tokens_per_expert"].values():
            assert sum(1 for c in counts if c) == 2  # top-2, always the same two experts
        idle_ranks = [r for r, rows in stats["rows_per_rank_per_step"].items() if not any(rows)]
        assert len(idle_ranks) == 2  # 2 of the 4 ranks hold neither expert: they never ran a row


def test_balanced_placement_evens_the_measured_load(tiny_models, hf_refs, tmp_path):
    folder = str(tiny_models["qwen3-moe"][0])
    with LLM(folder, tensor_parallel_size=2, enable_expert_parallel=True, block_size=8) as llm:
        check_against_hf(llm, hf_refs["qwen3-moe"])
        before = llm.engine.expert_stats()
        llm.save_expert_load(tmp_path / "load.json")
    saved = json.loads((tmp_path / "load.json").read_text())
    assert {int(k): v for k, v in saved["tokens_per_expert"].items()} == before["tokens_per_expert"]
    with LLM(folder, tensor_parallel_size=2, enable_expert_parallel=True, block_size=8, expert_placement="balanced",
             expert_load=str(tmp_path / "load.json"), num_redundant_experts=2) as llm:
        check_against_hf(llm, hf_refs["qwen3-moe"])
        after = llm.engine.expert_stats()
    assert all(sum(len(r) for r in p) == 8 + 2 for p in after["placement"] if p)  # 2 experts have 2 copies
    assert after["mean_imbalance"] < before["mean_imbalance"]


def test_stats_with_a_dense_stage_and_a_profiled_step(tiny_models):
    """qwen2-moe's layer 1 is dense: at PP=3 stage 1 has no experts. A profiled step (re-run) is not counted."""
    with LLM(str(tiny_models["qwen2-moe"][0]), pipeline_parallel_size=3, block_size=8) as llm:
        engine = llm.engine
        engine.add_request("a", None, [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
        for _ in range(3):
            engine.step()
        before = engine.expert_stats()
        engine.profile_step()
        after = engine.expert_stats()
    assert sorted(before["tokens_per_expert"]) == [0, 2]
    assert after["tokens_per_expert"] == before["tokens_per_expert"]
    assert len(after["step_imbalance"]) == len(before["step_imbalance"])


def test_copies_of_a_hot_expert_share_its_rows():
    # top-2 routing where expert 0 is every token's first choice and has 2 copies
    experts = torch.tensor([0, 1, 0, 2, 0, 3, 0, 1, 0, 2, 0, 3])
    copy_count = torch.tensor([2, 1, 1, 1])
    for rank in (0, 1):
        copies = choose_copies(experts, copy_count, rank)
        assert torch.bincount(copies[experts == 0], minlength=2).tolist() == [3, 3]
        assert copies[experts != 0].eq(0).all()
    # one row per rank (decode at batch 1): the two ranks use different copies
    assert choose_copies(torch.tensor([0]), copy_count, 0) != choose_copies(torch.tensor([0]), copy_count, 1)


# -- placement arithmetic ----------------------------------------------------------------------------

def test_round_robin_and_uneven_counts():
    assert round_robin(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [len(r) for r in round_robin(6, 4)] == [2, 2, 1, 1]


def test_balanced_beats_round_robin_on_skew():
    load = [100, 1, 1, 1, 90, 1, 1, 1]  # round robin puts both hot experts on rank 0
    rr, bal = round_robin(8, 4), balanced(load, 4)
    assert max(rank_loads(rr, load)) == 190
    assert max(rank_loads(bal, load)) == 101  # the hot expert plus one cold one
    assert sorted(e for r in bal for e in r) == list(range(8))
    # two redundant copies split the two hot experts: no rank carries more than half of one
    red = balanced(load, 4, redundant=2)
    assert sorted(e for r in red for e in r) == [0, 0, 1, 2, 3, 4, 4, 5, 6, 7]
    assert all(len(set(r)) == len(r) for r in red)  # never two copies on one rank
    assert max(rank_loads(red, load)) < 60


def test_placement_errors(tmp_path):
    cfg = preset("tiny-mixtral")
    with pytest.raises(ConfigError, match="balanced' needs a measured load"):
        plan_placement(cfg, 2, "balanced")
    with pytest.raises(ConfigError, match="unknown; use one of round_robin, balanced"):
        plan_placement(cfg, 2, "hot-first")
    with pytest.raises(ConfigError, match="at most 2 copies"):
        balanced([1.0] * 8, 2, redundant=9)
    with pytest.raises(ConfigError, match="does not exist"):
        plan_placement(cfg, 2, "balanced", str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tokens_per_expert": {"0": [1, 2]}}))
    with pytest.raises(ConfigError, match="layer 0 must list 8 non-negative counts"):
        plan_placement(cfg, 2, "balanced", str(bad))
    for key in ("7", "01", "x"):
        bad.write_text(json.dumps({"tokens_per_expert": {key: [1] * 8}}))
        with pytest.raises(ConfigError, match=f"layer '{key}' is not an MoE layer"):
            plan_placement(cfg, 2, "balanced", str(bad))
    bad.write_text(json.dumps({"tokens_per_expert": {"0": [True] * 8}}))
    with pytest.raises(ConfigError, match="non-negative counts"):
        plan_placement(cfg, 2, "balanced", str(bad))


def test_moe_config_errors(tiny_models):
    with pytest.raises(ConfigError, match="sliding_window=4 is not supported"):
        ModelConfig.from_hf({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_local_experts": 2,
                             "num_experts_per_tok": 1, "sliding_window": 4, "max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 must be in \\[1, num_experts=8\\]"):
        ModelConfig.from_dict({**preset("tiny-mixtral").to_dict(), "num_experts_per_tok": 9}).validate()
    with pytest.raises(ConfigError, match="dense: drop enable_expert_parallel"):
        LLM("random:tiny-llama", tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ConfigError, match="add enable_expert_parallel"):
        LLM("random:tiny-mixtral", tensor_parallel_size=2, expert_placement="balanced")
    with pytest.raises(ConfigError, match="dense model: it has no experts"):
        with LLM("random:tiny-llama") as llm:
            llm.engine.expert_stats()


def test_moe_presets_run():
    """The random MoE presets build at their tiny shapes; real shapes are checked by the planner tests."""
    with LLM("random:tiny-qwen2-moe", tensor_parallel_size=2, enable_expert_parallel=True) as llm:
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4


def test_count_is_bincount_without_the_host_read():
    """The dispatch counts rows per expert / rank with scatter_add (CUDA's bincount waits for the GPU to size
    its output); the counts are bincount's, zeros included."""
    torch.manual_seed(0)
    for n in (1, 7, 64):
        values = torch.randint(0, n, (300,))
        assert torch.equal(count(values, n), torch.bincount(values, minlength=n))
    assert count(torch.tensor([], dtype=torch.long), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("layout", ["tp1", "ep2"])
def test_padded_decode_steps_route_only_real_tokens(layout, tiny_models, hf_refs, monkeypatch):
    """MoE decode steps on the graphs' padded path (run eagerly on the CPU; 3 sequences in a graph of 4): the
    padding rows go to no expert and count in no statistic; tokens and logits stay Hugging Face's."""
    monkeypatch.setenv("SHARDLM_PADDED_DECODE_ON_CPU", "1")
    name, prompts = "qwen2-moe", PROMPTS[:3]
    with LLM(str(tiny_models[name][0]), block_size=8, **LAYOUTS[layout]) as llm:
        check_against_hf(llm, hf_refs[name][:3], prompts)
        cfg = llm.engine.source.config
        routed = sum(len(p) + STEPS - 1 for p in prompts) * cfg.num_experts_per_tok
        stats = llm.engine.expert_stats()
        assert all(sum(c) == routed for c in stats["tokens_per_expert"].values())
        assert all(0 < s["graph_steps"] < s["steps"] for s in llm.engine.stage_stats().values())
