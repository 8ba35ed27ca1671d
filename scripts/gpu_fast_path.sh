#!/usr/bin/env bash
# Issue 16 on a GPU host (device tool): the fused norm/activation kernels and the prefill chunk budget, each
# against the engine without them in the same call. random:llama-3-8b, 1 x H200. Results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
MODEL=random:llama-3-8b
timeout 240 python3 -m pytest -q -m gpu tests/test_attention_kernels.py tests/test_gpu.py -k "norm or float32_matches_hf" \
  -p no:cacheprovider --tb=short -rf > "$OUT/gpu_tests.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | tail -5
for variant in fused unfused; do
  env $([ $variant = unfused ] && echo SHARDLM_UNFUSED=1) timeout 200 python3 -m shardlm.entrypoints.cli bench latency \
    --model $MODEL --batch-sizes 1,16,64 --input-len 128 --output-len 128 --repeats 2 --json "$OUT/latency-$variant.json" \
    > "$OUT/latency-$variant.log" 2>&1
  grep -E "^ +[0-9]+ " "$OUT/latency-$variant.log" | sed "s/^/[$variant] /" || tail -3 "$OUT/latency-$variant.log"
done
[ -d .wheels ] && python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn prometheus-client httpx 2>&1 | grep -v WARNING | tail -2
for budget in 8192 2048; do
  python3 -m shardlm.entrypoints.cli serve $MODEL --max-num-batched-tokens $budget --port 8111 > "$OUT/serve-$budget.log" 2>&1 &
  pid=$!
  for _ in $(seq 240); do curl -sf localhost:8111/ready > /dev/null && break; sleep 1; done
  timeout 200 python3 -m shardlm.entrypoints.cli bench serve --base-url http://127.0.0.1:8111 --model $MODEL \
    --request-rate 0 --max-concurrency 128 --num-prompts 512 --input-len 512 --output-len 128 --range-ratio 0 \
    --vocab-size 128000 --json "$OUT/serve-$budget.json" > /dev/null 2>&1
  python3 -c "import json; d=json.load(open('$OUT/serve-$budget.json')); print('budget $budget', {k: round(d[k]) for k in ('completed','failed','output_tok_per_s')}, 'TTFT p50/p99', round(d['ttft_ms']['p50']), round(d['ttft_ms']['p99']), 'TPOT p50/p99', round(d['tpot_ms']['p50'],1), round(d['tpot_ms']['p99'],1), 'ITL p50/p99', round(d['itl_ms']['p50'],1), round(d['itl_ms']['p99'],1))"
  kill -TERM $pid; wait $pid
done
