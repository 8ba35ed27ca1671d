#!/usr/bin/env bash
# Issue 19 on a GPU with FP8 tensor cores (device tool): the FP8 GPU tests, FP8 against bf16 on a random
# 8B model (scripts/fp8_check.py: logits cosine, teacher-forced greedy top-1 agreement; CHECK_ARGS: its flags,
# default --reference), and decode latency
# of bf16, FP8 weights, and FP8 weights and KV in the same call (bf16 the baseline; VARIANTS picks some);
# kv: sequences of 8k tokens the KV cache holds, bf16 against kv_cache_dtype fp8 at the same memory setting; tune:
# scripts/fp8_gemm_bench.py --tune (the small-batch kernels' configurations, TUNE_BUDGET seconds, batches
# TUNE_BATCHES, more flags TUNE_ARGS e.g. --tma-only); gemm: the kernels as the engine runs them, 8B and 70B shapes; big: BIG_MODEL (default
# random:llama-3-70b) in FP8 weights and KV on this GPU (BIG_FLAGS: more bench flags, e.g. "-tp 2").
# TEST_FILES: the test files of the tests stage (default tests/test_gpu.py), TESTS_K their -k filter.
# LATENCY_FLAGS: the latency benches' further flags (default --profile-step; e.g. "--repeats 3").
# Results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
MODEL=${MODEL:-random:llama-3-8b}
STAGES=${STAGES:-tests gemm check latency kv}
if [[ $STAGES == *tune* ]]; then
  timeout $(( ${TUNE_BUDGET:-200} + 120 )) python3 scripts/fp8_gemm_bench.py --tune --budget ${TUNE_BUDGET:-200} ${TUNE_BATCHES:+--batches $TUNE_BATCHES} ${TUNE_ARGS:-} \
    --json "$OUT/fp8_tune.json" > "$OUT/fp8_tune.txt" 2>&1
  tail -20 "$OUT/fp8_tune.txt"
fi
if [[ $STAGES == *tests* ]]; then
  timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -m "gpu or not gpu" ${TEST_FILES:-tests/test_gpu.py} -k "${TESTS_K:-fp8}" -p no:cacheprovider --tb=short -rs \
    > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.txt" | tail -5
fi
if [[ $STAGES == *gemm* ]]; then  # the FP8 kernels alone on the 8B and 70B shapes, bf16 beside them
  for pdl in ${GEMM_PDL:-1}; do  # (GEMM_PDL="1 0": also without programmatic dependent launch)
    SHARDLM_NO_PDL=$((1 - pdl)) timeout 200 python3 scripts/fp8_gemm_bench.py ${GEMM_ARGS:-} --json "$OUT/fp8_gemm-pdl$pdl.json" \
      > "$OUT/fp8_gemm-pdl$pdl.txt" 2>&1
    tail -60 "$OUT/fp8_gemm-pdl$pdl.txt" | sed "s/^/[pdl=$pdl] /"
  done
fi
if [[ $STAGES == *check* ]]; then
  timeout 300 python3 scripts/fp8_check.py --model "$MODEL" ${CHECK_ARGS---reference} --json "$OUT/fp8_check.json" 2>&1 | grep -v "^shardlm:" | tail -3
fi
if [[ $STAGES == *latency* ]]; then
  # fp8kv: FP8 weights and KV cache; fp8head: the LM head in FP8 too; fp8nopdl, bf16nopdl: without programmatic
  # dependent launch; fp8nofuse: the FP8 layers quantising their own input (SHARDLM_NO_FP8_FUSION)
  for q in ${VARIANTS:-bf16 fp8 fp8kv}; do
    flag="--quantization fp8"; env=()
    case $q in
      bf16) flag="" ;;
      bf16nopdl) flag=""; env=(SHARDLM_NO_PDL=1) ;;
      fp8kv) flag="--quantization fp8 --kv-cache-dtype fp8" ;;
      fp8head) flag="--quantization fp8 --fp8-lm-head" ;;
      fp8nopdl) env=(SHARDLM_NO_PDL=1) ;;
      fp8nofuse) env=(SHARDLM_NO_FP8_FUSION=1) ;;
      fp8) ;;
      *) echo "unknown variant $q (bf16, bf16nopdl, fp8, fp8kv, fp8head, fp8nopdl, fp8nofuse)"; continue ;;
    esac
    env "${env[@]}" timeout 200 python3 -m shardlm.entrypoints.cli bench latency --model "$MODEL" $flag --batch-sizes ${BATCHES:-1,64} \
      --input-len 128 --output-len 128 ${LATENCY_FLAGS---profile-step} --json "$OUT/latency-$q.json" > "$OUT/latency-$q.log" 2>&1
    grep -E "^ +[0-9]+ |rank 0:" "$OUT/latency-$q.log" | sed "s/^/[$q] /" || tail -3 "$OUT/latency-$q.log"
  done
fi
if [[ $STAGES == *big* ]]; then  # a model bf16 would not fit on this GPU, FP8 (weights and KV) only
  BIG=${BIG_MODEL:-random:llama-3-70b}
  timeout 300 python3 -m shardlm.entrypoints.cli bench latency --model "$BIG" --quantization fp8 --kv-cache-dtype fp8 ${BIG_FLAGS:-} \
    --batch-sizes ${BIG_BATCHES:-1,32} --input-len 128 --output-len 64 --profile-step --json "$OUT/latency-big-fp8.json" \
    > "$OUT/latency-big-fp8.log" 2>&1
  grep -E "^ +[0-9]+ |rank 0:" "$OUT/latency-big-fp8.log" | sed "s/^/[$BIG fp8] /" || tail -3 "$OUT/latency-big-fp8.log"
fi
if [[ $STAGES == *kv* ]]; then
  timeout 200 python3 - "$MODEL" "${CTX:-8192}" <<'PY' 2>&1 | grep -v "^shardlm:" | tee "$OUT/kv.txt"
import sys
from shardlm import LLM
model, ctx, seqs = sys.argv[1], int(sys.argv[2]), {}
for kv in ("auto", "fp8"):
    with LLM(model, kv_cache_dtype=kv, max_model_len=ctx, gpu_memory_utilization=0.9) as llm:
        b = llm.engine.stats().blocks
        seqs[kv] = b.num_blocks * llm.engine.args.block_size // ctx
        print(f"kv_cache_dtype={kv}: {b.num_blocks} blocks, {seqs[kv]} sequences of {ctx} tokens")
print(f"fp8 / bf16: {seqs['fp8'] / seqs['auto']:.2f}x")
PY
fi
