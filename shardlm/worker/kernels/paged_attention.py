"""Attention over the paged KV cache for a flat varlen batch: the step's metadata and the two paths.

Every sequence of a step brings q_len new tokens at positions [start, start + q_len) (a decode step, a
prompt chunk, or a prompt starting after a prefix-cache hit) and attends to [0, start + q_len), causal
inside its new tokens. The cache of a layer is [slots, n_kv, head_dim] per K and V, slot = block *
block_size + offset, a sequence's blocks listed in its block table.

Two paths with one signature, `fn(q, k_cache, v_cache, meta, heads) -> [tokens, n_q * head_dim]`:
- `paged_attention_torch`, the reference (CPU, CI, `--attention-backend torch`): gather every sequence's
  context out of the cache and run one batched scaled_dot_product_attention under a causal-with-offset
  mask. Its gather is as large as the whole context of the step.
- `paged_attention_triton` (CUDA default): kernels that read K/V through the block tables
  (triton_attention.py), no gather and no mask tensor.

`build_metadata` (eager steps, host lists) and `decode_metadata` (inside a decode graph, device tensors)
build what the chosen path needs: the block tables and offsets for both, plus the gather indices and the
mask (torch) or the kernel's tile tables (triton). One AttentionMetadata serves every layer of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ...common import envs
from . import triton_available

BACKENDS = ("torch", "triton")

SMALL_M = 16
"""query rows (tokens x query heads of one KV head) per tile for decodes and short chunks: tl.dot's minimum"""
LARGE_M = 128
"""query rows per tile for prompt chunks"""
MAX_SPLITS = 64
"""split-KV (flash-decoding): at most this many parts of one context, combined by a second kernel"""
SPLIT_ROWS = 2048
"""the partials' workspace holds this many (part, token) rows of every query head: a step of T tokens can
be split into at most SPLIT_ROWS // T parts"""
BLOCK_N = 128
"""key positions per inner iteration of the small tiles' launch (decodes, short chunks; a split part is a whole
number of them): on an H200 decode attention at 128 took 0.86-0.91x the time it took at 64 (batch 64 x 256
positions to 32 x 8k; scripts/attention_bench.py --sweep, docs/PERFORMANCE.md session 18)"""
LARGE_BLOCK_N = 64
"""key positions per inner iteration of the large tiles' launch (prompt chunks)"""


class HeadLayout:
    """One rank's heads of a layer. kv_index[i] is the local KV head of local query head i; it is uniform
    (each KV head serves n_q / n_kv consecutive query heads) except where a TP split cuts a GQA group.
    Holds the device tensors both paths read: kv_index, and per KV head its query heads (head_map)."""

    def __init__(self, n_q: int, n_kv: int, head_dim: int, kv_index: tuple[int, ...], device: torch.device):
        self.n_q, self.n_kv, self.head_dim = n_q, n_kv, head_dim
        self.scale = head_dim ** -0.5
        g = n_q // n_kv if n_q % n_kv == 0 else 0
        self.group = g if g and tuple(kv_index) == tuple(i // g for i in range(n_q)) else 0
        """query heads per KV head when uniform, else 0"""
        served = [[i for i, h in enumerate(kv_index) if h == kv] for kv in range(n_kv)]
        most = max(len(r) for r in served)
        self.g_pad = 1 << (most - 1).bit_length()
        """the most query heads one KV head serves, rounded up to a power of two"""
        self.kv_index = torch.tensor(kv_index, dtype=torch.long, device=device)
        self.head_map = torch.tensor([r + [-1] * (self.g_pad - len(r)) for r in served], dtype=torch.int32,
                                     device=device)
        """[n_kv, g_pad] the query heads each KV head serves, padded with -1"""


@dataclass
class GatherIndex:
    """What the torch path needs besides the block tables: where each context position sits in the cache,
    how the flat tokens map to a padded [seqs, max_q] layout and back, and the additive mask."""

    context_slots: torch.Tensor
    """[seqs, max_ctx] cache slot of every context position of each sequence (padding -> 0)"""
    q_index: torch.Tensor
    """[seqs, max_q] flat token index of each sequence's new tokens (padding -> 0)"""
    unpad_index: torch.Tensor
    """[tokens] position of each flat token in the padded [seqs * max_q] layout"""
    mask: torch.Tensor
    """[seqs, 1, max_q, max_ctx] additive: 0 where a query may attend a key, -inf where not (in the
    model's dtype, so attention does not convert a boolean mask in every layer)"""
    folded_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for_group(self, group: int, decode_only: bool) -> torch.Tensor:
        """The mask for queries laid out [seqs, kv_heads, group * max_q]: row g * max_q + i is query i."""
        if decode_only or group == 1:
            return self.mask  # one query row per sequence (or no folding): broadcasts as it is
        if group not in self.folded_masks:
            self.folded_masks[group] = self.mask.repeat(1, 1, group, 1)
        return self.folded_masks[group]


@dataclass
class Launch:
    """One kernel launch over some of the step's sequences: a tile is (sequence, first new token)."""

    tile_seq: torch.Tensor
    """[tiles] int32 sequence of each tile (-1: an unused tile, the kernel returns at once)"""
    tile_q0: torch.Tensor
    """[tiles] int32 index of the tile's first new token within its sequence"""
    block_m: int
    """query rows per tile (tokens x padded group)"""
    splits: int = 1
    """parts each context is split into (split-KV); > 1 only for a small launch of few tiles"""
    split_len: int = 0
    """context positions per part (a multiple of the kernel's key block)"""


@dataclass
class AttentionMetadata:
    """Per-step indexing shared by every layer (built once per step by the model runner)."""

    slot_mapping: torch.Tensor
    """[tokens] cache slot (block * block_size + offset) where each new token's K/V goes"""
    block_tables: torch.Tensor
    """[seqs, max_blocks] int32 each sequence's blocks (padding: 0, never read)"""
    seq_starts: torch.Tensor
    """[seqs] int32 tokens each sequence had cached before this step"""
    query_start: torch.Tensor
    """[seqs + 1] int32 flat index of each sequence's first new token (the last entry: tokens)"""
    max_ctx: int
    """the longest context of the step (start + q_len), or the graph's context size"""
    decode_only: bool
    """every sequence brings exactly one token: the flat tokens are already [seqs, 1]"""
    block_size: int
    gather: GatherIndex | None = None
    """the torch path's indices (None on the triton path)"""
    launches: list[Launch] = field(default_factory=list)
    """the triton path's launches (empty on the torch path)"""
    workspace: SplitWorkspace | None = None
    """split-KV partials, reserved by the model runner before the KV cache is sized"""


class SplitWorkspace:
    """Partial outputs of split-KV, [SPLIT_ROWS, n_q, head_dim] float32, and their log-sum-exps; a launch of
    S parts over a step of T tokens views them as [S, T', ...] with T' = SPLIT_ROWS // S >= T. One per rank,
    shared by its layers (they run one after another); 32 MiB for 32 heads of 128."""

    def __init__(self, n_q: int, head_dim: int, device: torch.device):
        self.out = torch.empty(SPLIT_ROWS, n_q, head_dim, dtype=torch.float32, device=device)
        self.lse = torch.empty(SPLIT_ROWS, n_q, dtype=torch.float32, device=device)

    def parts(self, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The partials of `splits` parts: [splits, SPLIT_ROWS // splits, n_q, d] and [.., n_q]."""
        rows = SPLIT_ROWS // splits
        return (self.out[: splits * rows].view(splits, rows, *self.out.shape[1:]),
                self.lse[: splits * rows].view(splits, rows, self.lse.shape[1]))


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ValueError naming what to change when `backend` cannot run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "triton":
        if device.type != "cuda":
            raise ValueError("the triton attention backend runs on CUDA devices only: use --attention-backend torch "
                             "(or auto) on the CPU")
        if not triton_available():
            raise ValueError("the triton attention backend needs the triton package (pip install triton), or "
                             "use --attention-backend torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> triton on CUDA when triton imports, else torch; other names are checked."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    check_backend(backend, device)
    return backend


# ---- metadata ---------------------------------------------------------------------------------
def _pad4(a: np.ndarray, fill: int) -> np.ndarray:
    """Padded to a multiple of 4 entries: int32 tensors cut from one buffer then start 16-byte aligned, as
    Triton assumes when it compiles (an unaligned one would compile another version of the kernel)."""
    return np.concatenate([a, np.full(-len(a) % 4, fill, dtype=a.dtype)])


def tile_tables(q_lens: np.ndarray, seqs: np.ndarray, block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, first new token) of each tile: a sequence's new tokens in tiles of block_q, padded to a
    multiple of 4 tiles with unused ones (sequence -1)."""
    counts = -(-q_lens[seqs] // block_q)
    tile_seq = np.repeat(seqs, counts)
    first = np.cumsum(counts) - counts
    tile_q0 = (np.arange(counts.sum()) - np.repeat(first, counts)) * block_q
    return _pad4(tile_seq.astype(np.int32), -1), _pad4(tile_q0.astype(np.int32), 0)


def split_plan(tiles: int, tokens: int, n_kv: int, max_ctx: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, positions per split) for a small launch of `tiles` tiles in a step of `tokens` tokens: split
    the context when too few programs (tiles x KV heads) would leave the GPU's SMs idle and the contexts
    are long enough to share; aim at ~4 programs per SM, each part at least 8 key blocks long (shorter
    parts cost more in the combine than they gain: measured on an H200, docs/PERFORMANCE.md)."""
    programs = tiles * n_kv
    most = min(MAX_SPLITS, SPLIT_ROWS // tokens)  # the workspace's rows
    if most < 2 or programs >= sms or max_ctx < 2 * block_n:
        return 1, 0
    return split_parts(max_ctx, min(most, -(-4 * sms // programs), -(-max_ctx // (8 * block_n))), block_n)


def split_parts(max_ctx: int, splits: int, block_n: int) -> tuple[int, int]:
    """(parts, positions per part) to cut contexts of up to max_ctx positions into about `splits` parts of a
    whole number of key blocks ((1, 0): no split)."""
    if splits < 2:
        return 1, 0
    split_len = -(-max_ctx // splits)
    split_len = -(-split_len // block_n) * block_n
    return -(-max_ctx // split_len), split_len


def plan_launches(q_lens: list[int], g_pad: int, max_ctx: int, n_kv: int, device: torch.device,
                  sms: int) -> list[Launch]:
    """Sequences whose new tokens fit one small tile (decodes, short chunks) go to a small launch that may
    split long contexts; the rest (prompt chunks) to a launch of large tiles."""
    q = np.asarray(q_lens, dtype=np.int64)
    small_q, large_q = max(1, SMALL_M // g_pad), max(1, LARGE_M // g_pad)
    small = np.flatnonzero(q <= small_q)
    large = np.flatnonzero(q > small_q)
    launches = []
    for seqs, block_q, block_m, may_split in ((small, small_q, max(SMALL_M, g_pad), True),
                                              (large, large_q, max(LARGE_M, g_pad), False)):
        if seqs.size == 0:
            continue
        tile_seq, tile_q0 = tile_tables(q, seqs, block_q)
        splits, split_len = (1, 0)
        if may_split:  # (the partials are indexed by the token's place in the whole step)
            splits, split_len = split_plan(int((tile_seq >= 0).sum()), int(q.sum()), n_kv, max_ctx, BLOCK_N, sms)
        dev = torch.from_numpy(np.concatenate([tile_seq, tile_q0])).to(device, non_blocking=True)
        launches.append(Launch(dev[: len(tile_seq)], dev[len(tile_seq):], block_m, splits, split_len))
    return launches


def build_metadata(starts: list[int], q_lens: list[int], block_tables: list[list[int]], block_size: int,
                   device: torch.device, dtype: torch.dtype = torch.float32, backend: str = "torch",
                   heads: HeadLayout | None = None, sms: int = 0) -> AttentionMetadata:
    """One eager step's metadata, built on the host and moved in one go per tensor."""
    n = len(starts)
    ctx_lens = [s + q for s, q in zip(starts, q_lens)]
    width = max(len(b) for b in block_tables)
    tables = np.zeros((n, width), dtype=np.int64)
    for i, bt in enumerate(block_tables):
        tables[i, : len(bt)] = bt
    flat_seq = np.repeat(np.arange(n), q_lens)
    flat_pos = np.concatenate([np.arange(s, s + q) for s, q in zip(starts, q_lens)])
    slot_mapping = tables[flat_seq, flat_pos // block_size] * block_size + flat_pos % block_size
    query_start = np.concatenate([[0], np.cumsum(q_lens)])
    # starts | query_start in one copy (starts padded: query_start must begin 16-byte aligned)
    small = torch.from_numpy(np.concatenate([_pad4(np.asarray(starts, dtype=np.int32), 0),
                                             query_start.astype(np.int32)])).to(device, non_blocking=True)
    n4 = n + (-n % 4)
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slot_mapping).to(device, non_blocking=True),
        block_tables=torch.from_numpy(tables.astype(np.int32)).to(device, non_blocking=True),
        seq_starts=small[:n], query_start=small[n4:], max_ctx=max(ctx_lens), decode_only=max(q_lens) == 1,
        block_size=block_size)
    if backend == "torch":
        meta.gather = _gather_index(starts, q_lens, torch.from_numpy(tables), block_size, device, dtype)
    else:
        meta.launches = plan_launches(q_lens, heads.g_pad, meta.max_ctx, heads.n_kv, device, sms)
    return meta


def _gather_index(starts: list[int], q_lens: list[int], tables: torch.Tensor, block_size: int,
                  device: torch.device, dtype: torch.dtype) -> GatherIndex:
    n = len(starts)
    ctx_lens = [s + q for s, q in zip(starts, q_lens)]
    max_q = max(q_lens)
    # optional padding of the gathered context to a multiple of SHARDLM_CTX_BUCKET positions (masked out), so
    # attention sees a new shape only every bucket decode steps, for backends that plan per shape (cuDNN's
    # re-planned every decode step: scripts/gpu_overhead.sh, docs/PERFORMANCE.md); off (1) by default
    bucket = envs.ctx_bucket()
    max_ctx = -(-max(ctx_lens) // bucket) * bucket
    width = tables.shape[1]
    pos = torch.arange(max_ctx)
    ctx_t, start_t, q_t = torch.tensor(ctx_lens), torch.tensor(starts), torch.tensor(q_lens)
    valid_key = pos.unsqueeze(0) < ctx_t.unsqueeze(1)  # [seqs, max_ctx]
    block_of = (pos // block_size).clamp(max=width - 1).unsqueeze(0).expand(n, -1)
    context_slots = tables.gather(1, block_of) * block_size + (pos % block_size)
    context_slots = context_slots.masked_fill(~valid_key, 0)

    offsets = torch.tensor([0] + q_lens[:-1]).cumsum(0)  # first flat token of each sequence
    qpos = torch.arange(max_q)
    valid_q = qpos.unsqueeze(0) < q_t.unsqueeze(1)  # [seqs, max_q]
    q_index = (offsets.unsqueeze(1) + qpos).masked_fill(~valid_q, 0)
    unpad_index = (torch.arange(n).unsqueeze(1) * max_q + qpos)[valid_q]

    # query i of sequence b sits at absolute position start_b + i and sees keys 0..start_b + i
    allowed = (pos.view(1, 1, -1) <= (start_t.view(-1, 1, 1) + qpos.view(1, -1, 1))) & valid_key.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return GatherIndex(
        context_slots=context_slots.to(device, non_blocking=True),
        q_index=q_index.to(device, non_blocking=True),
        unpad_index=unpad_index.to(device, non_blocking=True),
        mask=mask.unsqueeze(1).to(device, non_blocking=True),
    )


def decode_metadata(positions: torch.Tensor, tables: torch.Tensor, block_size: int, context: int,
                    dtype: torch.dtype, backend: str, launch: Launch | None) -> AttentionMetadata:
    """A decode step's metadata from device tensors, with no host work (inside a CUDA graph): one new token
    per sequence at `positions` [b], block tables [b, blocks] (int64, padded with the scratch block), the
    keys padded to `context` positions. `launch`: the triton path's tile tables for b sequences."""
    b = positions.shape[0]
    new_slots = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1) * block_size + positions % block_size
    arange = torch.arange(b + 1, dtype=torch.int32, device=positions.device)
    meta = AttentionMetadata(slot_mapping=new_slots, block_tables=tables.to(torch.int32),
                             seq_starts=positions.to(torch.int32), query_start=arange, max_ctx=context,
                             decode_only=True, block_size=block_size)
    if backend == "torch":
        pos = torch.arange(context, device=positions.device)
        context_slots = tables.index_select(1, pos // block_size) * block_size + pos % block_size  # [b, c]
        # a query at position p sees keys 0..p (padding past a table reads the scratch block, masked)
        mask = torch.zeros(b, context, dtype=dtype, device=positions.device).masked_fill_(
            pos.unsqueeze(0) > positions.unsqueeze(1), float("-inf"))
        empty = positions[:0]
        meta.gather = GatherIndex(context_slots, empty, empty, mask.view(b, 1, 1, context))
    else:
        meta.launches = [launch]
    return meta


def decode_launch(b: int, heads: HeadLayout, context: int, device: torch.device, sms: int) -> Launch:
    """The triton path's launch for a decode graph of b sequences and `context` positions (made once per
    graph: its tile tables are static)."""
    (launch,) = plan_launches([1] * b, heads.g_pad, context, heads.n_kv, device, sms)
    return launch


WARM_UP_CONTEXT = 16 * BLOCK_N
"""the context warm_up decodes at: long enough that split-KV cuts it (parts of >= 8 key blocks)"""


def warm_up(heads: HeadLayout, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
            workspace: SplitWorkspace, dtype: torch.dtype) -> None:
    """Compile every kernel variant a step can launch before the first request: rotary + cache write, a
    decode with and without split-KV (small tiles), a prompt chunk (large tiles). Attention only reads the
    cache's first blocks; the rotary kernel writes one token into slot 0 (no sequence's yet)."""
    from .rope_cache import rope_and_cache_triton

    dev = k_cache.device
    one = torch.zeros(1, heads.n_q + 2 * heads.n_kv, heads.head_dim, dtype=dtype, device=dev)
    rope = (torch.ones(1, 1, heads.head_dim, dtype=dtype, device=dev),) * 2
    rope_and_cache_triton(rope, one[:, : heads.n_q], one[:, heads.n_q: heads.n_q + heads.n_kv],
                          one[:, heads.n_q + heads.n_kv:], k_cache, v_cache, torch.zeros(1, dtype=torch.long, device=dev))
    ctx = min(k_cache.shape[0], WARM_UP_CONTEXT)
    table = [list(range(-(-ctx // block_size)))]
    # (sms: 1 lets no split pay, a huge count makes one where the cache holds WARM_UP_CONTEXT slots)
    for q_len, sms in ((1, 1), (1, 1 << 20), (min(ctx, LARGE_M), 1)):
        meta = build_metadata([ctx - q_len], [q_len], table, block_size, dev, dtype, "triton", heads, sms)
        meta.workspace = workspace
        q = torch.zeros(q_len, heads.n_q, heads.head_dim, dtype=dtype, device=dev)
        paged_attention_triton(q, k_cache, v_cache, meta, heads)


# ---- the two paths ----------------------------------------------------------------------------
def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          heads: HeadLayout) -> torch.Tensor:
    """The reference: gather each sequence's context, then one batched SDPA under the step's mask.

    Grouped-query attention folds each KV head's group of query heads into the query length
    ([seqs, n_kv, group * max_q, d] against [seqs, n_kv, ctx, d]) instead of asking SDPA for
    enable_gqa: on CUDA that path repeats K/V with repeat_interleave, which waits for the GPU in
    every layer once the batch has more than one sequence (measured: docs/PERFORMANCE.md).
    """
    g = meta.gather
    n_seqs, max_ctx = g.context_slots.shape
    d = heads.head_dim
    # index_select: the same gather as advanced indexing, with less work per launch on the CPU
    flat_slots = g.context_slots.view(-1)
    keys = k_cache.index_select(0, flat_slots).view(n_seqs, max_ctx, heads.n_kv, d).to(q.dtype)  # (FP8 cache: widened)
    values = v_cache.index_select(0, flat_slots).view(n_seqs, max_ctx, heads.n_kv, d).to(q.dtype)
    group = heads.group
    if group:
        kv_heads = heads.n_kv
    else:  # a GQA group split across ranks: give each query head its own copy
        keys = keys.index_select(2, heads.kv_index)
        values = values.index_select(2, heads.kv_index)
        kv_heads, group = heads.n_q, 1
    if meta.decode_only:
        qp = q.view(n_seqs, 1, heads.n_q, d)
    else:
        qp = q.index_select(0, g.q_index.view(-1)).view(n_seqs, -1, heads.n_q, d)
    max_q = qp.shape[1]
    # [seqs, max_q, kv_heads * group, d] -> [seqs, kv_heads, group * max_q, d]
    qp = qp.reshape(n_seqs, max_q, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(n_seqs, kv_heads, group * max_q, d)
    out = F.scaled_dot_product_attention(
        qp, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=g.mask_for_group(group, meta.decode_only),
        scale=heads.scale,
    )  # [seqs, kv_heads, group * max_q, d]
    out = out.view(n_seqs, kv_heads, group, max_q, d).permute(0, 3, 1, 2, 4).reshape(-1, heads.n_q * d)
    return out if meta.decode_only else out.index_select(0, g.unpad_index)  # [tokens, n_q * d]


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                           heads: HeadLayout) -> torch.Tensor:
    """The kernels: K/V read through the block tables, once per KV head for its group of query heads."""
    from .triton_attention import attention

    out = torch.empty(q.shape[0], heads.n_q, heads.head_dim, dtype=q.dtype, device=q.device)
    for launch in meta.launches:
        attention(q, k_cache, v_cache, out, meta, launch, heads)
    return out.view(-1, heads.n_q * heads.head_dim)
