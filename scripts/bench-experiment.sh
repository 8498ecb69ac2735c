#!/usr/bin/env bash
# `make bench`: the README's experiment. For the default model (SmolLM2-135M) and a
# synthetic 1B-class Llama: throughput and TTFT/TPOT percentiles with requests drawn
# from 1, 8, 64, 512 and 2,048 adapters (ranks 8/16/32/64 in turn, power-law 1.0
# popularity, Poisson arrivals at a fixed rate) and for the base model alone. Writes
# bench/results/results.md (the table), sweep_*.svg, and runs/ (each run's JSON report,
# plots and the server log). Knobs (environment): COUNTS, MODELS (default "135m 1b"),
# OUT, PORT.
set -euo pipefail

BIN=./target/release/multilora
OUT=${OUT:-bench/results}
COUNTS=${COUNTS:-"0 1 8 64 512 2048"}
MODELS=${MODELS:-"135m 1b"}
PORT=${PORT:-50061}
ENDPOINT="http://127.0.0.1:$PORT"
ADAPTERS=models/bench-adapters
SYNTH_1B=models/synth-1b

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

# Writes the adapters of every count for one model: COUNT adapters named aCOUNT-I in
# ADAPTERS/LABEL/aCOUNT (8 distinct weight files per count, the rest hard links).
synth_adapters() {
  local label=$1 model=$2
  for n in $COUNTS; do
    [ "$n" = 0 ] && continue
    local dir="$ADAPTERS/$label/a$n"
    [ -f "$dir/.complete" ] && continue
    rm -rf "$dir"
    local distinct=8
    [ "$n" -lt 8 ] && distinct=0
    "$BIN" adapters synth --model "$model" --out "$dir" --count "$n" --prefix "a$n" \
      --ranks 8,16,32,64 --targets q,k,v,o --distinct "$distinct" --seed "$n" > /dev/null
    touch "$dir/.complete"
  done
}

# Starts the server on MODEL with every adapter folder registered (loaded on first use).
start_server() {
  local label=$1 model=$2
  local dirs=()
  for n in $COUNTS; do
    [ "$n" = 0 ] || dirs+=(--adapter-dir "$ADAPTERS/$label/a$n")
  done
  "$BIN" serve --model "$model" --listen "127.0.0.1:$PORT" \
    --kv-cache-memory $((2 << 30)) --adapter-memory $((1 << 30)) "${dirs[@]}" \
    > "$OUT/runs/$label-server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    if (exec 3<> "/dev/tcp/127.0.0.1/$PORT") 2> /dev/null; then
      return 0
    fi
    kill -0 "$SERVER_PID" 2> /dev/null || break
    sleep 1
  done
  echo "the server for $label did not start; see $OUT/runs/$label-server.log" >&2
  exit 1
}

# One model: LABEL MODEL RATE REQUESTS WARMUP INPUT_LEN OUTPUT_LEN.
sweep_model() {
  local label=$1 model=$2 rate=$3 requests=$4 warmup=$5 input=$6 output=$7
  synth_adapters "$label" "$model"
  start_server "$label" "$model"
  for n in $COUNTS; do
    local which=(--num-adapters "$n" --adapter-prefix "a$n" --popularity powerlaw:1.0)
    [ "$n" = 0 ] && which=()
    echo "== $label, $([ "$n" = 0 ] && echo "base model only" || echo "$n adapters")" >&2
    "$BIN" bench --endpoint "$ENDPOINT" --label "$label" "${which[@]}" \
      --rate "$rate" --concurrency 0 --requests "$requests" --warmup "$warmup" \
      --input-len "$input" --output-len "$output" --ignore-eos --seed 1 \
      --json "$OUT/runs/$label-$n.json" --plot "$OUT/runs/$label-$n" > "$OUT/runs/$label-$n.txt"
    head -1 "$OUT/runs/$label-$n.txt" >&2
  done
  stop_server
}

start=$(date +%s)
mkdir -p "$OUT/runs"
rm -f "$OUT"/runs/*.json
default_model="$(bash scripts/fetch-model.sh any)"
for m in $MODELS; do
  case "$m" in
    135m)
      sweep_model "SmolLM2-135M" "$default_model" 3 120 8 64 32
      ;;
    1b)
      if [ ! -f "$SYNTH_1B/model.safetensors" ]; then
        "$BIN" model synth --shape 1b --out "$SYNTH_1B" --tokenizer-from "$default_model"
      fi
      sweep_model "synthetic-1B" "$SYNTH_1B" 0.35 24 2 16 16
      ;;
    *)
      echo "unknown model $m (use 135m, 1b)" >&2
      exit 2
      ;;
  esac
done
"$BIN" bench-summary --out "$OUT" "$OUT"/runs/*.json > /dev/null
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs || true)
ram=$(free -g | awk '/Mem:/ {print $2}')
echo "
Machine: $(nproc) cores ($cpu), $ram GiB RAM; the experiment took $(($(date +%s) - start)) s." >> "$OUT/results.md"
echo "experiment done in $(($(date +%s) - start)) s: $OUT/results.md" >&2
cat "$OUT/results.md"
