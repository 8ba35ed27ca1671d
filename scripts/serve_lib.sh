# Shell functions the GPU scripts share to start a server and benchmark it (source it; needs $OUT).

# start_server NAME PORT [ENV=VALUE ...] -- SERVE_ARGS...: `shardlm serve SERVE_ARGS --port PORT` in the
# background (with the environment assignments before --; $SERVE_LAUNCHER, if set, runs instead of
# `python3 -m shardlm.entrypoints.cli`), its log in $OUT/serve-NAME.log; waits until /ready answers.
# Sets SERVER_PID; returns 1 (after the log's tail) if the server died first.
start_server() {
  local name=$1 port=$2 env=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do env+=("$1"); shift; done
  shift
  env "${env[@]}" ${SERVE_LAUNCHER:-python3 -m shardlm.entrypoints.cli} serve "$@" --port "$port" \
    > "$OUT/serve-$name.log" 2>&1 &
  SERVER_PID=$!
  local t0=$(date +%s)
  for _ in $(seq 240); do
    curl -sf "localhost:$port/ready" > /dev/null && { echo "[$name] ready after $(( $(date +%s) - t0 )) s"; return 0; }
    kill -0 $SERVER_PID 2> /dev/null || { echo "[$name] server died:"; tail -3 "$OUT/serve-$name.log"; return 1; }
    sleep 1
  done
  echo "[$name] not ready after 240 s"; return 1
}

# bench_closed_loop NAME PORT MODEL: $CONCURRENCY (128) streams, closed loop, $NUM_PROMPTS (512) prompts of
# 512 tokens (ids below $VOCAB, 128000), 128 new; the result in $OUT/serve-NAME.json (the benchmark's log
# beside it), a summary printed.
bench_closed_loop() {
  local name=$1 port=$2 model=$3
  timeout 240 python3 -m shardlm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$port" --model "$model" \
    --request-rate 0 --max-concurrency "${CONCURRENCY:-128}" --num-prompts "${NUM_PROMPTS:-512}" --input-len 512 \
    --output-len 128 --range-ratio 0 --vocab-size "${VOCAB:-128000}" --json "$OUT/serve-$name.json" > "$OUT/bench-$name.log" 2>&1 \
    || { tail -5 "$OUT/bench-$name.log"; return 1; }
  python3 -c "import json; d=json.load(open('$OUT/serve-$name.json')); print('[$name]', {k: round(d[k]) for k in ('completed','failed','output_tok_per_s')}, 'TTFT p50/p99', round(d['ttft_ms']['p50']), round(d['ttft_ms']['p99']), 'TPOT p50/p99', round(d['tpot_ms']['p50'],1), round(d['tpot_ms']['p99'],1), 'ITL p50/p99', round(d['itl_ms']['p50'],1), round(d['itl_ms']['p99'],1))"
}

stop_server() {
  kill -TERM $SERVER_PID; wait $SERVER_PID
}
