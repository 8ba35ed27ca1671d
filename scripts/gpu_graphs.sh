#!/usr/bin/env bash
# CUDA-graph decode on the GPU host: the GPU tests against HF, then each layout eager and with graphs,
# taking turns in one call (compare the ratio, not the single times). Results under $OUT.
# LAYOUTS: name:flags entries separated by ';' (default TP 1 and 2). BATCHES (default 1,8,32).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
OUT=${OUT:-out}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())'; } > "$OUT/env.txt" 2>&1
head -4 "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short -rfs 2>&1 \
    | tee "$OUT/gpu_tests.txt" | grep -E "Error|error|passed|failed|SKIP" | cut -c1-300 | tail -12
fi
IFS=';' read -ra layouts <<< "${LAYOUTS:-tp1:-tp 1;tp2:-tp 2}"
for cfg in "${layouts[@]}"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  for mode in eager graphs; do
    extra=""; [ $mode = eager ] && extra="--enforce-eager"
    timeout 240 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-8b $flags $extra --batch-sizes "${BATCHES:-1,8,32}" \
      --repeats "${REPEATS:-1}" --input-len 128 --output-len 64 --json "$OUT/bench-$name-$mode.json" 2>&1 \
      | grep -E "^ +[0-9]|batch|Error|error" | cut -c1-300 | sed "s/^/[$name $mode] /"
  done
done
