"""Where does a decode step's host time go? One process, one GPU, the engine's ModelRunner under cProfile."""
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

from shardlm.common.layout import ParallelLayout
from shardlm.common.messages import SeqPlan, StepPlan
from shardlm.common.model_source import resolve_model
from shardlm.worker.distributed import init_distributed
from shardlm.worker.model_runner import ModelRunner

model = sys.argv[1] if len(sys.argv) > 1 else "random:probe-tiny"
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
ctx = init_distributed(ParallelLayout(), 0, "nccl", "tcp://127.0.0.1:29533", dev)
spec = resolve_model(model)
runner = ModelRunner(spec, ctx, torch.bfloat16, 1024, 16, expert_placement=None, cuda_graphs=False, max_num_seqs=256,
                     max_seq_len_to_capture=1024)
runner.load(False)
if len(sys.argv) > 2 and sys.argv[2] == "engine":  # size the cache the way the engine does
    runner.allocate_kv(runner.kv_capacity(0.9, 0, 2048)["blocks"])
else:
    runner.allocate_kv(int(sys.argv[2]) if len(sys.argv) > 2 else 64)
plan = StepPlan([SeqPlan(0, [5], 100, list(range(8)), sample=True)])
for _ in range(5):
    runner.execute(plan)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    runner.execute(plan)
print(f"{model}: {runner.num_blocks} KV blocks: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms per decode step", flush=True)
if len(sys.argv) > 3:
    sys.exit(0)
prof = cProfile.Profile()
prof.enable()
for _ in range(10):
    runner.execute(plan)
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
dist.destroy_process_group()
