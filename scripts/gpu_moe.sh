#!/usr/bin/env bash
# Issue 4 on the GPU host: MoE checks (float32 vs HF at EP=4 and TP-experts=4, grouped GEMM vs loop),
# then random:mixtral-8x7b with tensor-parallel experts (TP=4) vs expert parallel (EP=4): TPOT at
# batch 1 and 32, throughput, and the send/recv (all-to-all) kernel time of one decode step.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
[ -n "${SKIP_TESTS:-}" ] || timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -k "moe or grouped" -p no:cacheprovider 2>&1 | tail -4
for cfg in "tp4-experts:-tp 4" "ep4:-tp 4 --enable-expert-parallel"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  timeout 200 python3 -m shardlm.entrypoints.cli bench latency --model random:mixtral-8x7b $flags --batch-sizes 1,32 \
    --input-len 128 --output-len 64 --profile-step --json "$OUT/mixtral-$name.json" 2>&1 \
    | grep -E "^ +[0-9]|batch|rank" | sed "s/^/[mixtral $name] /"
done
