"""The driver's scheduler alone: microseconds per step of Scheduler.schedule() with N running sequences
(512-token prompts, then decodes), no workers. A measuring aid for the replica thread's host work.

    python scripts/scheduler_bench.py [N] [STEPS]
"""

import sys
import time

from shardlm.engine.block_manager import BlockManager
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.scheduler import Scheduler
from shardlm.engine.sequence import Sequence


def us_per_step(n: int, steps: int) -> float:
    sched = Scheduler(BlockManager(60000, 16), 256, 1024)
    params = SamplingParams(max_tokens=1 << 20, temperature=0)
    for i in range(n):
        sched.add(Sequence(i, str(i), 0, list(range(3, 515)), params))
    t0 = time.perf_counter()
    for _ in range(steps):
        for item in sched.schedule():
            item.seq.num_computed = item.start + len(item.tokens)
            if item.sample:
                item.seq.output_ids.append(7)
    return (time.perf_counter() - t0) / steps * 1e6


if __name__ == "__main__":
    n, steps = (int(a) for a in (sys.argv[1:] + ["128", "300"])[:2])
    us_per_step(n, 50)  # warm-up
    print(f"{n} sequences: {us_per_step(n, steps):.0f} us a step")
