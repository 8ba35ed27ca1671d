#!/usr/bin/env bash
# Issue 3 on the GPU host: PP vs TP for random:llama-3-8b. TTFT/TPOT at batch 1, throughput at
# batch 32 and 64, and each rank's idle fraction (the bubble) from the engine's own accounting.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
for cfg in "pp2:-pp 2" "pp4:-pp 4" "tp2pp2:-tp 2 -pp 2" "tp2:-tp 2" "tp4:-tp 4"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  timeout 200 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-8b $flags --batch-sizes ${BATCHES:-1,32,64} \
    --input-len 128 --output-len 64 --json "$OUT/pp-$name.json" 2>&1 | grep -E "^ +[0-9]|batch" | sed "s/^/[$name] /"
done
timeout 120 python3 -m shardlm.entrypoints.cli generate --model random:llama-3-8b -tp 2 -pp 2 --max-tokens 32 --ignore-eos \
  --trace "$OUT/trace-tp2pp2.json" "hello" > /dev/null 2>&1 && echo "trace written"
