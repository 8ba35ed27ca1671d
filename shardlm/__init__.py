"""shardlm: split large language models across GPUs and serve them."""

from .engine import EngineArgs, LLMEngine
from .layout import ParallelLayout
from .llm import LLM
from .sampling_params import SamplingParams
from .sequence import CompletionOutput, Logprob, RequestOutput

__all__ = ["LLM", "SamplingParams", "EngineArgs", "LLMEngine", "ParallelLayout", "RequestOutput",
           "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
