"""The OpenAI-compatible server, driven by the official `openai` client (CPU, gloo)."""

import asyncio
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import worker_pids
from prometheus_client.parser import text_string_to_metric_families

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # the log goes to a file: a pipe nobody reads fills up (64 KiB) and then blocks the server's every write
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "shardlm.entrypoints.cli", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-4000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def metrics(base: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name") + "}"
                            if len(s.labels) > 1 else "")
            out[key] = s.value
    return out


# 24 blocks of 16 tokens per rank: far too few for 64 requests at once, so the server must preempt
SMALL_KV = str(24 * 30 * 2 * 2 * 64 * 4 * 16)


@pytest.fixture(scope="module")
def smol():
    before = worker_pids()
    proc, base = start_server("smollm2-135m", "--tensor-parallel-size", "2", "--api-key", KEY,
                              "--max-model-len", "256", "--kv-cache-memory-bytes", SMALL_KV)
    yield base
    assert stop_server(proc) == 0  # SIGTERM: finish cleanly, exit 0
    time.sleep(0.5)
    assert worker_pids() <= before  # and leave no worker behind


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_completions_and_chat_streaming_and_not(smol):
    c = client(smol)
    assert [m.id for m in c.models.list().data] == ["smollm2-135m"]
    out = c.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8,
                               temperature=0, logprobs=2)
    text = out.choices[0].text
    assert text and out.usage.completion_tokens == len(out.choices[0].logprobs.tokens) <= 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == text
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    chat = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=12, temperature=0)
    assert "4" in chat.choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smollm2-135m", messages=msgs, max_tokens=12, temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == chat.choices[0].message.content
    many = c.completions.create(model="smollm2-135m", prompt=["The capital of France is", "Hi"], max_tokens=8,
                                temperature=0)
    assert [ch.index for ch in many.choices] == [0, 1] and many.choices[0].text == text
    two = c.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=6, n=2,
                               temperature=1.0, seed=7, stop=["\n"])
    assert sorted(ch.index for ch in two.choices) == [0, 1]


def test_sampling_knobs_through_the_openai_client(smol):
    """vLLM's sampling fields on both endpoints: logit_bias forces a token, the penalties and min_p are taken,
    best_of returns n completions, echo puts the prompt first (streamed or not)"""
    c = client(smol)
    tok = c.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=1, temperature=0, logprobs=0)
    forced_id = 28  # a token unlikely after "Hi": the bias alone picks it
    forced = c.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=3, temperature=0,
                                  logit_bias={str(forced_id): 100})
    assert forced.usage.completion_tokens == 3 and forced.choices[0].text != tok.choices[0].text
    chat = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Count: 1 1 1 1"}],
                                     max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=1.0,
                                     extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 4})
    assert chat.usage.completion_tokens >= 4
    best = c.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=5, n=2, best_of=3,
                                temperature=1.0, seed=3)
    assert sorted(ch.index for ch in best.choices) == [0, 1]
    echo = c.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                temperature=0, echo=True)
    assert echo.choices[0].text.startswith("The capital of France is")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == echo.choices[0].text


def test_prompt_logprobs_and_echo_with_logprobs(smol):
    """echo + logprobs (what lm-eval's loglikelihood asks): the prompt's tokens come first with their
    log-probabilities (none for the first), then the completion's, streamed or not; vLLM's prompt_logprobs
    field on both endpoints. The engine's values are checked against Hugging Face in test_sampling_knobs."""
    c = client(smol)
    prompt = "The capital of France is"
    out = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                               logprobs=2)
    lp, n_prompt = out.choices[0].logprobs, out.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and "".join(lp.tokens[:n_prompt]).replace("Ġ", " ") == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(2 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # streamed: the prompt's event first, with its log-probabilities
    chunks = list(c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                       logprobs=2, stream=True))
    assert chunks[0].choices[0].text == prompt
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[:n_prompt]
    assert "".join(ch.choices[0].text for ch in chunks) == out.choices[0].text
    # vLLM's prompt_logprobs: per prompt token {id: {logprob, rank, decoded_token}}, first None
    body = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=1,
                                extra_body={"prompt_logprobs": 1}).model_dump()
    plp = body["choices"][0]["prompt_logprobs"]
    assert len(plp) == n_prompt and plp[0] is None
    # each entry: the prompt's token (any rank) and the most likely one (rank 1), the same as echo's
    top = [next(v["logprob"] for v in e.values() if v["rank"] == 1) for e in plp[1:]]
    assert top == pytest.approx([max(t.values()) for t in lp.top_logprobs[1:n_prompt]], abs=1e-4)
    chat = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=1, extra_body={"prompt_logprobs": 0}).model_dump()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    streamed = [ch.model_dump() for ch in c.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, stream=True,
        extra_body={"prompt_logprobs": 0})]
    assert [ch["prompt_logprobs"] for ch in streamed if "prompt_logprobs" in ch] == [chat["prompt_logprobs"]]


def test_structured_outputs_through_the_openai_client(smol):
    """response_format json_schema / json_object and vLLM's structured_outputs (choice, regex) on SmolLM2:
    the answers validate (jsonschema), streamed or not; a schema the engine cannot compile is a 400"""
    import json

    import jsonschema

    c = client(smol)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Give the largest city of France and its population as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    out = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=60, temperature=0,
                                    response_format=fmt)
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smollm2-135m", messages=msgs, max_tokens=60, temperature=0, response_format=fmt, stream=True)
        if ch.choices)
    assert streamed == out.choices[0].message.content
    obj = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=60, temperature=0,
                                    response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    pick = c.completions.create(model="smollm2-135m", prompt="The sky is", max_tokens=5, temperature=0,
                                extra_body={"structured_outputs": {"choice": ["blue", "green"]}})
    assert pick.choices[0].text in ("blue", "green")
    code = c.completions.create(model="smollm2-135m", prompt="A zip code:", max_tokens=8, temperature=0.7, seed=1,
                                extra_body={"structured_outputs": {"regex": "[0-9]{5}"}})
    assert re.fullmatch(r"[0-9]{5}", code.choices[0].text)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="smollm2-135m", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert info.value.body["param"] == "response_format" and "cannot be compiled" in info.value.body["message"]


def test_tool_calls_through_the_openai_client(smol):
    """a forced named call and tool_choice required give calls whose arguments validate (streamed or not), and
    the call and its tool answer go back through the chat template"""
    import json

    import jsonschema

    c = client(smol)
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
              "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": params}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = c.chat.completions.create(model="smollm2-135m", messages=msgs, tools=tools, tool_choice=named,
                                    max_tokens=40, temperature=0)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and out.choices[0].finish_reason == "stop"  # forced by name
    jsonschema.validate(json.loads(call.function.arguments), params)
    args = "".join(tc.function.arguments or "" for ch in c.chat.completions.create(
        model="smollm2-135m", messages=msgs, tools=tools, tool_choice=named, max_tokens=40, temperature=0,
        stream=True) if ch.choices and ch.choices[0].delta.tool_calls for tc in ch.choices[0].delta.tool_calls)
    assert args == call.function.arguments
    req = c.chat.completions.create(model="smollm2-135m", messages=msgs, tools=tools, tool_choice="required",
                                    max_tokens=60, temperature=0)
    assert req.choices[0].message.tool_calls and all(
        t.function.name == "get_weather" for t in req.choices[0].message.tool_calls)
    back = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = c.chat.completions.create(model="smollm2-135m", messages=back, tools=tools, tool_choice="none",
                                       max_tokens=20, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_the_openai_client_script_passes(smol):
    """scripts/openai_client_check.py (what the README points vLLM users to) against the server"""
    script = Path(__file__).parent.parent / "scripts" / "openai_client_check.py"
    r = subprocess.run([sys.executable, str(script), "--base-url", smol, "--api-key", KEY], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "FAIL" not in r.stdout and r.stdout.count("ok  ") == 7, r.stdout + r.stderr


VLLM_METRICS = [  # vLLM v1's names (vllm: prefix) that dashboards and autoscalers read
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
    "generation_tokens_total", "request_success_total", "num_preemptions_total", "prefix_cache_queries_total",
    "prefix_cache_hits_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
    "time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
    "request_prefill_time_seconds_bucket", "request_decode_time_seconds_bucket",
    "request_inference_time_seconds_bucket", "request_prompt_tokens_bucket", "request_generation_tokens_bucket"]


def test_metrics_carry_vllms_names(smol):
    """every vLLM metric a dashboard reads is there as shardlm:<the same name>, and moves with traffic"""
    c = client(smol)
    c.completions.create(model="smollm2-135m", prompt="Count to five:", max_tokens=6, temperature=0,
                         extra_body={"ignore_eos": True})
    text = httpx.get(smol + "/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("shardlm:")}
    missing = [n for n in VLLM_METRICS if f"shardlm:{n}" not in names]
    assert not missing, missing
    m = metrics(smol)
    assert m["shardlm:request_success_total{finished_reason=length}"] >= 1
    assert m["shardlm:inter_token_latency_seconds_count"] >= 5 and m["shardlm:request_queue_time_seconds_count"] >= 1
    assert m["shardlm:request_generation_tokens_sum"] >= 6


def test_64_concurrent_requests_equal_alone_and_preempt(smol):
    prompts = [f"Write {i} words about the number {i * 7}." + " Please be brief." * (i % 5) for i in range(16)]
    c = client(smol)
    alone = [c.completions.create(model="smollm2-135m", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts]
    before = metrics(smol)

    async def together():
        ac = openai.AsyncOpenAI(base_url=smol + "/v1", api_key=KEY, max_retries=0, timeout=600)
        reqs = [ac.completions.create(model="smollm2-135m", prompt=prompts[i % 16], max_tokens=12, temperature=0)
                for i in range(64)]
        return await asyncio.gather(*reqs)

    outs = asyncio.run(together())
    assert [o.choices[0].text for o in outs] == [alone[i % 16] for i in range(64)]
    after = metrics(smol)
    assert after["shardlm:num_preemptions_total"] > before["shardlm:num_preemptions_total"]
    assert after["shardlm:time_to_first_token_seconds_count"] >= before["shardlm:time_to_first_token_seconds_count"] + 64


def test_bad_input_gets_4xx_and_server_stays_up(smol):
    c = client(smol)
    cases = [
        (dict(model="nope", prompt="x"), openai.NotFoundError, "model"),
        (dict(model="smollm2-135m", prompt="x", max_tokens=-1), openai.BadRequestError, "max_tokens"),
        (dict(model="smollm2-135m", prompt="x", max_tokens=10**9), openai.BadRequestError, "max_tokens"),
        (dict(model="smollm2-135m", prompt="x", n=0), openai.BadRequestError, "n"),
        (dict(model="smollm2-135m", prompt="x", temperature=-1), openai.BadRequestError, "temperature"),
        (dict(model="smollm2-135m", prompt="x", top_p=1.5), openai.BadRequestError, "top_p"),
        (dict(model="smollm2-135m", prompt="word " * 400), openai.BadRequestError, "prompt"),
        (dict(model="smollm2-135m", prompt="x", presence_penalty=3), openai.BadRequestError, "presence_penalty"),
        (dict(model="smollm2-135m", prompt="x", logit_bias={"999999": 5}), openai.BadRequestError, "logit_bias"),
        (dict(model="smollm2-135m", prompt="x", logit_bias={"12": 500}), openai.BadRequestError, "logit_bias"),
        (dict(model="smollm2-135m", prompt="x", suffix="y"), openai.BadRequestError, "suffix"),
        (dict(model="smollm2-135m", prompt="x", extra_body={"guided_regex": "a+"}), openai.BadRequestError,
         "guided_regex"),
        (dict(model="smollm2-135m", prompt="x", extra_body={"prompt_logprobs": 21}), openai.BadRequestError,
         "prompt_logprobs"),
        (dict(model="smollm2-135m", prompt="x", extra_body={"prompt_logprobs": -1}), openai.BadRequestError,
         "prompt_logprobs"),
        (dict(model="smollm2-135m", prompt="x", echo=True, logprobs=21), openai.BadRequestError, "logprobs"),
        (dict(model="smollm2-135m", prompt="x", n=2, best_of=1), openai.BadRequestError, "best_of"),
        (dict(model="smollm2-135m", prompt="x", best_of=2, stream=True), openai.BadRequestError, "best_of"),
        (dict(model="smollm2-135m", prompt="x", extra_body={"min_tokens": 50, "max_tokens": 5}),
         openai.BadRequestError, "min_tokens"),
    ]
    for kwargs, err, param in cases:
        with pytest.raises(err) as info:
            c.completions.create(**kwargs)
        assert info.value.body["param"] == param, info.value.body
    with pytest.raises(openai.AuthenticationError):
        client(smol, key="wrong").models.list()
    r = httpx.post(smol + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                            "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(smol + "/health").status_code == 200
    assert c.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_disconnect_aborts_and_frees(smol):
    with httpx.stream("POST", smol + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "smollm2-135m", "prompt": "Count to one hundred:", "max_tokens": 200,
                            "stream": True, "ignore_eos": True}, timeout=60) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(smol)
        if m["shardlm:num_requests_running{replica=0}"] == 0 and m["shardlm:kv_cache_usage_perc{replica=0}"] == 0:
            return
        httpx.post(smol + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "smollm2-135m", "prompt": "x", "max_tokens": 1})  # a step refreshes the gauges
        time.sleep(0.5)
    raise AssertionError(f"aborted request still holds resources: {m}")


def test_bench_serve_reports_percentiles(tmp_path):
    proc, base = start_server("random:tiny-llama", "--tensor-parallel-size", "2")
    try:
        out, png = tmp_path / "serve.json", tmp_path / "serve.png"
        res = subprocess.run([sys.executable, "-m", "shardlm.entrypoints.cli", "bench", "serve", "--base-url", base, "--model",
                              "random:tiny-llama", "--request-rate", "20", "--max-concurrency", "3", "--num-prompts", "12", "--input-len", "16",
                              "--output-len", "8", "--vocab-size", "512", "--json", str(out), "--plot", str(png)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        import json

        data = json.loads(out.read_text())
        assert data["completed"] == 12 and data["failed"] == 0
        assert all(data[k]["p50"] <= data[k]["p90"] <= data[k]["p99"] for k in ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"))
        assert data["max_concurrency"] == 3 and data["itl_ms"]["p50"] > 0
        assert data["ttft_ms"]["p50"] > 0 and data["output_tok_per_s"] > 0
        # lengths are drawn in [4, 12) around 8: usage counts what the server generated
        assert all(4 <= r["tokens"] <= 12 for r in data["per_request"])
        # what plan --validate replays: when each request went out, and the engine that served them (/engine)
        assert all(r["sent_s"] >= 0 for r in data["per_request"])
        engine = data["engine"]
        assert (engine["model"], engine["tensor_parallel_size"], engine["data_parallel_size"]) == ("random:tiny-llama", 2, 1)
        assert engine["max_num_batched_tokens"] == 1024 and engine["max_num_seqs"] >= 1
        # the run's prompt tokens the server looked up in its prefix cache (its /metrics, before and after)
        assert data["prefix_cache"]["query_tokens"] >= 0.9 * sum(r["prompt"] for r in data["per_request"])
        assert 0 <= data["prefix_cache"]["hit_tokens"] <= data["prefix_cache"]["query_tokens"]
        # the engine's own mean TTFT, queueing and prefill over the run (the server's request histograms)
        eng = data["engine_ms"]
        assert 0 < eng["ttft_mean"] <= data["ttft_ms"]["mean"] and eng["queue_mean"] + eng["prefill_mean"] > 0
        assert png.read_bytes()[:4] == b"\x89PNG"
    finally:
        assert stop_server(proc) == 0


def test_data_parallel_spreads_load_and_503_when_full():
    proc, base = start_server("random:tiny-llama", "--data-parallel-size", "2", "--max-waiting-requests", "6")
    try:
        async def burst(n: int, max_tokens: int):
            async with httpx.AsyncClient(timeout=120) as ac:
                return await asyncio.gather(*[ac.post(base + "/v1/completions", json={
                    "model": "random:tiny-llama", "prompt": f"hello {i}", "max_tokens": max_tokens,
                    "ignore_eos": True}) for i in range(n)])

        ok = asyncio.run(burst(6, 8))
        assert all(r.status_code == 200 for r in ok)
        m = metrics(base)
        assert m["shardlm:replica_requests_routed{replica=0}"] >= 2
        assert m["shardlm:replica_requests_routed{replica=1}"] >= 2
        flood = asyncio.run(burst(40, 64))
        rejected = [r for r in flood if r.status_code == 503]
        assert rejected and all(r.headers.get("retry-after") for r in rejected)
        assert all(r.status_code in (200, 503) for r in flood)
        assert httpx.get(base + "/health").status_code == 200
        # a random model answers a json_schema request with valid JSON: the mask alone does it
        import json

        import jsonschema

        schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id", "ok"], "additionalProperties": False}
        time.sleep(1)  # (the flood's 503s clear)
        out = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=2).chat.completions.create(
            model="random:tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=100,
            temperature=1.0, seed=3, response_format={"type": "json_schema", "json_schema": {"name": "r",
                                                                                            "schema": schema}})
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    finally:
        assert stop_server(proc) == 0


def test_moe_routing_on_metrics():
    """An expert-parallel MoE server exports tokens per expert and the step imbalance."""
    proc, base = start_server("random:tiny-qwen2-moe", "-tp", "2", "--enable-expert-parallel")
    try:
        body = {"model": "random:tiny-qwen2-moe", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        time.sleep(5.5)  # routing is read from the workers every 5 s, after a step
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        m = metrics(base)
    finally:
        assert stop_server(proc) == 0
    routed = {k: v for k, v in m.items() if k.startswith("shardlm:moe_routed_tokens_total")}
    assert routed and sum(routed.values()) > 0
    assert any(k.startswith("shardlm:moe_routed_tokens_total{expert=") and "layer=2" in k for k in routed)
    assert m["shardlm:moe_step_imbalance{replica=0}"] >= 1.0
