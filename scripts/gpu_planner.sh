#!/usr/bin/env bash
# Issue 6 on the GPU host: probe the machine, then measure what the planner will predict.
# Afterwards, here: shardlm plan --validate $OUT/bench-*.json --profile $OUT/probe.json --gpu h100-80gb
# LAYOUTS: bench file name:flags entries separated by ';' (default: TP 1/2/4; add e.g. "pp4:-pp 4"; empty: no benches).
# REPEATS: rounds per bench (the median of each timing is reported). GPU_TESTS=1: run tests/test_gpu.py first.
# BATCHES (default 1,8,32) and INPUT_LENS (prompt lengths, default 128; each its own bench-NAME-inLEN.json).
# PROBE=0: benches only (e.g. a before/after with BASELINE, below, in a call of its own).
# PROFILED: layouts (same form as LAYOUTS) benched again with --profile-step, to profile-NAME.json (kernel time per
# decode step by rank; kept out of the bench-*.json that plan --validate reads), e.g. PROFILED="tp4:-tp 4".
# PROBE_MODEL: whose own layers the probe times too (default the benched model; "" to skip). To see the
# prediction without them: python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('model_layers');
#   json.dump(d, open(sys.argv[2], 'w'))" probe.json probe-generic.json
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
if [ "${GPU_TESTS:-0}" = 1 ]; then  # the engine against HF on the GPU first (tests/test_gpu.py)
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short -rfs 2>&1 \
    | tee "$OUT/gpu_tests.txt" | grep -E "Error|error|passed|failed|SKIP" | cut -c1-300 | tail -12
fi
pm=${PROBE_MODEL-random:llama-3-8b}
if [ "${PROBE:-1}" = 1 ]; then
  # (--serving: the server's own overhead on a request's first token, where the web stack is installed: carry
  # .wheels, installed here as gpu_serve.sh does)
  [ -d .wheels ] && python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn prometheus-client httpx 2>&1 | tail -2
  timeout 460 python3 -m shardlm.entrypoints.cli probe --out "$OUT/probe.json" ${pm:+--model "$pm"} --serving 2>&1 \
    | grep -v -E "it/s\]|_warn_once|warn\(" | tail -12
fi
IFS=';' read -ra layouts <<< "${LAYOUTS-tp1:-tp 1;tp2:-tp 2;tp4:-tp 4}"
bench() {  # $1: label, $2: flags, $3: the engine to run (PYTHONPATH), $4: result file, $5: prompt length
  (cd "$3" && PYTHONPATH=$3 timeout 200 python3 -m shardlm.entrypoints.cli bench latency --model random:llama-3-8b $2 \
    --batch-sizes "${BATCHES:-1,8,32}" --repeats "${REPEATS:-1}" --input-len "${5:-128}" --output-len 64 --json "$4" 2>&1) \
    | grep -E "^ +[0-9]|batch|Error" | cut -c1-300 | sed "s/^/[$1] /"
}
for cfg in "${layouts[@]}"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  for len in ${INPUT_LENS:-128}; do
    file=$OUT/bench-$name.json; [ -n "${INPUT_LENS:-}" ] && file=$OUT/bench-$name-in$len.json
    bench "$name in$len" "$flags" "$PWD" "$file" "$len"
  done
  # BASELINE: a folder holding an older checkout (e.g. `git archive REV | tar -x -C .base`, carried along):
  # the same bench on that engine right after, for a same-call before/after (base-NAME.json, kept out of
  # the bench-*.json that plan --validate reads)
  if [ -n "${BASELINE:-}" ]; then bench "base $name" "$flags" "$(realpath "$BASELINE")" "$OUT/base-$name.json"; fi
done
IFS=';' read -ra profiled <<< "${PROFILED:-}"
for cfg in "${profiled[@]}"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  bench "profile $name" "$flags --profile-step" "$PWD" "$OUT/profile-$name.json"
done
