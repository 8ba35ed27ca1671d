"""shardlm: split large language models across GPUs and serve them."""

from .common.layout import ParallelLayout
from .engine.arg_utils import EngineArgs
from .engine.llm_engine import LLMEngine
from .engine.sampling_params import SamplingParams
from .engine.sequence import CompletionOutput, Logprob, RequestOutput
from .entrypoints.llm import LLM

__all__ = ["LLM", "SamplingParams", "EngineArgs", "LLMEngine", "ParallelLayout", "RequestOutput",
           "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
