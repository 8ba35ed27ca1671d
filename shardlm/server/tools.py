"""Tool calls for chat completions: the request's tools and tool_choice, the grammar that forces a call, and
the parsers that find calls in a model's free text (vLLM's `--tool-call-parser` names).

- tool_choice "none": the tools are shown to the chat template only; the answer is text.
- a named function: the output is constrained to that function's arguments (its JSON schema).
- "required": the output is constrained to a JSON list of one or more {"name", "parameters"} calls.
- "auto": the model writes freely; the server's parser (--enable-auto-tool-choice --tool-call-parser P)
  finds the calls in the text. Streamed, text that may be the start of a call is held back until the call
  is complete; a call goes out as OpenAI's tool-call deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str
    """the arguments as JSON text (OpenAI's shape)"""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def message(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class HermesParser:
    """Hermes / Qwen 2.5+ templates: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one or more."""

    name = "hermes"
    START = "<tool_call>"
    CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = []
        for body in self.CALL.findall(text):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append(ToolCall(obj["name"], _arguments(obj.get("arguments", {}))))
        if not calls:
            return text, []
        content = text[: text.find(self.START)].strip()
        return content or None, calls

    def holds(self, text: str) -> int:
        """Where a tool call may start in streamed text: text from there is held back."""
        at = text.find(self.START)
        if at >= 0:
            return at
        for k in range(len(self.START) - 1, 0, -1):  # a partial "<tool_c" at the end
            if text.endswith(self.START[:k]):
                return len(text) - k
        return len(text)


class Llama3JsonParser:
    """Llama 3.1 / 3.2 JSON tool calls: the whole answer is {"name": ..., "parameters": {...}} (several joined
    by ";"), optionally after <|python_tag|>."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
                return text, []
            calls.append(ToolCall(obj["name"], _arguments(obj.get("parameters", obj.get("arguments", {})))))
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return (None, calls) if calls else (text, [])

    def holds(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped[:1] in ("{", "<") else len(text)


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser)}
"""--tool-call-parser names; a new parser is a class with `name`, `extract` and `holds`"""


def parser(name: str | None):
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


@dataclass
class ToolPlan:
    """What a chat request's tools ask of this response."""

    tools: list[dict[str, Any]] | None
    """the function definitions the chat template shows the model (None: none)"""
    mode: str
    """none, auto, required or named"""
    constraint: dict[str, Any] | None = None
    """the structured output that forces the call (required, named)"""
    name: str | None = None
    """named: the function"""

    def calls(self, text: str, found_by) -> tuple[str | None, list[ToolCall]]:
        """The message content and the tool calls of a finished answer."""
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # (cut by max_tokens)
                return text, []
            return None, [ToolCall(i["name"], _arguments(i.get("parameters", {}))) for i in items]
        if self.mode == "auto" and found_by is not None:
            return found_by.extract(text)
        return text, []


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, auto_parser) -> ToolPlan:
    """The request's tools and tool_choice checked (a 400 naming the field) and turned into a ToolPlan."""
    from .protocol import (
        APIError,  # (fastapi: `shardlm serve --help` and the parser names do without it)
    )

    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return ToolPlan(None, "none")
    functions = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools.{i} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                f"\"parameters\": {{...}}}}}}", f"tools.{i}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema (an object)", f"tools.{i}")
        functions[fn["name"]] = params
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(tools, "none")
    if choice == "auto":
        if auto_parser is None:
            raise APIError(400, "tool_choice auto needs the server started with --enable-auto-tool-choice and "
                                "--tool-call-parser (or send tool_choice required, none or a named function)",
                           "tool_choice")
        return ToolPlan(tools, "auto")
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, params in functions.items()]
        return ToolPlan(tools, "required", {"json": {"type": "array", "minItems": 1, "items": {"anyOf": calls}}})
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in functions:
            raise APIError(400, f"tool_choice names function {name!r:.100}, which is not among the tools "
                                f"({', '.join(functions)})", "tool_choice")
        return ToolPlan(tools, "named", {"json": functions[name]}, name)
    raise APIError(400, f"tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": "
                        f"{{\"name\": ...}}}}, got {choice!r:.100}", "tool_choice")
