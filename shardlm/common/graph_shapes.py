"""The shapes decode steps are captured at as CUDA graphs (worker/graphs.py), without torch: the planner
predicts a graph step at its padded shape.

A graph fixes every shape, so a decode step runs padded to a captured (batch, context) pair: every batch
size of `batch_sizes` times every context size of `context_sizes`. On the torch attention path the pairs
keep batch * context <= GRAPH_TOKENS (the K/V gathered for one layer is a decode step's largest buffer)
and contexts double up to max_seq_len_to_capture (8192); the attention kernels gather nothing and read
only each sequence's own context, so their graphs go up to max_model_len, contexts growing 4x (the
context size only sets how wide the block tables copied each step are). A step outside every pair runs
eagerly.
"""

from __future__ import annotations

GRAPH_TOKENS = 1 << 18
"""largest batch * context of a graph (Llama-3-8B at TP=1 gathers 4 KiB of K/V a token: 1 GiB)"""
MIN_CONTEXT = 256
"""smallest context size of a graph; sizes double from here up to the captured maximum"""


def batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, ... below max_num_seqs, then max_num_seqs itself
    (past 8 rows, padding adds at most a third)."""
    sizes, b = [1, 2, 4, 8, 16, 24], 32
    while b < max_num_seqs:
        sizes += [b, b * 3 // 2]
        b *= 2
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


def context_sizes(max_len: int, growth: int = 2) -> list[int]:
    """MIN_CONTEXT, growing `growth` times, and max_len itself as the last size."""
    sizes, c = [], MIN_CONTEXT
    while c < max_len:
        sizes.append(c)
        c *= growth
    return sizes + [max_len]


def graph_pairs(max_num_seqs: int, max_context: int, paged_kernels: bool = False) -> list[tuple[int, int]]:
    """Every captured (batch, context) pair, sorted (paged_kernels: the attention kernels' graphs)."""
    if paged_kernels:
        return sorted((b, c) for c in context_sizes(max(1, max_context), 4) for b in batch_sizes(max_num_seqs))
    return sorted((b, c) for c in context_sizes(max(1, max_context)) for b in batch_sizes(max_num_seqs)
                  if b * c <= GRAPH_TOKENS)


MIXED_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
"""token counts the steps with prompt chunks are captured at (worker/step_graphs.py, the attention kernels' path,
up to the step budget); a step of more tokens runs eagerly"""
MIXED_MAX_CONTEXT = 16384
"""longest context a mixed-step graph serves (its block tables are this wide, copied every step)"""


def mixed_size(tokens: int) -> int | None:
    """The token count a step with prompt chunks of `tokens` tokens runs at: the smallest of MIXED_SIZES that
    holds it (its GEMMs and elementwise kernels run over every row of it; the attention tiles and the K/V
    written are the real tokens'), None past the largest (eager; so is a step past the step budget's size, with
    a context past MIXED_MAX_CONTEXT or max_model_len, or asking for prompt logprobs: StepGraphs.size_for)."""
    return next((t for t in MIXED_SIZES if t >= tokens), None)


def padded_shape(pairs: list[tuple[int, int]], n_seqs: int, max_context: int) -> tuple[int, int] | None:
    """The pair a decode step of n_seqs sequences of up to max_context tokens runs at: the smallest context
    that holds it, then the smallest batch (None: no pair holds it, the step runs eagerly)."""
    contexts = sorted({c for _, c in pairs if c >= max_context})
    if not contexts:
        return None
    return next(((b, c) for b, c in pairs if c == contexts[0] and b >= n_seqs), None)
