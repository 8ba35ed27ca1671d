#!/usr/bin/env bash
# Issue 16 on a GPU host (device tool): async scheduling against the synchronous engine in the same call
# (--no-async-scheduling), random:llama-3-8b, 1 x H200. STAGES picks what runs: tests latency serve moe.
# LATENCY_VARIANTS: sync, async, base (the defaults on the engine in .baseline/, a `git archive` of an earlier
# commit that the caller carries: the previous engine run in the same call). Results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
MODEL=${MODEL:-random:llama-3-8b}
STAGES=${STAGES:-tests latency serve}
# sync: the engine without async scheduling (the baseline); async: the defaults; async-1024, async-2048: with
# that step budget; nostep: without the mixed-step graphs (SHARDLM_NO_STEP_GRAPHS=1)
variant_flag() { case $1 in sync) echo --no-async-scheduling;; async-1024) echo --max-num-batched-tokens 1024;;
                 async-2048) echo --max-num-batched-tokens 2048;; esac; }
variant_env() { [ "$1" = nostep ] && echo SHARDLM_NO_STEP_GRAPHS=1 || echo SHARDLM_NO_STEP_GRAPHS=0; }
if [[ $STAGES == *tests* ]]; then
  timeout 300 python3 -m pytest -q -m "gpu or not gpu" tests/test_async_scheduling.py tests/test_sampling.py \
    "tests/test_gpu.py" tests/test_attention_kernels.py tests/test_step_graphs.py \
    -k "async or sampl or norm or float32_matches_hf or bf16_tp or kernel or graph or mixed or moe" \
    -p no:cacheprovider --tb=short -rf > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | tail -8
fi
if [[ $STAGES == *latency* ]]; then
  for variant in ${LATENCY_VARIANTS:-sync async}; do
    dir=$PWD; [ $variant = base ] && dir=$PWD/.baseline  # (python -m imports from the working directory first)
    (cd "$dir" && PYTHONPATH=$dir timeout 220 python3 -m shardlm.entrypoints.cli bench latency $(variant_flag $variant) \
      $([ $variant != sync ] && echo --profile-step) \
      --model $MODEL --batch-sizes 1,16,64 --input-len 128 --output-len 128 --repeats 2 --json "$OUT/latency-$variant.json") \
      > "$OUT/latency-$variant.log" 2>&1
    grep -E "^ +[0-9]+ " "$OUT/latency-$variant.log" | sed "s/^/[$variant] /" || tail -3 "$OUT/latency-$variant.log"
  done
fi
if [[ $STAGES == *serve* ]]; then
  source scripts/serve_lib.sh
  [ -d .wheels ] && python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn prometheus-client httpx 2>&1 | grep -v WARNING | tail -2
  if [ -n "${PROFILE_SERVER:-}" ]; then  # the server under yappi (scripts/serve_profile.py)
    python3 -m pip install -q --no-index --find-links .wheels yappi 2>&1 | grep -v WARNING | tail -2
  fi
  for variant in ${SERVE_VARIANTS:-sync async}; do
    [ -n "${PROFILE_SERVER:-}" ] && SERVE_LAUNCHER="python3 scripts/serve_profile.py $OUT/serve-$variant-profile.txt"
    start_server $variant 8111 $(variant_env $variant) -- $MODEL $(variant_flag $variant) || continue
    bench_closed_loop $variant 8111 $MODEL
    curl -s localhost:8111/metrics | grep "^shardlm:worker_steps_total" | sed "s/^/[$variant] /"
    stop_server
  done
fi
if [[ $STAGES == *moe* ]]; then  # MoE steps as graphs against eager MoE steps
  for graphs in 0 1; do
    SHARDLM_NO_MOE_GRAPHS=$((1 - graphs)) timeout 300 python3 -m shardlm.entrypoints.cli bench latency --model random:mixtral-8x7b \
      --batch-sizes 1,16,64 --input-len 128 --output-len 64 --profile-step --json "$OUT/mixtral-graphs$graphs.json" \
      > "$OUT/mixtral-graphs$graphs.log" 2>&1
    grep -E "^ +[0-9]+ " "$OUT/mixtral-graphs$graphs.log" | sed "s/^/[moe graphs=$graphs] /" || tail -3 "$OUT/mixtral-graphs$graphs.log"
  done
fi
