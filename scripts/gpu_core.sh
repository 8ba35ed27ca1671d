#!/usr/bin/env bash
# Core-engine checks and benchmarks on the GPU host (device tool, 4 x H100). Results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m;
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "transformers", transformers.__version__)'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | head -3
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=line -rf 2>&1 | grep -E "Error|passed|failed" | cut -c1-400 | tail -8 | tee "$OUT/gpu_tests.txt"
fi
if [ "${SKIP_HF:-0}" != 1 ]; then
  timeout 240 python3 scripts/hf_baseline.py 1,16 2>&1 | grep '^{' | tee "$OUT/hf_baseline.jsonl" | sed 's/^/[hf-tp1] /'
fi
bench() {  # name, then shardlm args
  local name=$1; shift
  timeout 300 python3 -m shardlm.entrypoints.cli bench latency --batch-sizes 1,16 --input-len 128 --output-len 128 --profile-step \
    --json "$OUT/$name.json" "$@" 2>&1 | grep -v -E "^loading|it/s\]" | tail -6 | sed "s/^/[$name] /"
}
for cfg in ${CONFIGS:-8b-tp1 8b-tp2 8b-tp4 70b-tp4}; do
  case $cfg in
    8b-tp*) bench "llama3-$cfg" --model random:llama-3-8b -tp "${cfg#8b-tp}" ;;
    70b-tp*) bench "llama3-$cfg" --model random:llama-3-70b -tp "${cfg#70b-tp}" ;;
  esac
done
