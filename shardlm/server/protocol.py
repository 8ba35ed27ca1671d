"""OpenAI request bodies (the fields shardlm serves) and their conversion to SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling_params import SamplingParams

# OpenAI fields shardlm does not implement, with the values that mean "off"; any other value gets a 400
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An error returned to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    def check_unsupported(self) -> None:
        for name, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in neutral:
                raise APIError(400, f"{name}={value!r} is not supported by shardlm; remove it from the request", name)

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  seed=self.seed, max_tokens=max_tokens, stop=self.stop,
                                  stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs)
        except ValueError as exc:
            param = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param) from None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
