#!/usr/bin/env bash
# Issue 15 on a GPU host (device tool): the attention kernels checked and timed, the torch reference path
# beside them in the same call. Results under $OUT. STAGES picks what runs (default: all, in this order):
#   tests     pytest -m gpu: kernels vs reference, tiny float32 checkpoints vs HF with the kernels on
#   kernels   scripts/attention_bench.py: attention alone (decode GB/s, prefill TFLOP/s, HBM copy, SDPA flash)
#   engine    bench latency, random:llama-3.1-8b: TTFT/TPOT at 8k and 32k prompts (batch 1), both backends;
#             batch 32 x 8k (kernels; the reference ran out of memory there before); batch 1/16 at 128/128
#   serve     shardlm serve + bench serve: 128 concurrent streams, 512-token prompts, 128 new tokens
#             (needs fastapi & co carried in .wheels/)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
STAGES=${STAGES:-tests kernels engine serve}
MODEL=random:llama-3.1-8b
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/env.txt" 2>&1
head -4 "$OUT/env.txt"

for stage in $STAGES; do
  case $stage in
  tests)
    timeout 420 python3 -m pytest -q -m gpu tests/test_attention_kernels.py tests/test_gpu.py -p no:cacheprovider \
      --tb=short -rf > "$OUT/gpu_tests.txt" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | cut -c1-300 | tail -12 ;;
  kernels)
    timeout 300 python3 scripts/attention_bench.py --json "$OUT/attention.json" 2>&1 | tail -20 ;;
  engine)
    bench() {  # name, then bench latency arguments
      local name=$1; shift
      timeout 240 python3 -m shardlm.entrypoints.cli bench latency --model $MODEL --json "$OUT/$name.json" "$@" \
        > "$OUT/$name.log" 2>&1
      grep -E "^ +[0-9]+ " "$OUT/$name.log" | sed "s/^/[$name] /" || tail -3 "$OUT/$name.log"
    }
    for be in ${BACKENDS:-triton torch}; do
      bench "ctx8k-$be" --attention-backend $be --batch-sizes 1 --input-len 8192 --output-len 32 --max-model-len 8300 --repeats 1
      bench "ctx32k-$be" --attention-backend $be --batch-sizes 1 --input-len 32768 --output-len 32 --max-model-len 32900 --repeats 1
      bench "short-$be" --attention-backend $be --batch-sizes 1,16,64 --input-len 128 --output-len 128 --repeats 1
    done
    # 32 prompts of 8k prefill in chunks of 8192 tokens, so the first 32 steps mix prefill and decode: the
    # inter-token p50 of 160 new tokens is a pure decode step of 32 x 8k
    bench "b32x8k-triton" --attention-backend triton --batch-sizes 32 --input-len 8192 --output-len 160 --max-model-len 8400 \
      --max-num-batched-tokens 8192 --repeats 1 ;;
  serve)
    source scripts/serve_lib.sh
    [ -d .wheels ] && python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn prometheus-client httpx 2>&1 | tail -2
    for be in ${BACKENDS:-triton torch}; do
      start_server $be 8111 -- $MODEL --attention-backend $be || continue
      bench_closed_loop $be 8111 $MODEL
      stop_server
    done ;;
  esac
done
