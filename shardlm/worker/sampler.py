"""Token sampling on the output rank: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

A row whose sampling fails (its values break the arithmetic, or its distribution is not finite) comes
back with `error` set: the engine ends that request alone, and the other rows are sampled as usual.
SamplingParams bounds every value so this should not happen; it is the last line of defence.
"""

from __future__ import annotations

import torch

from ..common.messages import SampledToken, SamplingSpec, SeqPlan


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        # seeded requests keep one generator for their whole life, so a seed reproduces a completion
        self.generators: dict[int, torch.Generator] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.generators.pop(sid, None)

    def _generator(self, seq_id: int, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self.generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[seq_id] = gen
        return gen

    @staticmethod
    def _probs(logits: torch.Tensor, p: SamplingSpec) -> torch.Tensor:
        """One row's sampling distribution after temperature, top-k and top-p."""
        scores = logits / p.temperature
        if 0 < p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            sorted_probs = torch.softmax(sorted_scores, dim=-1)
            # drop a token once the mass before it already reaches top_p; the top token always stays
            # (a top_p too small for float32 rounds to 0 and would otherwise drop it too)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            drop[0] = False
            scores = scores.scatter(0, order[drop], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def sample(self, logits: torch.Tensor, seqs: list[SeqPlan]) -> list[SampledToken]:
        """logits [n, vocab] float32, one row per sequence of `seqs` -> the token picked for each."""
        logprobs = torch.log_softmax(logits, dim=-1)  # of the model's own distribution, as vLLM reports
        tokens = torch.argmax(logits, dim=-1)
        errors: dict[int, str] = {}
        probs: dict[int, torch.Tensor] = {}
        for row, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                try:
                    probs[row] = self._probs(logits[row], seq.sampling)
                except Exception as exc:  # noqa: BLE001 - this row's values broke it: fail this request alone
                    errors[row] = _failure(seq.sampling, exc)
        if probs:  # one check (one device sync) for every sampled row
            finite = torch.isfinite(torch.stack(list(probs.values()))).all(-1).tolist()
            for (row, row_probs), ok in zip(probs.items(), finite):
                seq = seqs[row]
                try:
                    if not ok:
                        raise ValueError("the sampling distribution has NaN or infinite values")
                    gen = self._generator(seq.seq_id, seq.sampling.seed)
                    tokens[row] = torch.multinomial(row_probs, 1, generator=gen)[0]
                except Exception as exc:  # noqa: BLE001 - as above
                    errors[row] = _failure(seq.sampling, exc)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(-1) + 1  # 1 = the most likely token
        want = min(max((s.sampling.logprobs or 0) for s in seqs), logprobs.shape[-1])
        top_vals = top_ids = None
        if want:
            top_vals, top_ids = torch.topk(logprobs, want, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        tokens_l, chosen_l, ranks_l = tokens.tolist(), chosen.tolist(), ranks.tolist()
        out = []
        for row, seq in enumerate(seqs):
            if row in errors:
                out.append(SampledToken(seq.seq_id, 0, 0.0, 0, None, error=errors[row]))
                continue
            k = seq.sampling.logprobs
            top = list(zip(top_ids[row][:k], top_vals[row][:k])) if k else None
            out.append(SampledToken(seq.seq_id, tokens_l[row], chosen_l[row], ranks_l[row], top))
        return out


def _failure(p: SamplingSpec, exc: Exception) -> str:
    return (f"sampling failed with temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k}, seed={p.seed}: "
            f"{exc}; change these values")
