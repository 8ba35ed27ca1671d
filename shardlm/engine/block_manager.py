"""KV block manager (driver side) with automatic prefix caching of full blocks.

A sequence's KV cache is a list of fixed-size blocks (its block table). With prefix caching, a
block becomes *cached* once it is full and its K/V have been computed: it is then identified by a
hash chained over its parent block's hash and its own token ids, so one hash stands for the whole
token prefix up to the end of the block. A sequence admitted later with the same prefix takes those
blocks (reference count + 1) instead of recomputing them.

Shared blocks are never written again, so no copy-on-write is needed: only full, computed blocks
are cached, a sequence writes only at positions >= its num_computed, and a prefix hit always ends on
a block boundary, so the sequence's next token goes into a new block of its own.

Blocks whose reference count drops to 0 go back to the free list, or, if cached, to an LRU set of
evictable blocks that stay findable by hash until their memory is needed (then the least recently
released one is evicted). Blocks in use (reference count > 0) are never handed out again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from .sequence import Sequence
from .stats import BlockStats


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    """Identity of a full block: SHA-256 over the parent block's hash and this block's token ids.

    A strong hash, so equal hashes mean equal whole prefixes (no token comparison needed); the
    first block's parent is b"".
    """
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Fixed-size KV blocks with reference counts; a sequence's blocks form its block table.

    Metrics (prefix caching): `prefix_queries` counts the tokens of sequences looked up at
    admission, `prefix_hits` the tokens found cached, `hit_rate` is their ratio and
    `num_cached_blocks` how many blocks are findable by hash right now (in use or evictable).
    `enable_prefix_caching=False` gives plain private blocks and a FIFO free list.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # unowned and holding nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unowned but cached; least recently used first
        self.refcount = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block
        self._seq_hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its leading full, computed blocks
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- sizes and metrics --------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out: free ones plus evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    # ---- prefix caching -------------------------------------------------------------------------
    def stats(self) -> BlockStats:
        return BlockStats(self.num_blocks, self.usage, self.prefix_queries, self.prefix_hits)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Longest chain of cached blocks matching the start of `seq`'s tokens; takes nothing.

        At most (len(seq) - 1) // block_size blocks, so at least one token is left to compute
        (the step must produce logits). Only for a sequence that holds no blocks.
        """
        if not self.enable_prefix_caching or seq.blocks or seq.num_computed or seq.prompt_logprobs is not None:
            return []  # (prompt log-probabilities need the whole prompt computed)
        ids, bs, parent, found = seq.all_ids, self.block_size, b"", []
        for i in range((len(ids) - 1) // bs):
            h = block_hash(parent, ids[i * bs:(i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
            parent = h
        return found

    def admit(self, seq: Sequence, prefix: list[int]) -> None:
        """Start `seq` (no blocks yet) on the cached blocks `prefix` from match_prefix; count metrics."""
        assert not seq.blocks and seq.num_computed == 0
        for block in prefix:
            if self.refcount[block] == 0:
                del self.evictable[block]
            self.refcount[block] += 1
        seq.blocks = list(prefix)
        seq.num_computed = len(prefix) * self.block_size
        if self.enable_prefix_caching:
            self._seq_hashes[seq.seq_id] = [self.hash_of[b] for b in prefix]
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """Cache the blocks of `seq` that have become full and computed (num_computed covers them)."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        full = min(seq.num_computed // self.block_size, len(seq.blocks))
        if len(hashes) >= full:
            return
        ids, bs = seq.all_ids, self.block_size
        for i in range(len(hashes), full):
            h = block_hash(hashes[-1] if hashes else b"", ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = seq.blocks[i]
            # the same prefix may already be cached from another sequence that computed it in the
            # same step: then this copy stays private and is freed with the sequence
            if h not in self.cached and self.hash_of[block] is None:
                self.cached[h] = block
                self.hash_of[block] = h

    # ---- allocation ---------------------------------------------------------------------------
    def can_grow(self, seq: Sequence, num_tokens: int, prefix: Seq[int] = ()) -> bool:
        """Whether `seq` (after taking the cached `prefix`, if given) can hold `num_tokens` tokens."""
        needed = self.blocks_for(num_tokens) - len(seq.blocks) - len(prefix)
        if needed <= 0:
            return True
        reclaimed = sum(1 for b in prefix if self.refcount[b] == 0) if prefix else 0  # evictable hits stop being free
        return needed <= self.num_free_blocks - reclaimed

    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:  # evict the least recently released cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of[block]]
            self.hash_of[block] = None
        self.refcount[block] = 1
        return block

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_tokens` tokens (caller checked can_grow)."""
        while len(seq.blocks) < self.blocks_for(num_tokens):
            seq.blocks.append(self._take())

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its full computed blocks stay cached (evictable) once unowned."""
        self.commit(seq)
        for block in seq.blocks:
            self.refcount[block] -= 1
            assert self.refcount[block] >= 0, f"block {block} released twice"
        # the tail of a prefix is released first, so it is evicted before the blocks it extends
        for block in reversed(seq.blocks):
            if self.refcount[block] == 0 and self.hash_of[block] is not None:
                self.evictable[block] = None
        self.free.extend(b for b in seq.blocks if self.refcount[b] == 0 and self.hash_of[b] is None)
        seq.blocks = []
        self._seq_hashes.pop(seq.seq_id, None)
