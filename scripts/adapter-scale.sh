#!/usr/bin/env bash
# The adapter-scale experiment on the load harness (the issue's S-LoRA comparison):
# one server on MODEL (default: the synthetic 1B as a Q4_K GGUF, kept quantized) with
# 1,000 and 8 adapters registered from folders (loaded on first use; ranks 8 and 16 on
# q and v), then 32 closed-loop streams whose requests draw adapters by Zipf 1.0 from
# the 1,000 and from the 8. Prints both runs' first lines and the throughput ratio
# (target at least 0.9). Knobs (environment): MODEL, MANY (1000), REQUESTS (256),
# STREAMS (32), PORT, SERVE_FLAGS. Build first: cargo build --release.
set -euo pipefail
BIN=./target/release/multilora
MODEL=${MODEL:-models/synth-1b.Q4_K.gguf}
MANY=${MANY:-1000}
REQUESTS=${REQUESTS:-256}
STREAMS=${STREAMS:-32}
PORT=${PORT:-50081}
OUT=${OUT:-bench/results/runs}
ADAPTERS=models/scale-adapters/$(basename "$MODEL")
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "$MODEL is missing (make model; model synth --format gguf)" >&2; exit 2; }
mkdir -p "$OUT"
for spec in "many $MANY" "few 8"; do
  set -- $spec
  dir="$ADAPTERS/$1"
  [ -f "$dir/.complete" ] && continue
  rm -rf "$dir"
  "$BIN" adapters synth --model "$MODEL" --out "$dir" --count "$2" --prefix "$1" \
    --ranks 8,16 --targets q,v --distinct 8 --seed 7 > /dev/null
  touch "$dir/.complete"
done
# shellcheck disable=SC2086
"$BIN" serve --model "$MODEL" --listen "127.0.0.1:$PORT" \
  --adapter-dir "$ADAPTERS/many" --adapter-dir "$ADAPTERS/few" ${SERVE_FLAGS:-} \
  > target/adapter-scale-server.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  (exec 3<> "/dev/tcp/127.0.0.1/$PORT") 2> /dev/null && break
  kill -0 $pid 2> /dev/null || { cat target/adapter-scale-server.log; exit 1; }
  sleep 0.5
done
run() { # NAME COUNT
  "$BIN" bench --endpoint "http://127.0.0.1:$PORT" --label "adapter-scale-$1" \
    --num-adapters "$2" --adapter-prefix "$1" --popularity zipf:1.0 \
    --concurrency "$STREAMS" --requests "$REQUESTS" --warmup "$STREAMS" \
    --input-len 32 --output-len 32 --ignore-eos --seed 1 \
    --quiet --json "$OUT/adapter-scale-$1.json" > "$OUT/adapter-scale-$1.txt"
  head -1 "$OUT/adapter-scale-$1.txt" >&2
}
run few 8
run many "$MANY"
python3 - "$OUT/adapter-scale-few.json" "$OUT/adapter-scale-many.json" "$MANY" <<'EOF'
import json, sys
few, many = (json.load(open(p))["summary"] for p in sys.argv[1:3])
for s in (few, many):
    assert s["succeeded"] == s["requests"], f"failed requests: {s['errors']}"
ratio = many["token_throughput"] / few["token_throughput"]
print(f"output tokens/s: 8 adapters {few['token_throughput']:.1f}, {sys.argv[3]} adapters "
      f"{many['token_throughput']:.1f}; ratio {ratio:.3f} (target at least 0.9)")
EOF
