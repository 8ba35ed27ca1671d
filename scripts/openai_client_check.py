"""What a vLLM user's client does on day one, against a running `shardlm serve` (CPU is fine):

    python scripts/openai_client_check.py --base-url http://127.0.0.1:8000 --model smollm2-135m [--api-key K]

json_schema answers that validate, a forced tool call (streamed and not), penalties and logit_bias, min_p and
min_tokens through extra_body, echo with logprobs (scoring a prompt), /tokenize and /detokenize, and vLLM's metric names (shardlm: prefix) on
/metrics. One line per check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx
import jsonschema
import openai

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "country": {"type": "string", "maxLength": 30}},
          "required": ["city", "country"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 30}},
                                               "required": ["city"], "additionalProperties": False}}}]
METRICS = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "generation_tokens_total",
           "request_success_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
           "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket"]


def checks(c: openai.OpenAI, base: str, model: str, headers: dict) -> list[tuple[str, bool, str]]:
    out = []
    msgs = [{"role": "user", "content": "Name a large city and its country, as JSON."}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}})
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    out.append(("json_schema", True, text))

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice=named, max_tokens=40,
                                  temperature=0)
    call = r.choices[0].message.tool_calls[0]
    out.append(("tool call", call.function.name == "get_weather" and "city" in json.loads(call.function.arguments),
                call.function.arguments))
    streamed = "".join(tc.function.arguments or "" for ch in c.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, tool_choice=named, max_tokens=40, temperature=0, stream=True)
        if ch.choices and ch.choices[0].delta.tool_calls for tc in ch.choices[0].delta.tool_calls)
    out.append(("tool call, streamed", streamed == call.function.arguments, streamed))

    r = c.completions.create(model=model, prompt="One, two, one, two,", max_tokens=12, temperature=0,
                             frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"28": -100},
                             extra_body={"repetition_penalty": 1.2, "min_p": 0.05, "min_tokens": 3})
    ids = httpx.post(f"{base}/tokenize", json={"prompt": r.choices[0].text}, headers=headers).json()["tokens"]
    out.append(("penalties, logit_bias, min_p, min_tokens", r.usage.completion_tokens >= 3 and 28 not in ids,
                r.choices[0].text))
    r = c.completions.create(model=model, prompt="The capital of France is Paris", max_tokens=1, temperature=0,
                             echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    scored = len(lp.token_logprobs) == r.usage.prompt_tokens + 1 and lp.token_logprobs[0] is None
    out.append(("echo + logprobs (a prompt's log-likelihood)", scored,
                f"sum {sum(lp.token_logprobs[1:r.usage.prompt_tokens]):.2f} over the prompt"))
    tok = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world"}, headers=headers).json()
    back = httpx.post(f"{base}/detokenize", json={"tokens": tok["tokens"]}, headers=headers).json()["prompt"]
    out.append(("/tokenize, /detokenize", tok["count"] == len(tok["tokens"]) and "Hello world" in back,
                f"{tok['count']} tokens"))
    text = httpx.get(f"{base}/metrics", headers=headers).text
    missing = [m for m in METRICS if f"shardlm:{m}" not in text]
    out.append(("vLLM metric names (shardlm: prefix)", not missing, f"missing {missing}" if missing else "all there"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--model", default="smollm2-135m", help="the model name it serves")
    p.add_argument("--api-key", default="none", help="its API key, if it takes one")
    args = p.parse_args()
    c = openai.OpenAI(base_url=args.base_url + "/v1", api_key=args.api_key, max_retries=0)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    ok = True
    for name, passed, detail in checks(c, args.base_url, args.model, headers):
        ok &= passed
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail[:120]!r}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
