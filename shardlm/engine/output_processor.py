"""From sampled tokens to what the user sees: text (incremental detokenisation), logprobs, stop checks,
and the RequestOutput of each request."""

from __future__ import annotations

from ..common.messages import PromptLogprobs, SampledToken
from .sequence import CompletionOutput, Logprob, RequestMetrics, RequestOutput, Sequence
from .tokenizer import Tokenizer, decode_next


def logprob_entry(tok: Tokenizer, token: int, logprob: float, rank: int,
                  top: list[tuple[int, float]]) -> dict[int, Logprob]:
    """One position's log-probabilities as vLLM gives them: the token's own, then the most likely ones (their
    rank their place in `top`) that are not it."""
    entry = {token: Logprob(logprob, rank, tok.token_str(token))}
    for r, (tid, lp) in enumerate(top, start=1):
        entry.setdefault(tid, Logprob(lp, r, tok.token_str(tid)))
    return entry


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len

    def append(self, seq: Sequence, sampled: SampledToken) -> tuple[str, int | str | None] | None:
        """Add the sampled token to `seq` (its text and logprobs); return (finish_reason, stop_reason) when
        the sequence ends with it, else None."""
        token, p, tok = sampled.token, seq.params, self.tokenizer
        seq.output_ids.append(token)
        seq.cumulative_logprob += sampled.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(logprob_entry(tok, token, sampled.logprob, sampled.rank, sampled.top or []))
        # only the new token's text: decoding the whole output every step costs O(length) per token
        new = decode_next(tok, seq.output_ids, seq.detok, p.skip_special_tokens)
        seq.text += new
        finish: tuple[str, int | str | None] | None = None
        if len(seq.output_ids) <= p.min_tokens:  # too early to stop (EOS and the stop ids were banned)
            if self.ends_by_length(seq):
                finish = ("length", None)
        elif not p.ignore_eos and token in tok.eos_token_ids:
            finish = ("stop", None)
        elif token in p.stop_token_ids:
            finish = ("stop", token)
        elif p.stop and new and (hit := self._find_stop(seq, len(new))):
            return ("stop", hit)  # the text ends before the stop string; nothing after it is given out
        elif self.ends_by_length(seq):
            finish = ("length", None)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
            if finish is None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
                finish = ("stop", None)  # the grammar is complete: nothing but EOS may follow
        if finish:  # a character still cut between tokens is given out as it is
            seq.text += decode_next(tok, seq.output_ids, seq.detok, p.skip_special_tokens, flush=True)
        return finish

    def add_prompt_logprobs(self, seq: Sequence, p: PromptLogprobs) -> None:
        """A step's prompt log-probabilities into seq.prompt_logprobs (by position: a prompt computed again
        after a preemption or a new worker group writes the same entries)."""
        rows = zip(p.logprob.tolist(), p.rank.tolist(), p.top_ids.tolist(), p.top_logprobs.tolist())
        for pos, (lp, rank, ids, lps) in enumerate(rows, start=p.start + 1):
            seq.prompt_logprobs[pos] = logprob_entry(self.tokenizer, seq.prompt_ids[pos], lp, rank, list(zip(ids, lps)))

    def ends_by_length(self, seq: Sequence, coming: int = 0) -> bool:
        """Whether `seq` ends by length (max_tokens or max_model_len) once `coming` more tokens are added."""
        p = seq.params
        return ((p.max_tokens is not None and len(seq.output_ids) + coming >= p.max_tokens)
                or len(seq) + coming >= self.max_model_len)

    @staticmethod
    def _find_stop(seq: Sequence, new_chars: int) -> str | None:
        """The first stop string (in the request's order) that the newest `new_chars` characters
        complete; the text is cut before it. Earlier text was searched when it arrived."""
        for stop in seq.params.stop:
            pos = seq.text.find(stop, max(0, len(seq.text) - new_chars - len(stop) + 1))
            if pos != -1:
                seq.text = seq.text[:pos]  # vLLM leaves the stop string out of the text
                return stop
        return None

    @staticmethod
    def request_output(request_id: str, prompt: str | None, seqs: list[Sequence],
                       metrics: RequestMetrics, error: str | None = None) -> RequestOutput:
        """A snapshot of the request's completions so far. With best_of > n, the n of the best_of completions
        with the highest cumulative log-probability once all are done (numbered 0 .. n-1 in that order)."""
        finished = all(s.finished for s in seqs)
        prompt_logprobs = next((list(s.prompt_logprobs) for s in seqs if s.prompt_logprobs is not None), None)
        n, best_of = seqs[0].params.n, len(seqs) > seqs[0].params.n
        if best_of:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:n] if finished else seqs[:n]
        outs = [CompletionOutput(i if best_of else s.index, s.text, list(s.output_ids), s.cumulative_logprob,
                                 list(s.logprobs) if s.logprobs is not None else None, s.finish_reason,
                                 s.stop_reason) for i, s in enumerate(seqs)]
        return RequestOutput(request_id, prompt, seqs[0].prompt_ids, outs, finished, metrics, error, prompt_logprobs)
