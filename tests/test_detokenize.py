"""Incremental detokenization: the text given out token by token equals a decode of the whole output."""

import random

import pytest

from shardlm.common.model_source import resolve_model
from shardlm.engine.tokenizer import (
    ByteTokenizer,
    DetokenizerState,
    decode_next,
    load_tokenizer,
)

TEXT = "Grüße, 世界! naïve café — 🙂🚀 x=1.5; \"quotes\" and\nnew lines\ttabs  double  spaces."


def _stream(tok, ids, skip=True):
    state, pieces = DetokenizerState(), []
    for n in range(1, len(ids) + 1):
        pieces.append(decode_next(tok, ids[:n], state, skip))
    pieces.append(decode_next(tok, ids, state, skip, flush=True))
    return pieces


@pytest.fixture(scope="module")
def smollm2_tok():
    return load_tokenizer(resolve_model("smollm2-135m"))


def test_smollm2_tokens_one_at_a_time_give_the_whole_text(smollm2_tok):
    ids = smollm2_tok.encode(TEXT)
    specials = [smollm2_tok.eos_token_ids[0]]
    assert [smollm2_tok.decode([i]) for i in ids[6:8]] == ["\ufffd", "\ufffd"]  # 世 is cut over tokens
    pieces = _stream(smollm2_tok, ids)
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces)  # cut characters wait
    # special tokens at the end and inside a cut character (shown: it breaks the character, as in a
    # decode of the whole output; skipped: the character is whole)
    for seq in (ids + specials, ids[:7] + specials + ids[7:]):
        for skip in (True, False):
            assert "".join(_stream(smollm2_tok, seq, skip)) == smollm2_tok.decode(seq, skip_special_tokens=skip)
    rng = random.Random(0)
    for _ in range(20):  # random ids: the joined pieces still equal the whole decode
        seq = [rng.randrange(0, 49152) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(smollm2_tok, seq)) == smollm2_tok.decode(seq)


def test_byte_tokenizer_holds_back_half_characters():
    tok = ByteTokenizer(512, [2])
    ids = tok.encode("é🙂")[1:]  # 2 + 4 bytes
    pieces = _stream(tok, ids)
    assert pieces == ["", "é", "", "", "", "🙂", ""]
    cut = ids[:-1]  # the output ends inside a character: flushing gives the replacement character
    assert "".join(_stream(tok, cut)) == tok.decode(cut) == "é\ufffd"
    assert "".join(_stream(tok, [300, 72, 301])) == "<|300|>E<|301|>"


def test_stop_strings_found_across_token_boundaries():
    """The engine searches only the newest text for stop strings; a stop string that spans tokens, or
    arrives in pieces, still cuts the text where a search of the whole text would."""
    from shardlm import LLM, SamplingParams

    with LLM("smollm2-135m", device="cpu") as llm:
        def run(**kw):
            out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=24, temperature=0, **kw))[0]
            return out.outputs[0]

        full = run()
        ids = full.token_ids
        # a stop string made of the end of one token and the start of the next, well inside the text
        tok = llm.engine.tokenizer
        head = tok.decode(ids[:6])
        stop = head[-2:] + tok.decode(ids[:7])[len(head):][:2]
        assert len(stop) == 4 and stop in full.text
        cut = run(stop=["never appears", stop])
        assert cut.text == full.text[:full.text.find(stop)]
        assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
        assert run(stop=["never appears"]).text == full.text
