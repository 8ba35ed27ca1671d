"""Token sampling on the output rank: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from ..common.messages import SampledToken, SeqPlan


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

    def sample(self, logits: torch.Tensor, seqs: list[SeqPlan]) -> list[SampledToken]:
        """logits [n, vocab] float32, one row per sequence of `seqs` -> the token picked for each."""
        logprobs = torch.log_softmax(logits, dim=-1)  # of the model's own distribution, as vLLM reports
        tokens = torch.argmax(logits, dim=-1)
        for row, seq in enumerate(seqs):
            p = seq.sampling
            if p.greedy:
                continue
            scores = logits[row] / p.temperature
            if 0 < p.top_k < scores.numel():
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=True)
                cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
                # drop a token once the mass before it already reaches top_p (the top token always stays)
                drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= p.top_p
                scores = scores.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            tokens[row] = torch.multinomial(probs, 1, generator=self._generator(seq.seq_id, p.seed))[0]
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(-1) + 1  # 1 = the most likely token
        want = max((s.sampling.logprobs or 0) for s in seqs)
        top_vals = top_ids = None
        if want:
            top_vals, top_ids = torch.topk(logprobs, want, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        tokens_l, chosen_l, ranks_l = tokens.tolist(), chosen.tolist(), ranks.tolist()
        out = []
        for row, seq in enumerate(seqs):
            k = seq.sampling.logprobs
            top = list(zip(top_ids[row][:k], top_vals[row][:k])) if k else None
            out.append(SampledToken(seq.seq_id, tokens_l[row], chosen_l[row], ranks_l[row], top))
        return out
