"""Token sampling on the output rank: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

The whole batch is sampled with a fixed handful of tensor operations, whatever its mix of settings, and
nothing waits for the device: `sample` returns the tokens as a device tensor (what the next step reads
under async scheduling) and starts one device-to-host copy of everything the driver needs (token,
its log-probability and rank, the top log-probabilities, whether the row could be sampled). `result()`
waits for that copy alone.

Random rows draw with the exponential race (argmax of p / E, E ~ Exp(1), picks token i with probability
p_i): one noise tensor for the batch; a seeded row draws its noise from its own generator, kept for the
request's life, so a seed reproduces a completion.

Before the pick (greedy or random) a row's logits may change, as vLLM orders it: its banned tokens
(min_tokens: EOS and the stop ids) to -inf, logit_bias added, then the penalties (repetition over the
prompt and the completion so far, frequency and presence over the completion). A penalized sequence's
token counts live on the device, a row of `Penalties` for its life: seeded from SeqPlan.history on the
step that ends its (re)prefill, then counted as tokens are picked, so no step sends them again. Random
rows then apply temperature, min_p, top-k and top-p. Log-probabilities stay those of the model's own
distribution (the logits before any of this), as vLLM reports by default.

A row whose sampling fails (its values break the arithmetic, or its distribution is not finite) comes
back with `error` set: the engine ends that request alone, and the other rows are sampled as usual.
SamplingParams bounds every value so this should not happen; it is the last line of defence.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..common.messages import SampledToken, SamplingSpec, SeqPlan

_TOKEN, _LOGPROB, _RANK, _OK = range(4)
"""columns of the packed result; the top ids and then the top log-probabilities follow"""


class SampleBatch:
    """One step's sampled rows: `tokens` on the device at once, the rest after one copy to the host."""

    def __init__(self, seqs: list[SeqPlan], tokens: torch.Tensor, packed: torch.Tensor, want: int,
                 errors: dict[int, str]):
        self.seqs, self.tokens, self.want, self.errors = seqs, tokens, want, errors
        self.logits: torch.Tensor | None = None  # the rows' logits, kept when a plan asks for them back
        self.event = None
        if packed.is_cuda:  # into pinned memory without waiting; result() waits for this copy only
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = packed

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def result(self) -> list[SampledToken]:
        if self.event is not None:
            self.event.synchronize()
        w, out = self.want, []
        for row, (seq, vals) in enumerate(zip(self.seqs, self.host.tolist())):
            error = self.errors.get(row)
            if error is None and not vals[_OK]:
                error = _failure(seq.sampling, ValueError("the sampling distribution has NaN or infinite values"))
            if error is not None:
                out.append(SampledToken(seq.seq_id, 0, 0.0, 0, None, error=error))
                continue
            k = seq.sampling.logprobs
            top = [(int(t), v) for t, v in zip(vals[4: 4 + k], vals[4 + w: 4 + w + k])] if k else None
            out.append(SampledToken(seq.seq_id, int(vals[_TOKEN]), vals[_LOGPROB], int(vals[_RANK]), top))
        return out


class Penalties:
    """Token counts of the penalized sequences on the device: row `slots[seq_id]` of `counts` (times each
    token was sampled) and `seen` (in the prompt or sampled). Rows are reused; the pool doubles when full."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: dict[int, int] = {}
        self.free: list[int] = []
        self.counts = self.seen = None

    @staticmethod
    def row_bytes(vocab: int) -> int:
        """device bytes of one sequence's row (counts int32 + seen bool)"""
        return vocab * 5

    def slot(self, seq_id: int, vocab: int) -> int:
        if seq_id in self.slots:
            return self.slots[seq_id]
        if not self.free:
            size = 0 if self.counts is None else self.counts.shape[0]
            grown = max(8, 2 * size)
            counts = torch.zeros(grown, vocab, dtype=torch.int32, device=self.device)
            seen = torch.zeros(grown, vocab, dtype=torch.bool, device=self.device)
            if size:
                counts[:size].copy_(self.counts)
                seen[:size].copy_(self.seen)
            self.counts, self.seen = counts, seen
            self.free = list(range(grown - 1, size - 1, -1))
        self.slots[seq_id] = self.free.pop()
        return self.slots[seq_id]

    def seed(self, seq_id: int, vocab: int, prompt_len: int, ids: list[int]) -> None:
        """(Re)start a sequence's counts from its prompt and completion so far."""
        row = self.slot(seq_id, vocab)
        self.counts[row].zero_()
        self.seen[row].zero_()
        if ids:
            every = _to(self.device, ids, torch.long)
            self.seen[row].index_fill_(0, every, True)
            if len(ids) > prompt_len:
                out = every[prompt_len:]
                self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def forget(self, seq_id: int) -> None:
        row = self.slots.pop(seq_id, None)
        if row is not None:
            self.free.append(row)

    def save(self) -> tuple:
        return (dict(self.slots), list(self.free),
                None if self.counts is None else (self.counts.clone(), self.seen.clone()))

    def restore(self, saved: tuple) -> None:
        self.slots, self.free, pool = saved
        self.counts, self.seen = pool if pool is not None else (None, None)


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        # seeded requests keep one generator for their whole life, so a seed reproduces a completion
        self.generators: dict[int, torch.Generator] = {}
        self.penalties = Penalties(device)

    def forget(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.generators.pop(sid, None)
            self.penalties.forget(sid)

    def save_state(self) -> tuple:
        """What a sampled step changes (seeded generators, penalty counts): a step run only to be measured
        (profiling) is undone with restore_state, so the requests' tokens stay those of an unprofiled run."""
        return {sid: g.get_state() for sid, g in self.generators.items()}, self.penalties.save()

    def restore_state(self, saved: tuple) -> None:
        states, penalties = saved
        self.generators = {sid: g for sid, g in self.generators.items() if sid in states}
        for sid, state in states.items():
            self.generators[sid].set_state(state)
        self.penalties.restore(penalties)

    def _generator(self, seq_id: int, seed: int) -> torch.Generator:
        gen = self.generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[seq_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, seqs: list[SeqPlan], masks: np.ndarray | None = None) -> SampleBatch:
        """logits [n, vocab] float32, one row per sequence of `seqs` -> the token picked for each. masks: the
        plan's structured-output bitmasks (StepPlan.masks)."""
        n, vocab = logits.shape
        for s in seqs:
            if s.history is not None:
                self.penalties.seed(s.seq_id, vocab, *s.history)
        adjusted = [i for i, s in enumerate(seqs) if s.sampling.adjusts_logits or s.ban or s.mask_row is not None]
        scores = self._adjust(logits, adjusted, seqs, masks) if adjusted else logits
        tokens = _argmax(scores)
        lse = _logsumexp(logits)  # log-probabilities are of the model's own distribution, as vLLM reports
        ok = torch.ones(n, dtype=torch.bool, device=logits.device)
        errors: dict[int, str] = {}
        rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if rows:
            picked, finite = self._draw(scores, rows, [seqs[i] for i in rows], errors)
            index = _to(logits.device, rows, torch.long)
            tokens.index_copy_(0, index, torch.where(finite, picked, 0))
            ok.index_copy_(0, index, finite)
        penalized = [i for i in adjusted if seqs[i].sampling.penalized]
        if penalized:  # count the picked tokens where the next step's penalties read them
            p = self.penalties
            slots = _to(logits.device, [p.slot(seqs[i].seq_id, vocab) for i in penalized], torch.long)
            picked = tokens.index_select(0, _to(logits.device, penalized, torch.long))
            p.counts.index_put_((slots, picked), torch.ones_like(picked, dtype=torch.int32), accumulate=True)
            p.seen.index_put_((slots, picked), torch.ones_like(picked, dtype=torch.bool))
        chosen = logits.gather(1, tokens.unsqueeze(1))
        ranks = _chunked(logits > chosen).sum(-1).sum(-1) + 1  # 1 = the most likely token
        want = min(max((s.sampling.logprobs or 0) for s in seqs), vocab)
        columns = [tokens.double(), (chosen.squeeze(1) - lse).double(), ranks.double(), ok.double()]
        packed = torch.stack(columns, dim=1)
        if want:
            top_vals, top_ids = torch.topk(logits, want, dim=-1)
            packed = torch.cat([packed, top_ids.double(), (top_vals - lse.unsqueeze(1)).double()], dim=1)
        return SampleBatch(seqs, tokens, packed, want, errors)

    def _adjust(self, logits: torch.Tensor, rows: list[int], seqs: list[SeqPlan], masks: np.ndarray | None
                ) -> torch.Tensor:
        """The logits with rows `rows` changed by their bans, biases, penalties and grammars (a copy)."""
        dev, vocab = logits.device, logits.shape[1]
        index = _to(dev, rows, torch.long)
        sub = logits.index_select(0, index)
        where, tokens, values = [], [], []  # (row of sub, token, added): bias, and -inf for a ban
        for j, i in enumerate(rows):
            s = seqs[i]
            for t, bias in s.sampling.logit_bias:
                where.append(j), tokens.append(t), values.append(bias)
            for t in s.ban or ():
                where.append(j), tokens.append(t), values.append(float("-inf"))
        if where:
            sub.index_put_((_to(dev, where, torch.long), _to(dev, tokens, torch.long)), _to(dev, values),
                           accumulate=True)
        pen = [j for j, i in enumerate(rows) if seqs[i].sampling.penalized]
        if pen:
            specs = [seqs[rows[j]].sampling for j in pen]
            slots = _to(dev, [self.penalties.slot(seqs[rows[j]].seq_id, vocab) for j in pen], torch.long)
            counts = self.penalties.counts.index_select(0, slots).float()
            seen = self.penalties.seen.index_select(0, slots)
            local = _to(dev, pen, torch.long)
            x = sub.index_select(0, local)
            rp = _to(dev, [p.repetition_penalty for p in specs]).unsqueeze(1)
            x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
            x = (x - _to(dev, [p.frequency_penalty for p in specs]).unsqueeze(1) * counts
                 - _to(dev, [p.presence_penalty for p in specs]).unsqueeze(1) * (counts > 0))
            sub.index_copy_(0, local, x)
        constrained = [j for j, i in enumerate(rows) if seqs[i].mask_row is not None]
        if constrained:  # every token the grammar does not allow next: -inf
            words = torch.from_numpy(masks[[seqs[rows[j]].mask_row for j in constrained]]).to(dev, non_blocking=True)
            bits = (words.unsqueeze(-1) >> torch.arange(32, device=dev, dtype=torch.int32)) & 1
            allowed = bits.reshape(len(constrained), -1)[:, :vocab].bool()
            local = _to(dev, constrained, torch.long)
            sub.index_copy_(0, local, sub.index_select(0, local).masked_fill(~allowed, float("-inf")))
        scores = logits.clone()
        scores.index_copy_(0, index, sub)
        return scores

    def _draw(self, logits: torch.Tensor, rows: list[int], seqs: list[SeqPlan],
              errors: dict[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the non-greedy rows (indices `rows` of logits) after temperature, top-k and top-p:
        (their tokens, whether each row's distribution was finite). A row whose generator cannot be made
        goes into `errors`."""
        vocab, dev = logits.shape[1], logits.device
        specs = [s.sampling for s in seqs]
        scores = logits.index_select(0, _to(dev, rows, torch.long)) / _to(dev, [p.temperature for p in specs]).unsqueeze(1)
        if any(p.min_p > 0 for p in specs):  # p_i < min_p * p_max, in log space: s_i - s_max < log(min_p)
            floor = scores.amax(-1, keepdim=True) + torch.log(_to(dev, [p.min_p for p in specs])).unsqueeze(1)
            scores = scores.masked_fill(scores < floor, float("-inf"))
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in specs]
        if any(ks):
            k = _to(dev, ks, torch.long)
            kth = torch.topk(scores, max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
            kth = torch.where(k.unsqueeze(1) > 0, kth, float("-inf"))
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in specs):
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_scores, dim=-1)
            # drop a token once the mass before it already reaches top_p; the top token always stays
            # (a top_p too small for float32 rounds to 0 and would otherwise drop it too)
            top_p = _to(dev, [p.top_p for p in specs]).unsqueeze(1)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
            drop[:, 0] = False
            scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        # (never exactly 0: a token of probability 0 would get 0 / 0 = NaN, which argmax takes as the largest)
        noise = torch.empty_like(probs).exponential_()
        for j, (seq, p) in enumerate(zip(seqs, specs)):
            if p.seed is not None:
                try:
                    noise[j].exponential_(generator=self._generator(seq.seq_id, p.seed))
                except Exception as exc:  # noqa: BLE001 - this row's seed broke it: fail this request alone
                    errors[rows[j]] = _failure(p, exc)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return _argmax(probs / noise), torch.isfinite(probs).all(-1)


@lru_cache
def _parts(vocab: int) -> int:
    """How many equal parts a vocabulary-wide reduction is cut into. A reduction over one long row runs in one
    thread block, on one SM (an H200 took ~28 us for argmax and for log_softmax over a 128k vocabulary at
    batch 1); cut into up to 256 parts of at least 256 entries, a few rows spread over the whole GPU."""
    return next((p for p in range(256, 1, -1) if vocab % p == 0 and vocab // p >= 256), 1)


def _chunked(x: torch.Tensor) -> torch.Tensor:
    """[n, vocab] -> a view [n, parts, vocab / parts]"""
    return x.view(x.shape[0], _parts(x.shape[1]), -1)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [n, vocab] tensor (the first of equal maxima, NaN the largest, as torch) in two
    short reductions: each part's maximum, then the best part."""
    vals, idx = _chunked(x).max(-1)
    best = vals.argmax(-1, keepdim=True)
    return (best * (x.shape[1] // vals.shape[1]) + idx.gather(1, best)).squeeze(1)


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, -1) of a [n, vocab] tensor, in two short reductions"""
    return torch.logsumexp(torch.logsumexp(_chunked(x), -1), -1)


def _to(device: torch.device, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small host list on the device without waiting for the device (torch.tensor(..., device=cuda) copies
    synchronously, which would wait for the whole forward queued before it)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _failure(p: SamplingSpec, exc: Exception) -> str:
    return (f"sampling failed with temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k}, seed={p.seed}: "
            f"{exc}; change these values")
