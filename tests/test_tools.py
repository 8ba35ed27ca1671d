"""Tool calls (server/tools.py): the parsers on the text of the common templates, tool_choice checked and
turned into a grammar, and the chat endpoint's answers and streamed deltas, with a scripted engine (the
server end to end, on a real model, is in tests/test_server.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_server_hygiene import MODEL, ScriptedEngine, call, events

from shardlm.engine.sequence import CompletionOutput, Logprob, RequestOutput
from shardlm.server.api import build_app
from shardlm.server.protocol import APIError
from shardlm.server.tools import HermesParser, Llama3JsonParser, parser, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_hermes_parser():
    p = HermesParser()
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = p.extract(text)
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert p.extract("no call here") == ("no call here", [])
    assert p.holds("Sure <tool_c") == len("Sure ") and p.holds("plain") == 5 and p.holds("a <tool_call>{") == 2


def test_llama3_json_parser():
    p = Llama3JsonParser()
    content, calls = p.extract('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                               '{"name": "get_time", "parameters": {}}')
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert p.extract("The weather is fine.") == ("The weather is fine.", [])
    assert p.extract('{"not": "a call"}') == ('{"not": "a call"}', [])
    assert p.holds('  {"name"') == 2 and p.holds("Hello") == 5


@pytest.mark.parametrize("tools, choice, auto, param", [
    (None, "required", None, "tool_choice"), ([WEATHER], "auto", None, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
    ([{"type": "function"}], "required", None, "tools.0"), ([WEATHER], "sometimes", None, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": [1]}}, None, "tool_choice"),
])
def test_bad_tools_are_400s_naming_the_field(tools, choice, auto, param):
    with pytest.raises(APIError) as info:
        plan_tools(tools, choice, auto)
    assert info.value.status == 400 and info.value.param == param


def test_forced_calls_are_grammars():
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.mode == "named" and named.constraint == {"json": WEATHER["function"]["parameters"]}
    required = plan_tools([WEATHER, TIME], "required", None)
    names = [c["properties"]["name"]["const"] for c in required.constraint["json"]["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"] and required.constraint["json"]["minItems"] == 1
    assert plan_tools([WEATHER], "none", None).mode == "none" and plan_tools(None, None, None).tools is None
    with pytest.raises(ValueError, match="not one of"):
        parser("nope")


def scripted(*texts):
    """An engine whose answer grows through `texts` (the last one finishes)."""
    async def script(prompt):
        for k, t in enumerate(texts):
            done = k == len(texts) - 1
            yield RequestOutput("r", None, [1], [CompletionOutput(0, t, [9] * len(t), None, None,
                                                                  "stop" if done else None)], done, None)
    return ScriptedEngine(script)


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER], **kw}


def test_auto_tool_calls_in_answers_and_streams():
    call_text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'

    async def scenario():
        app = build_app(scripted("Checking. ", "Checking. <tool_", "Checking. " + call_text), MODEL,
                        max_body_bytes=1 << 20, tool_parser=parser("hermes"))
        status, raw = await call(app, "/v1/chat/completions", chat_body())
        choice = json.loads(raw)["choices"][0]
        assert status == 200 and choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Checking."
        (tc,) = choice["message"]["tool_calls"]
        assert tc["type"] == "function" and tc["function"]["name"] == "get_weather"
        assert json.loads(tc["function"]["arguments"]) == {"city": "Paris"} and tc["id"].startswith("call_")
        app = build_app(scripted("Checking. ", "Checking. <tool_", "Checking. " + call_text), MODEL,
                        max_body_bytes=1 << 20, tool_parser=parser("hermes"))
        status, raw = await call(app, "/v1/chat/completions", chat_body(stream=True))
        chunks = [e for e in events(raw) if e != "[DONE]"]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        content = "".join(d.get("content") or "" for d in deltas)
        assert "<tool" not in content and content.strip() == "Checking."  # the partial tag was held back
        (calls,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        # without a parser on the server, tool_choice auto with tools is a 400 naming the flags
        status, raw = await call(build_app(scripted("x"), MODEL, max_body_bytes=1 << 20), "/v1/chat/completions",
                                 chat_body())
        assert status == 400 and "--tool-call-parser" in json.loads(raw)["error"]["message"]

    asyncio.run(scenario())


def test_a_named_call_streams_its_arguments():
    async def scenario():
        app = build_app(scripted('{"city": ', '{"city": "Paris"}'), MODEL, max_body_bytes=1 << 20)
        body = chat_body(tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
        status, raw = await call(app, "/v1/chat/completions", body)
        deltas = [e["choices"][0]["delta"] for e in events(raw) if e != "[DONE]"][1:]  # after the role chunk
        assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": '}
        assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Paris"}'
        assert all("content" not in d for d in deltas)

    asyncio.run(scenario())


def test_tokens_held_back_as_a_possible_call_keep_their_logprobs():
    """auto tool choice holds back text that may start a call; the tokens of a chunk held back send their
    logprobs with the next chunk that goes out: every token's logprob arrives once"""

    texts = ["Checking. ", "Checking. <tool_", "Checking. <tool_x> no call after all"]

    async def script(prompt):
        for k, t in enumerate(texts):
            done = k == len(texts) - 1
            lps = [{9: Logprob(-0.25, 1)} for _ in t]
            yield RequestOutput("r", None, [1], [CompletionOutput(0, t, [9] * len(t), None, lps,
                                                                  "stop" if done else None)], done, None)

    async def scenario():
        app = build_app(ScriptedEngine(script), MODEL, max_body_bytes=1 << 20, tool_parser=parser("hermes"))
        status, raw = await call(app, "/v1/chat/completions", chat_body(stream=True, logprobs=True))
        chunks = [e for e in events(raw) if e != "[DONE]"][1:]  # after the role chunk
        sent = sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks if c["choices"][0]["logprobs"])
        assert status == 200 and sent == len(texts[-1])

    asyncio.run(scenario())
