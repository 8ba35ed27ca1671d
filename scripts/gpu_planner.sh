#!/usr/bin/env bash
# Issue 6 on the GPU host: probe the machine, then measure what the planner will predict.
# Afterwards, here: shardlm plan --validate $OUT/bench-tp*.json --profile $OUT/probe.json --gpu h100-80gb
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 200 python3 -m shardlm.cli probe --out "$OUT/probe.json" 2>&1 | grep -v -E "it/s\]|_warn_once|warn\(" | tail -8
for tp in ${TPS:-1 2 4}; do
  timeout 200 python3 -m shardlm.cli bench latency --model random:llama-3-8b -tp "$tp" --batch-sizes 1,8,32 \
    --input-len 128 --output-len 64 --json "$OUT/bench-tp$tp.json" 2>&1 | grep -E "^ +[0-9]|batch" | sed "s/^/[tp$tp] /"
done
