#!/usr/bin/env bash
# Issue 7, the 4-GPU reference row: random:llama-3-70b at TP=4, prompt 512, 128 output tokens,
# batch 1 and 32, with a profiled decode step (communication share).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 300 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-70b -tp 4 --batch-sizes ${BATCHES:-1,32} \
  --input-len 512 --output-len 128 --profile-step --json "$OUT/70b-tp4.json" 2>&1 | grep -E "^ +[0-9]|batch|rank" | sed "s/^/[70b tp4] /"
