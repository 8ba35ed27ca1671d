#!/usr/bin/env bash
# Issue 6 on the GPU host: probe the machine, then measure what the planner will predict.
# Afterwards, here: shardlm plan --validate $OUT/bench-*.json --profile $OUT/probe.json --gpu h100-80gb
# LAYOUTS: bench file name:flags entries separated by ';' (default: TP 1/2/4; add e.g. "pp4:-pp 4").
# REPEATS: rounds per bench (the median of each timing is reported).
# PROBE_MODEL: whose own layers the probe times too (default the benched model; "" to skip). To see the
# prediction without them: python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('model_layers');
#   json.dump(d, open(sys.argv[2], 'w'))" probe.json probe-generic.json
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
OUT=${OUT:-out}; mkdir -p "$OUT"
pm=${PROBE_MODEL-random:llama-3-8b}
timeout 400 python3 -m shardlm.cli probe --out "$OUT/probe.json" ${pm:+--model "$pm"} 2>&1 \
  | grep -v -E "it/s\]|_warn_once|warn\(" | tail -12
IFS=';' read -ra layouts <<< "${LAYOUTS:-tp1:-tp 1;tp2:-tp 2;tp4:-tp 4}"
for cfg in "${layouts[@]}"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  timeout 200 python3 -m shardlm.cli bench latency --model random:llama-3-8b $flags --batch-sizes 1,8,32 --repeats "${REPEATS:-1}" \
    --input-len 128 --output-len 64 --json "$OUT/bench-$name.json" 2>&1 | grep -E "^ +[0-9]|batch" | sed "s/^/[$name] /"
done
