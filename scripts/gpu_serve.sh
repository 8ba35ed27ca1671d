#!/usr/bin/env bash
# Serving benchmark on the GPU host: random:llama-3-8b at TP=2 and TP=4 (TPS), Poisson arrivals at RATES.
# Afterwards, here: shardlm plan --validate $OUT/serve-*.json --profile probe.json --gpu h200 (each run's
# requests replayed through the planner's serving simulation on the engine the server reported). Each rate
# sends prompts of its own (--seed): with one seed a later run's prompts would come from the prefix cache.
# SERVE_FLAGS: more `serve` flags (e.g. "--quantization fp8"), TAG: a word in the result files' names.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
source scripts/serve_lib.sh
# the GPU image has no web stack: install it from wheels carried along in .wheels/ if present
[ -d .wheels ] && python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn prometheus-client httpx 2>&1 | tail -2
for tp in ${TPS:-2 4}; do
  port=$((8100 + tp))
  start_server tp$tp $port -- random:llama-3-8b -tp "$tp" ${SERVE_FLAGS:-} || continue
  run=0
  for rate in ${RATES:-2 8}; do
    run=$((run + 1))
    timeout 240 python3 -m shardlm.entrypoints.cli bench serve --base-url http://127.0.0.1:$port --model random:llama-3-8b \
      --request-rate "$rate" --num-prompts ${NUM:-64} --input-len 512 --output-len 128 --vocab-size 128000 --seed "$run" \
      --json "$OUT/serve${TAG:+-$TAG}-tp$tp-rate$rate.json" > "$OUT/serve${TAG:+-$TAG}-tp$tp-rate$rate.txt" 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('tp=$tp rate=$rate', {k: d[k] for k in ('completed','output_tok_per_s')}, 'TTFT', d['ttft_ms'], 'TPOT', d['tpot_ms'])" \
      "$OUT/serve${TAG:+-$TAG}-tp$tp-rate$rate.json" || tail -3 "$OUT/serve${TAG:+-$TAG}-tp$tp-rate$rate.txt"
  done
  curl -s localhost:$port/metrics | grep -E "^shardlm:(num_preemptions|prefix_cache|generation_tokens)" > "$OUT/metrics${TAG:+-$TAG}-tp$tp.txt"
  stop_server; echo "server tp=$tp exit $?"
done
