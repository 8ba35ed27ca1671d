"""Structured outputs (engine/structured.py): on a tiny random model the mask alone must force the output
into the schema / regex / choice / grammar, at TP 1 and 2, greedy and sampled, beside unconstrained
requests in the same steps. (Each constraint bounds the output's length: a random model would fill an
unbounded string until max_tokens; json_object is tested on SmolLM2 through the server.)"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from shardlm import LLM, SamplingParams
from shardlm.engine.sampling_params import SamplingError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("layout", [dict(), dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_the_mask_alone_makes_a_random_model_follow_the_constraint(layout):
    prompts = ["x", "a longer prompt"]
    cases = [({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) or pytest.fail(t)),
             ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue") or pytest.fail(t)),
             ({"grammar": 'start: "yes" | "no" " " NUMBER\nNUMBER: /[0-9]{1,3}/'},
              lambda t: re.fullmatch(r"yes|no [0-9]{1,3}", t) or pytest.fail(t))]
    with LLM("random:tiny-llama", **layout) as llm:
        for spec, check in cases:
            for temperature in (0.0, 1.0):
                params = SamplingParams(max_tokens=200, temperature=temperature, seed=5, structured_outputs=spec)
                plain = SamplingParams(max_tokens=20, temperature=temperature, seed=5)
                outs = llm.generate(prompts + prompts, [params, params, plain, plain])
                for out in outs[:2]:
                    c = out.outputs[0]
                    assert c.finish_reason == "stop", (spec, c.text, c.finish_reason)
                    check(c.text)


def test_a_constraint_that_does_not_compile_is_refused_with_the_reason():
    with LLM("random:tiny-llama") as llm:
        for spec, says in (({"regex": "(unclosed"}, "unclosed group"),
                           ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "nonsense"),
                           ({"grammar": "start: undefined_rule"}, "undefined_rule")):
            with pytest.raises(SamplingError, match=says) as info:
                llm.generate(["x"], SamplingParams(structured_outputs=spec))
            assert info.value.field == "structured_outputs"


def test_min_tokens_gives_way_to_a_grammar_that_must_end():
    """a grammar that allows nothing but EOS now (choice [""]) with min_tokens: the ban on EOS is lifted for
    that pick (else no token is left and token 0 would come out)"""
    with LLM("random:tiny-llama") as llm:
        (out,) = llm.generate(["x"], SamplingParams(max_tokens=5, temperature=0, min_tokens=3,
                                                    structured_outputs={"choice": [""]}))
    c = out.outputs[0]
    assert c.text == "" and c.finish_reason == "stop" and 0 not in c.token_ids


@pytest.mark.parametrize("tp", [1, 2])
def test_masks_that_follow_the_plan_give_the_tokens_of_the_synchronous_engine(tp):
    """Async scheduling plans a constrained sequence's next step before its token is back; the plan says its
    masks follow (StepPlan.masks_follow) and the driver sends them (StepMasks) once the token is in, while
    the step's forward runs. Every decode step of the constrained requests went that way, and the tokens
    are those of the engine without async scheduling (greedy and seeded), beside unconstrained requests."""
    spec = {"regex": r"[0-9]{6}-[a-z]{4}"}
    prompts = ["x", "a longer prompt", "x"]
    params = [SamplingParams(max_tokens=40, temperature=t, seed=3, structured_outputs=spec) for t in (0.0, 1.0)]
    params.append(SamplingParams(max_tokens=30, temperature=1.0, seed=4))
    tokens = {}
    for async_scheduling in (False, True):
        with LLM("random:tiny-llama", tensor_parallel_size=tp, async_scheduling=async_scheduling) as llm:
            ex, sent = llm.engine.executor, {"follow": 0, "masks": 0}
            submit, send_masks = ex.submit, ex.send_masks

            def counting_submit(plan, submit=submit):
                sent["follow"] += plan.masks_follow
                submit(plan)

            def counting_send(masks, send_masks=send_masks):
                sent["masks"] += 1
                send_masks(masks)

            ex.submit, ex.send_masks = counting_submit, counting_send
            outs = llm.generate(prompts, params)
        for out in outs[:2]:
            assert re.fullmatch(r"[0-9]{6}-[a-z]{4}", out.outputs[0].text), out.outputs[0].text
        tokens[async_scheduling] = [o.outputs[0].token_ids for o in outs]
        steps = max(len(t) for t in tokens[async_scheduling][:2])
        if async_scheduling:
            assert sent["masks"] == sent["follow"] and sent["follow"] >= steps - 2, (sent, steps)
        else:
            assert sent == {"follow": 0, "masks": 0}
    assert tokens[True] == tokens[False]
