"""Driver time per engine step spent turning tokens into text, batch 64, SmolLM2's tokenizer (CPU).

Before: the engine decoded each sequence's whole output every step. After: decode_next decodes a
window of the newest tokens. Prints ms per step at several output lengths.
"""
import random
import time

from shardlm.common.model_source import resolve_model
from shardlm.engine.tokenizer import DetokenizerState, decode_next, load_tokenizer

BATCH, LENGTHS = 64, (128, 1024, 4096)
tok = load_tokenizer(resolve_model("smollm2-135m"))
rng = random.Random(0)
text = " ".join(rng.choice(["the", "model", "splits", "across", "GPUs,", "and", "serves", "tokens.", "Grüße", "🙂"])
                for _ in range(6000))
ids = tok.encode(text)[: max(LENGTHS)]
for n in LENGTHS:
    t0 = time.perf_counter()
    for _ in range(BATCH):
        tok.decode(ids[:n], skip_special_tokens=True)
    whole = (time.perf_counter() - t0) * 1e3
    states = [DetokenizerState() for _ in range(BATCH)]
    for s in states:  # bring each sequence to n-1 tokens, then time the step that adds token n
        s.prefix_offset, s.read_offset = n - 3, n - 1
    t0 = time.perf_counter()
    for s in states:
        decode_next(tok, ids[:n], s)
    window = (time.perf_counter() - t0) * 1e3
    print(f"batch {BATCH}, output {n:>5} tokens: whole-output decode {whole:7.2f} ms/step, "
          f"incremental {window:5.2f} ms/step")
