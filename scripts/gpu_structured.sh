#!/usr/bin/env bash
# Issue 18 on a GPU host (device tool; carry .wheels and .baseline): constrained decoding's pace beside
# unconstrained requests (scripts/structured_bench.py) on this engine and on .baseline/'s in the same call,
# then tests/test_structured.py on the GPU (TP=2 where 2 GPUs are). Results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
MODEL=${MODEL:-random:llama-3-8b}
[ -d .wheels ] && python3 -m pip install -q --no-index --find-links .wheels llguidance jsonschema 2>&1 | grep -v WARNING | tail -2
for variant in base new; do
  dir=$PWD; [ $variant = base ] && dir=$PWD/.baseline  # (the workers import shardlm from the working directory)
  [ -d "$dir" ] || continue
  echo "[$variant]"
  (cd "$dir" && PYTHONPATH=$dir timeout 200 python3 "$OLDPWD/scripts/structured_bench.py" --model "$MODEL" \
    --json "$OUT/structured-$variant.json") 2>&1 | tail -4
done
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q tests/test_structured.py -p no:cacheprovider --tb=short > "$OUT/tests.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | tail -5
