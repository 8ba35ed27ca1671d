#!/usr/bin/env bash
# Issue 17 on a host of 2+ GPUs (device tool): the peer-memory all-reduce against NCCL in the same call.
# STAGES picks what runs: checks latency 70b straggler. Results under $OUT (tar them).
#   checks    scripts/allreduce_bench.py (every path against NCCL, eager and in graphs; times in graphs;
#             --save: the limits the engine then reads), the GPU tests of TP, each GPU's start-up GEMV rate
#   latency   random:llama-3-8b batch 1 and 16: TP=1, TP=N with NCCL only (--disable-custom-all-reduce), TP=N
#   70b       random:llama-3-70b at TP=2, NCCL only against the peer path, batch 1
#   straggler TP=2 with rank 1's start-up GEMV slowed 3x (SHARDLM_SLOW_RANK): the warning, /metrics names
# With .baseline/ (a `git archive` of an earlier commit) the all-reduce sweep, TP=N and 70B also run on that
# engine in the same call (names ending -base): the previous kernels as a second baseline beside NCCL.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
STAGES=${STAGES:-checks latency}
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
TP=${TP:-$GPUS}
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
if [[ $STAGES == *checks* ]]; then
  if [ -d .baseline ]; then
    echo "[base]"; (cd .baseline && PYTHONPATH=$PWD timeout 200 python3 scripts/allreduce_bench.py --world "$TP" \
      --json "$OUT/allreduce-base.json" 2>&1 | tail -12)
  fi
  timeout 300 python3 scripts/allreduce_bench.py --world "$TP" --json "$OUT/allreduce.json" --save 2>&1 | tail -16
  timeout 300 python3 -m pytest -q -m "gpu or not gpu" tests/test_gpu.py -k "${TESTS:-peer or tp2_greedy or bf16_tp or float32_matches_hf}" \
    -p no:cacheprovider --tb=short -rf > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | tail -6
  python3 - <<'EOF'
import torch
from shardlm.worker.probe import gemv_rate
for i in range(torch.cuda.device_count()):
    print(f"GPU {i}: start-up GEMV {gemv_rate(torch.device('cuda', i)):,.0f} GB/s")
EOF
fi
latency() {  # name, model, flags...; a name ending -base runs the engine in .baseline/
  local name=$1 model=$2 dir=$PWD; shift 2
  [[ $name == *-base ]] && dir=$PWD/.baseline  # (python -m imports from the working directory first)
  [ -d "$dir" ] || return 0
  (cd "$dir" && PYTHONPATH=$dir timeout 280 python3 -m shardlm.entrypoints.cli bench latency --model "$model" "$@" \
    --input-len 128 --output-len 128 --profile-step --json "$OUT/latency-$name.json") > "$OUT/latency-$name.log" 2>&1
  grep -E "^ +[0-9]+ |slowest|all-reduce|straggler" "$OUT/latency-$name.log" | sed "s/^/[$name] /" || tail -3 "$OUT/latency-$name.log"
}
if [[ $STAGES == *latency* ]]; then
  latency tp1 random:llama-3-8b -tp 1 --batch-sizes 1,16
  latency "tp$TP-nccl" random:llama-3-8b -tp "$TP" --disable-custom-all-reduce --batch-sizes 1,16
  latency "tp$TP-base" random:llama-3-8b -tp "$TP" --batch-sizes 1,16
  latency "tp$TP" random:llama-3-8b -tp "$TP" --batch-sizes 1,16
fi
if [[ $STAGES == *70b* ]]; then
  latency 70b-tp2-nccl random:llama-3-70b -tp 2 --disable-custom-all-reduce --batch-sizes 1
  latency 70b-tp2-base random:llama-3-70b -tp 2 --batch-sizes 1
  latency 70b-tp2 random:llama-3-70b -tp 2 --batch-sizes 1
fi
if [[ $STAGES == *straggler* ]]; then
  SHARDLM_SLOW_RANK=1:3 latency straggler random:llama-3-8b -tp 2 --batch-sizes 1
fi
