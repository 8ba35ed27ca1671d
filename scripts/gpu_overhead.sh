#!/usr/bin/env bash
# Where does the ~40 ms fixed per-step host overhead come from? (docs/PERFORMANCE.md, issue 6)
# 1. SDPA alone with a key length that grows every call (decode) vs a fixed one, per backend;
# 2. the engine's decode step for 8B TP=1 as is, with the context padded to 256-token buckets, and
#    with the cuDNN SDPA backend switched off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 scripts/sdpa_shapes.py 2>&1 | tee "$OUT/sdpa_shapes.txt"
for cfg in "default:" "bucket256:SHARDLM_CTX_BUCKET=256" "nocudnn:SHARDLM_CUDNN_SDPA=0"; do
  name=${cfg%%:*}; envs=${cfg#*:}
  env $envs timeout 150 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-8b --batch-sizes 1,16 \
    --input-len 128 --output-len 64 --json "$OUT/overhead-$name.json" 2>&1 | grep -E "^ +[0-9]" | sed "s/^/[8b tp1 $name] /"
done
