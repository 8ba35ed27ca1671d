"""EngineArgs: every engine setting, its default and its help, in one place (the CLI is built from it)."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import itertools
import math
import os
import textwrap
import types
from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..common.config import ConfigError, check_output_path
from ..common.defaults import MAX_NUM_SEQS
from ..common.layout import LayoutError
from ..common.model_source import ModelSource
from .kv_cache import MAX_STEP_TOKENS

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cuda", "cpu"]
Quantization = Literal["fp8"]
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3"]
ExpertPlacement = Literal["round_robin", "balanced"]
AttentionBackend = Literal["auto", "triton", "torch"]


@dataclass
class EngineArgs:
    """Engine settings; names follow vLLM's where the meaning is the same. Each attribute's docstring
    is its `--flag`'s help."""

    model: str | os.PathLike | ModelSource | None = None
    """built-in name (default: smollm2-135m), HF checkpoint folder, .gguf file or random:<preset> (e.g.
    random:llama-3-8b); from Python also a ModelSource"""
    tensor_parallel_size: int = 1
    """TP degree: ranks (GPUs or CPU processes) that split every layer"""
    pipeline_parallel_size: int = 1
    """PP degree: stages that each hold a contiguous run of layers"""
    trace: str | os.PathLike | None = None
    """write a Chrome/Perfetto trace (one track per rank: compute, communication, idle) here at shutdown"""
    max_batches_in_flight: int | None = None
    """pipeline micro-batches in flight at once (default: pipeline_parallel_size; 1 = no overlap)"""
    async_scheduling: bool = True
    """with one pipeline stage: schedule and send step N+1 while the workers run step N (its decodes take
    the tokens step N samples straight from the GPU), so the driver's per-step work leaves the critical path;
    pipeline stages overlap micro-batches instead"""
    pp_layer_split: list[int] | None = None
    """layers per pipeline stage (e.g. 10,14); default balances weights incl. embedding and LM head"""
    dtype: DType = "auto"
    """float32, bfloat16 or float16; auto = float32 on CPU, bfloat16 on GPU"""
    kv_cache_dtype: KVCacheDType = "auto"
    """auto (the model dtype) or fp8 (also fp8_e4m3): K and V stored as FP8 e4m3 (scale 1, as vLLM's
    uncalibrated FP8 cache), half the bytes of bf16: twice the tokens in the same memory"""
    quantization: Quantization | None = None
    """fp8: the linear layers' weights in FP8 (e4m3, a scale per output channel), quantised as they load
    (the embedding and, unless fp8_lm_head, the LM head stay in dtype); on GPUs of compute capability 8.9+
    (Ada, Hopper) the GEMMs run on the FP8 tensor cores with the activations quantised per token. An FP8
    checkpoint is read as it is, without this flag"""
    fp8_lm_head: bool = False
    """with FP8 weights: the LM head in FP8 too (quantised at load, a scale per vocab row; a tied head gets an
    FP8 copy of the embedding): half the head's bytes a step (Llama-3-8B: 0.5 of 1.05 GB). Off by default, as
    in vLLM: the logits then carry the head's e4m3 rounding too, which is not harmless (SmolLM2-135M: greedy
    agreement with the float32 model 0.957 against FP8 weights' 0.969, and the demo's answer no longer says
    Paris; docs/PERFORMANCE.md)"""
    device: Device = "auto"
    """cuda, cpu or auto (cuda when a GPU is visible)"""
    seed: int = 0
    """seed of random weights (random:<preset>)"""
    max_model_len: int | None = None
    """longest prompt + output; default: the model's context, capped by the KV cache"""
    max_num_seqs: int = MAX_NUM_SEQS
    """most sequences in one step"""
    max_num_batched_tokens: int | None = None
    """token budget of one step (prefill chunks + decodes; decodes first, prompts chunked to the rest);
    default max(max_model_len, 2048), for `serve` 1024 (short chunks keep the running streams flowing)"""
    block_size: int = 16
    """tokens per KV block"""
    gpu_memory_utilization: float = 0.9
    """fraction of each GPU's memory for weights, activations and KV cache"""
    kv_cache_memory_bytes: int | None = None
    """KV cache size per rank; overrides gpu_memory_utilization (default on CPU: 1 GiB)"""
    download_dir: str | None = None
    """Hugging Face cache that Hub model ids (owner/name) are read from and downloaded into (default: HF_HOME's)"""
    tokenizer: str | None = None
    """tokenizer to use instead of the model's own: a folder or a Hub id"""
    chat_template: str | None = None
    """chat template (Jinja) to use instead of the tokenizer's: a file, or the template itself"""
    enforce_eager: bool = False
    """GPU: run every step eagerly; by default decode steps of dense models replay CUDA graphs"""
    disable_custom_all_reduce: bool = False
    """TP on GPUs: sum every message with NCCL; by default small messages (decode, short prefills) go over
    peer memory in one kernel, fused with the norm after them, where every pair of the group's GPUs has
    peer access (the start-up log says which path runs)"""
    attention_backend: AttentionBackend = "auto"
    """triton: kernels that read K/V straight from the paged cache, and the fused residual add + RMSNorm
    and SiLU x up (CUDA); torch: every layer on its torch reference path (gather + SDPA, unfused), for
    debugging; auto: triton on CUDA when triton is installed, else torch"""
    max_seq_len_to_capture: int | None = None
    """GPU: decode steps whose longest context exceeds this run eagerly; default: max_model_len with the
    attention kernels, 8192 on the torch attention path (its graphs gather this many positions)"""
    external_workers: bool = False
    """wait for workers started by torchrun instead of spawning them"""
    driver_host: str = "127.0.0.1"
    """address the driver listens on for workers"""
    driver_port: int = 0
    """port the driver listens on (0: any free port)"""
    enable_prefix_caching: bool = True
    """share the KV blocks of identical prompt prefixes between requests"""
    first_device: int = 0
    """GPU index of rank 0 (a data-parallel replica's workers use GPUs first_device .. + tp - 1)"""
    enable_expert_parallel: bool = False
    """MoE: place whole experts on the TP ranks and dispatch tokens with all-to-all (off: every
    expert's FFN is split over the TP ranks like a dense MLP)"""
    expert_placement: ExpertPlacement = "round_robin"
    """which EP rank holds which expert: round_robin, or balanced on a measured load (expert_load)"""
    expert_load: str | os.PathLike | None = None
    """JSON file of tokens per expert per layer (LLM.save_expert_load) that balanced placement evens out"""
    num_redundant_experts: int = 0
    """balanced placement: extra copies of the hottest experts, spread over other ranks"""
    step_timeout_s: float = 30.0
    """a step whose output rank has not answered after max(this, 20 x the recent median step time) means a
    hung rank: the worker group is replaced and its sequences resume by recomputation"""
    max_worker_restarts: int = 3
    """worker groups replaced in a row without a step completing in between before the engine gives up
    (a crash loop); 0: never replace a failed group"""

    def validate(self) -> None:
        """Raise ConfigError (LayoutError for the parallel layout) naming the setting to change, for
        every setting that is wrong whatever the model and the hardware; the engine checks the rest."""
        hints = _type_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                error = LayoutError if f.name in _LAYOUT_FIELDS else ConfigError
                raise error(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} must be a positive integer, got {getattr(self, name)}")
        split = self.pp_layer_split
        if split is not None:
            if len(split) != self.pipeline_parallel_size:
                raise LayoutError(f"pp_layer_split {split} names {len(split)} stages, pipeline_parallel_size is "
                                  f"{self.pipeline_parallel_size}")
            if any(n < 1 for n in split):
                raise LayoutError(f"pp_layer_split {split} leaves a stage without layers: every entry must be >= 1")
        for name in ("max_num_seqs", "block_size", "max_num_batched_tokens", "max_batches_in_flight",
                     "max_seq_len_to_capture", "max_model_len", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens > MAX_STEP_TOKENS:
            raise ConfigError(f"max_num_batched_tokens must be <= {MAX_STEP_TOKENS} (a step's kernels index its "
                              f"activations in 32 bits; longer prompts are prefilled in chunks), got "
                              f"{self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.first_device < 0:
            raise ConfigError(f"first_device must be >= 0, got {self.first_device}")
        if not 0 <= self.driver_port <= 65535:
            raise ConfigError(f"driver_port must be in 0..65535 (0: any free port), got {self.driver_port}")
        if not math.isfinite(self.step_timeout_s) or self.step_timeout_s <= 0:
            raise ConfigError(f"step_timeout_s must be a positive number of seconds, got {self.step_timeout_s}")
        if self.max_worker_restarts < 0:
            raise ConfigError(f"max_worker_restarts must be >= 0, got {self.max_worker_restarts}")
        if self.num_redundant_experts < 0:
            raise ConfigError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        uses_placement = self.expert_load or self.num_redundant_experts or self.expert_placement != "round_robin"
        if uses_placement and not (self.enable_expert_parallel and self.tensor_parallel_size > 1):
            raise ConfigError("expert_placement, expert_load and num_redundant_experts place experts on expert "
                              "parallel ranks: add enable_expert_parallel with tensor_parallel_size > 1")
        if self.expert_placement == "round_robin" and (self.expert_load or self.num_redundant_experts):
            raise ConfigError("expert_load and num_redundant_experts need expert_placement='balanced'")
        if self.expert_placement == "balanced" and not self.expert_load:
            raise ConfigError("expert_placement='balanced' needs a measured load: pass expert_load=<file> written by "
                              "LLM.save_expert_load / `shardlm generate ... --save-expert-load FILE`")
        check_output_path("trace", self.trace)  # written at shutdown: found out now, not after the run

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        """Add one --flag per field (help: the field's docstring and its default) in a group of its own,
        returned so that a command can add related flags. A flag not given parses to None, so that
        from_cli_args (and a caller that must tell "not given" apart, like --parallel auto) sees it."""
        group = parser.add_argument_group("engine", "settings of EngineArgs (the same names from Python)")
        docs, hints = _attribute_docs(cls), _type_hints()
        for f in fields(cls):
            kwargs = _cli_kwargs(hints[f.name], f.default)
            shown = _shown_default(f.default)
            help_text = docs[f.name] + (f" (default: {shown})" if shown else "")
            flag = "--" + f.name.replace("_", "-")
            group.add_argument(flag, *_SHORT_FLAGS.get(f.name, ()), dest=f.name, default=None,
                               help=help_text.replace("%", "%%"), **kwargs)
        return group

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The settings parsed by a parser that add_cli_args built; flags not given keep the defaults above."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None})


_LAYOUT_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size", "pp_layer_split")
_SHORT_FLAGS = {"tensor_parallel_size": ("-tp",), "pipeline_parallel_size": ("-pp",)}


@functools.cache
def _type_hints() -> dict[str, Any]:
    return get_type_hints(EngineArgs)


@functools.cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it in the class body), whitespace folded."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _members(hint: Any) -> tuple[Any, ...]:
    """The types of a union (X | Y), else the type itself."""
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _matches(value: Any, hint: Any) -> bool:
    if get_origin(hint) in (Union, types.UnionType):
        return any(_matches(value, member) for member in get_args(hint))
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if get_origin(hint) is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """The accepted values of a type, in words (for an error message)."""
    if get_origin(hint) in (Union, types.UnionType):
        *rest, last = [_describe(member) for member in get_args(hint)]
        return f"{', '.join(rest)} or {last}"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(get_args(hint))
    if get_origin(hint) is list:
        return "a list of " + _describe(get_args(hint)[0]).split(" ", 1)[1] + "s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "True or False", type(None): "None",
             os.PathLike: "a path"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _comma_separated_ints(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers (e.g. 10,14), got {text!r}") from None


def _cli_kwargs(hint: Any, default: Any) -> dict[str, Any]:
    """add_argument's type/action/choices for a field's annotation (None in a union means: optional)."""
    members = [m for m in _members(hint) if m is not type(None)]
    kind = str if str in members else members[0]  # model, trace, expert_load: a name or path
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    if get_origin(kind) is Literal:
        return {"choices": get_args(kind)}
    if get_origin(kind) is list:
        return {"type": _comma_separated_ints, "metavar": "N,N,..."}
    return {"type": kind, "metavar": "N"} if kind is int else {"type": kind}


def _shown_default(default: Any) -> str | None:
    """The default as --help shows it; None where there is nothing to show (no value, or a flag that is off)."""
    if default is None or default is False:
        return None
    return "on" if default is True else str(default)
