"""Pipeline parallelism (and TP x PP) against Hugging Face on the same weights (CPU, gloo, float32)."""

import pytest

from hf_models import hf_greedy
from shardlm import LLM
from shardlm.layout import LayoutError
from test_tp_parity import PROMPTS, STEPS, check_against_hf


@pytest.fixture(scope="module")
def refs(tiny_models):
    return {name: [hf_greedy(tiny_models[name][1], p, STEPS) for p in PROMPTS]
            for name in ("llama-deep-tied", "qwen2-bias-untied")}


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_pp_matches_hf(pp, tiny_models, refs):
    folder, _ = tiny_models["llama-deep-tied"]
    with LLM(str(folder), pipeline_parallel_size=pp, block_size=8) as llm:
        assert len(llm.engine.stage_layers) == pp
        check_against_hf(llm, refs["llama-deep-tied"])


@pytest.mark.parametrize("name", ["llama-deep-tied", "qwen2-bias-untied"])
def test_tp2_x_pp2_matches_hf(name, tiny_models, refs):
    folder, _ = tiny_models[name]
    with LLM(str(folder), tensor_parallel_size=2, pipeline_parallel_size=2, block_size=8) as llm:
        check_against_hf(llm, refs[name])


def test_user_layer_split(tiny_models, refs):
    folder, _ = tiny_models["llama-deep-tied"]
    with LLM(str(folder), pipeline_parallel_size=2, pp_layer_split=[1, 4], block_size=8) as llm:
        assert llm.engine.stage_layers == [(0, 1), (1, 5)]
        check_against_hf(llm, refs["llama-deep-tied"])


def test_bad_pipeline_settings_fail_before_loading(tiny_models):
    folder, _ = tiny_models["llama-deep-tied"]
    for kwargs, msg in [(dict(pipeline_parallel_size=6), "exceeds the model's 5 layers"),
                        (dict(pipeline_parallel_size=2, pp_layer_split=[2, 2]), "sums to 4, the model has 5"),
                        (dict(pipeline_parallel_size=2, pp_layer_split=[0, 5]), "leaves a stage without layers"),
                        (dict(pipeline_parallel_size=3, pp_layer_split=[2, 3]), "names 2 stages"),
                        (dict(pipeline_parallel_size=4, tensor_parallel_size=4), "needs 16 CPU worker processes")]:
        with pytest.raises(LayoutError, match=msg):
            LLM(str(folder), **kwargs)
