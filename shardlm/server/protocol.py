"""OpenAI request bodies (the fields shardlm serves) and their conversion to SamplingParams."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling_params import SamplingError, SamplingParams

Finite = Annotated[float, Field(allow_inf_nan=False)]
"""a float that is not NaN or infinite (JSON bodies may carry NaN and Infinity literals)"""

# OpenAI fields shardlm does not implement, with the values that mean "off"; any other value gets a 400
UNSUPPORTED: dict[str, tuple] = {
    "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
    "use_beam_search": (None, False), "allowed_token_ids": (None,), "bad_words": (None, []),
    "truncate_prompt_tokens": (None,), "include_stop_str_in_output": (None, False),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}
"""(vLLM's own fields among them: a client written for vLLM gets a 400 rather than a silent difference;
guided_* are vLLM's names before structured_outputs)"""


class APIError(Exception):
    """An error returned to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message quoting the client's text stays writable even if that text is not valid Unicode
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


class _TextCheck(BaseModel):
    def check_text(self) -> None:
        """Raise APIError naming the first string that is not valid Unicode: a lone UTF-16 surrogate (JSON
        can carry "\\ud800") can be neither tokenised nor written back as UTF-8."""
        def walk(value: Any, path: tuple[str, ...]) -> None:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    where = ".".join(path) or None
                    raise APIError(400, f"{where or 'a field name'} has a lone UTF-16 surrogate ({value[exc.start]!r}) "
                                        f"at character {exc.start}; send valid Unicode text", where) from None
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(k, path)
                    walk(v, (*path, k))
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, (*path, str(i)))

        body = self.model_dump()
        try:  # one pass in C for the common case (a 512-token prompt is 512 list items to walk in Python)
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            walk(body, ())


class _Common(_TextCheck):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = 1
    temperature: Finite = 1.0
    top_p: Finite = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: Finite = 0.0
    frequency_penalty: Finite = 0.0
    repetition_penalty: Finite = 1.0
    min_p: Finite = 0.0
    logit_bias: dict[str, Finite] | None = None
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    """vLLM's: each prompt token's log-probability with this many most likely tokens at its position"""
    response_format: dict[str, Any] | None = None
    """OpenAI's: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", ...}}"""
    structured_outputs: dict[str, Any] | None = None
    """vLLM's: one of json, json_object, regex, choice, grammar"""
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    def check_unsupported(self) -> None:
        for name, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in neutral:
                hint = " (use structured_outputs)" if name.startswith("guided_") else ""
                raise APIError(400, f"{name}={value!r:.100} is not supported by shardlm; remove it from the "
                                    f"request{hint}", name)

    def constraint(self) -> dict[str, Any] | None:
        """The structured output asked for, by vLLM's structured_outputs or OpenAI's response_format."""
        fmt = self.response_format
        if fmt is None or fmt.get("type") == "text":
            return self.structured_outputs
        if self.structured_outputs is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", "response_format")
        if fmt.get("type") == "json_object":
            return {"json_object": True}
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                               "response_format")
            return {"json": schema}
        raise APIError(400, f"response_format.type must be text, json_object or json_schema, got "
                            f"{fmt.get('type')!r:.50}", "response_format")

    def sampling(self, max_tokens: int | None, logprobs: int | None, names: dict[str, str] | None = None,
                 best_of: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's SamplingParams; a bad value is a 400 naming its field (`names`: this request's
        name for a SamplingParams field, where they differ)."""
        constraint = self.constraint()
        if constraint is not None and self.response_format is not None:
            names = {**(names or {}), "structured_outputs": "response_format"}
        try:
            params = SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=logprobs, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, min_p=self.min_p, logit_bias=self.logit_bias,
                min_tokens=self.min_tokens, best_of=best_of, structured_outputs=constraint,
                prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)
        except SamplingError as exc:
            field = (names or {}).get(exc.field, exc.field)
            raise APIError(400, str(exc).replace(exc.field, field, 1), field) from None
        if self.stream and params.completions > params.n:
            raise APIError(400, "best_of > n cannot stream (the best n are known only at the end): set stream=false "
                                "or best_of=n", "best_of")
        return params


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool = False
    """the prompt's text before each completion's (with logprobs: the prompt's tokens and log-probabilities
    before the completion's)"""


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """an assistant's earlier calls, fed back"""
    tool_call_id: str | None = None
    """a tool message: the call it answers"""
    name: str | None = None

    def for_template(self, where: str) -> dict[str, Any]:
        """The message as chat templates take it: its text, and its tool calls with their arguments as objects
        (templates write them with `| tojson`; OpenAI sends them as JSON text)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text(where)}
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                if not isinstance(call.get("function"), dict):
                    raise APIError(400, f"{where}.tool_calls.{j}.function must be an object with name and arguments",
                                   f"{where}.tool_calls")
                fn = dict(call["function"])
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        raise APIError(400, f"{where}.tool_calls.{j}.function.arguments is not JSON",
                                       f"{where}.tool_calls") from None
                calls.append({**call, "function": fn})
            out["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self, where: str) -> str:
        """The message's text: its content, or its text parts joined (`where`: its path, for errors)."""
        if not isinstance(self.content, list):
            return self.content or ""
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text":
                continue
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{where}.content.{j}.text must be a string, got {json.dumps(text)[:100]}",
                               f"{where}.content.{j}.text")
            texts.append(text)
        return "".join(texts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(_TextCheck):
    """/tokenize (vLLM's): a prompt's tokens, or a conversation's after the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    """(messages) end with the assistant's turn opened, as a chat completion does"""


class DetokenizeRequest(_TextCheck):
    """/detokenize (vLLM's): token ids back to text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
