#!/usr/bin/env bash
# Issue 6: why does a decode step grow from batch 1 to batch 8 (most at TP=4)? One decode step per
# batch size under torch.profiler on every rank (top kernels, top CPU ops, launches), and unprofiled:
# the host's time to queue the layers vs. the wait after it. CFGS: "name:flags:batches:env" entries
# separated by ';' (env e.g. SHARDLM_GPU_WORKER_THREADS=0 for torch's default thread pool in workers).
# Then PP=4 at batch 32 with MBS micro-batches in flight, with a trace of every rank's steps.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
OUT=${OUT:-out}; mkdir -p "$OUT"
IFS=';' read -ra cfgs <<< "${CFGS:-tp2:-tp 2:1,2,4,8,32:;tp1:-tp 1:1,8:;tp4:-tp 4:1,8:}"
for cfg in "${cfgs[@]}"; do
  IFS=: read -r name flags batches envs <<< "$cfg"
  env $envs timeout 200 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-8b $flags --batch-sizes "$batches" \
    --input-len 128 --output-len 32 --profile-step --json "$OUT/split-$name.json" 2>&1 | grep -E "^ +[0-9]|batch|rank" | sed "s/^/[$name] /"
done
for mb in ${MBS:-4 8}; do
  timeout 150 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-8b -pp 4 --max-batches-in-flight "$mb" \
    --batch-sizes 32 --input-len 128 --output-len 64 --json "$OUT/pp4-mb$mb.json" --trace "$OUT/trace-pp4-mb$mb.json" \
    2>&1 | grep -E "^ +[0-9]|batch" | sed "s/^/[pp4 mb$mb] /"
done
