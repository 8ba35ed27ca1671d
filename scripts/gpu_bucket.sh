#!/usr/bin/env bash
# Does padding the attention context to a fixed bucket (stable SDPA shapes) remove the per-step overhead?
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
for bucket in 1 256; do
  SHARDLM_CTX_BUCKET=$bucket timeout 120 python3 -m shardlm.cli bench latency --model random:llama-3-8b --batch-sizes 1,16 \
    --input-len 128 --output-len 64 --json "$OUT/8b-tp1-bucket$bucket.json" 2>&1 | grep -E "^ +[0-9]" | sed "s/^/[8b tp1 bucket=$bucket] /"
done
