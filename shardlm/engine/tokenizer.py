"""Tokenizers for the driver: Hugging Face's for real models, a byte tokenizer for random weights."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..common.config import ConfigError
from ..common.model_source import (
    ModelSource,
    cache_dir,
    fetch_from_hub,
    looks_like_hub_id,
)


class Tokenizer(Protocol):
    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_str(self, token_id: int) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]: ...


class HFTokenizer:
    """Wraps a transformers tokenizer: encode/decode without special tokens, chat template."""

    def __init__(self, tok: Any, eos_ids: list[int]):
        self.tok = tok
        eos = set(eos_ids)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        self.eos_token_ids = sorted(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not self.tok.chat_template:
            raise ValueError("this model's tokenizer has no chat template; pass a plain prompt instead")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           tools=tools)
        if hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out)


class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258 (0 pad, 1 bos, 2 eos); ids past 258 decode as <|id|>.

    Random-weight models have no vocabulary; this keeps text prompts usable for benchmarks.
    """

    OFFSET = 3

    def __init__(self, vocab_size: int, eos_ids: list[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_ids) or [2]

    def encode(self, text: str) -> list[int]:
        return [1] + [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # pad/bos/eos are never rendered: the byte vocabulary has no text for them
        out, pending = [], bytearray()
        for i in ids:
            if self.OFFSET <= i < 256 + self.OFFSET:
                pending.append(i - self.OFFSET)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if i >= 256 + self.OFFSET:
                out.append(f"<|{i}|>")
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        text = f"<tools>\n{json.dumps(tools)}\n" if tools else ""
        for m in messages:
            calls = f"\n{json.dumps(m['tool_calls'])}" if m.get("tool_calls") else ""
            text += f"<{m['role']}>\n{m.get('content') or ''}{calls}\n"
        return self.encode(text + ("<assistant>\n" if add_generation_prompt else ""))


@dataclass
class DetokenizerState:
    """Where a sequence's incremental decoding stands: text up to read_offset has been given out;
    the window decoded each step starts at prefix_offset (a token or two of context, so that
    decoders which treat the first token specially, or merge a character split over tokens, see
    the same neighbours as in a decode of the whole output)."""

    prefix_offset: int = 0
    read_offset: int = 0


def decode_next(tok: Tokenizer, ids: list[int], state: DetokenizerState, skip_special_tokens: bool = True,
                flush: bool = False) -> str:
    """The text that ids[state.read_offset:] add to the text given out so far; advances the state.

    Decodes only a short window (not the whole output) per call, so a step costs the same at the
    10th token and the 10,000th. A character cut between tokens (the window ends in U+FFFD) is held
    back until its last byte arrives; flush=True gives out whatever is pending (the sequence ended).
    """
    prefix = (tok.decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens=skip_special_tokens)
              if state.read_offset > state.prefix_offset else "")
    window = tok.decode(ids[state.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if not flush and (len(window) <= len(prefix) or window.endswith("\ufffd")):
        return ""  # nothing printable yet (a skipped special token, half a character)
    state.prefix_offset, state.read_offset = state.read_offset, len(ids)
    return window[len(prefix):]


TOKENIZER_FILES = ["tokenizer*", "*.model", "*.tiktoken", "special_tokens_map.json", "vocab*", "merges.txt",
                   "*.jinja", "config.json", "generation_config.json"]


def load_tokenizer(spec: ModelSource, tokenizer: str | None = None, chat_template: str | None = None,
                   download_dir: str | None = None) -> Tokenizer:
    """The tokenizer of a model, or `tokenizer` (a folder or a Hub id) instead; `chat_template` (a Jinja file
    or the template text) replaces its chat template."""
    tok = _model_tokenizer(spec) if tokenizer is None else _named_tokenizer(tokenizer, spec, download_dir)
    if chat_template is None:
        return tok
    if not isinstance(tok, HFTokenizer):
        raise ConfigError(f"--chat-template needs a real tokenizer; {spec.name} has none: pass --tokenizer too")
    path = Path(chat_template).expanduser()
    if path.is_file():
        tok.tok.chat_template = path.read_text()
    elif "{{" in chat_template or "{%" in chat_template:
        tok.tok.chat_template = chat_template
    else:
        raise ConfigError(f"--chat-template {chat_template!r:.100} is neither a file nor a Jinja template")
    return tok


def _named_tokenizer(name: str, spec: ModelSource, download_dir: str | None) -> Tokenizer:
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if not path.is_dir():
        if not looks_like_hub_id(name):
            raise ConfigError(f"--tokenizer {name!r} is neither a folder nor a Hugging Face model id (owner/name)")
        path = fetch_from_hub(name, download_dir, TOKENIZER_FILES)
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path)), spec.config.eos_token_id)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer {name!r}: no tokenizer could be loaded from {path} ({exc})") from None


def _model_tokenizer(spec: ModelSource) -> Tokenizer:
    """The tokenizer that goes with a model; GGUF tokenizers are converted once and cached."""
    eos = spec.config.eos_token_id
    if spec.kind == "random":
        return ByteTokenizer(spec.config.vocab_size, eos)
    from transformers import AutoTokenizer

    if spec.kind == "hf":
        folder = Path(spec.path)
        if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            warnings.warn(f"{folder} has no tokenizer files; using shardlm's byte tokenizer (text in, ids out "
                          f"still work, but the text will not match the model's own vocabulary)", stacklevel=2)
            return ByteTokenizer(spec.config.vocab_size, eos)
        return HFTokenizer(AutoTokenizer.from_pretrained(spec.path), eos)
    path = Path(spec.path)
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(cached))
    else:
        # converting a GGUF vocabulary takes ~10 s on a slow CPU: do it once
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tmp = cached.with_name(key + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(cached)
        except OSError:  # another process won the race; its copy is as good
            pass
    return HFTokenizer(tok, eos)
