"""Pipeline parallelism (and TP x PP) against Hugging Face on the same weights (CPU, gloo, float32)."""

import pytest
from hf_models import PROMPTS, check_against_hf

from shardlm import LLM
from shardlm.common.layout import LayoutError


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_pp_matches_hf(pp, tiny_models, hf_refs):
    folder, _ = tiny_models["llama-deep-tied"]
    with LLM(str(folder), pipeline_parallel_size=pp, block_size=8) as llm:
        assert len(llm.engine.stage_layers) == pp
        check_against_hf(llm, hf_refs["llama-deep-tied"])


@pytest.mark.parametrize("name", ["llama-deep-tied", "qwen2-bias-untied"])
def test_tp2_x_pp2_matches_hf(name, tiny_models, hf_refs):
    folder, _ = tiny_models[name]
    with LLM(str(folder), tensor_parallel_size=2, pipeline_parallel_size=2, block_size=8) as llm:
        check_against_hf(llm, hf_refs[name])


def test_user_layer_split(tiny_models, hf_refs):
    folder, _ = tiny_models["llama-deep-tied"]
    with LLM(str(folder), pipeline_parallel_size=2, pp_layer_split=[1, 4], block_size=8) as llm:
        assert llm.engine.stage_layers == [(0, 1), (1, 5)]
        check_against_hf(llm, hf_refs["llama-deep-tied"])


def test_bad_pipeline_settings_fail_before_loading(tiny_models):
    folder, _ = tiny_models["llama-deep-tied"]
    for kwargs, msg in [(dict(pipeline_parallel_size=6), "exceeds the model's 5 layers"),
                        (dict(pipeline_parallel_size=2, pp_layer_split=[2, 2]), "sums to 4, the model has 5"),
                        (dict(pipeline_parallel_size=2, pp_layer_split=[0, 5]), "leaves a stage without layers"),
                        (dict(pipeline_parallel_size=3, pp_layer_split=[2, 3]), "names 2 stages"),
                        (dict(pipeline_parallel_size=4, tensor_parallel_size=4), "needs 16 CPU worker processes")]:
        with pytest.raises(LayoutError, match=msg):
            LLM(str(folder), **kwargs)


PROMPT_SET = [[5 + i, 6, 7 + 2 * i] * (1 + i % 3) for i in range(8)]


def mean_idle(llm: LLM) -> float:
    stats = llm.engine.stage_stats()
    return sum(s["idle_fraction"] for s in stats.values()) / len(stats)


def test_micro_batches_in_flight_shrink_the_bubble():
    """Engine's own step accounting: with 2 stages, 2 micro-batches in flight idle less than 1.

    Compute-heavy prompts (16 x 96 tokens through 16 layers of width 256) so that the stages' work,
    not the driver's per-step overhead, fills the window."""
    from shardlm import SamplingParams

    prompts = [{"prompt_token_ids": [3 + (7 * i + j) % 1000 for j in range(96)]} for i in range(16)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    idle, tokens = {}, {}
    for depth in (1, 2):
        with LLM("random:probe-tiny", pipeline_parallel_size=2, max_batches_in_flight=depth,
                 max_num_batched_tokens=4096) as llm:
            llm.generate(prompts[:2], params)  # warm-up
            llm.engine.stage_stats(reset=True)
            outs = llm.generate(prompts, params)
            tokens[depth] = [o.outputs[0].token_ids for o in outs]
            idle[depth] = mean_idle(llm)
    assert tokens[1] == tokens[2]  # same tokens either way
    assert idle[2] < idle[1] - 0.05, idle


def test_trace_has_a_track_per_rank(tiny_models, tmp_path):
    import json

    from shardlm import SamplingParams

    folder, _ = tiny_models["llama-deep-tied"]
    path = tmp_path / "trace.json"
    with LLM(str(folder), tensor_parallel_size=2, pipeline_parallel_size=2, trace=str(path)) as llm:
        llm.generate([{"prompt_token_ids": p} for p in PROMPT_SET[:4]], SamplingParams(max_tokens=6))
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2, 3}
    for rank in range(4):
        cats = {e["cat"] for e in spans if e["pid"] == rank}
        assert "compute" in cats and "idle" in cats
    assert any(e["cat"] == "communication" for e in spans if e["pid"] in (2, 3))  # stage 1 receives
    assert all(e["dur"] >= 0 for e in spans)
    assert set(trace["otherData"]["idle_fraction"]) == {"0", "1", "2", "3"}


def test_long_prompt_chunks_overlap_in_the_pipeline(tiny_models, hf_refs):
    """One long prompt alone: its chunks follow each other through the stages (two in flight at once)."""
    folder, _ = tiny_models["llama-deep-tied"]
    with LLM(str(folder), pipeline_parallel_size=2, max_num_batched_tokens=8, block_size=8) as llm:
        engine, overlapped = llm.engine, []
        submit = engine.executor.submit

        def watching_submit(plan):
            busy = {item.seq.seq_id for batch in engine.in_flight for item in batch}
            overlapped.extend(s.seq_id for s in plan.seqs if s.seq_id in busy)
            submit(plan)

        engine.executor.submit = watching_submit
        check_against_hf(llm, hf_refs["llama-deep-tied"][1:2], PROMPTS[1:2])
        assert overlapped, "no prompt chunk was submitted while the previous one was in the pipeline"
