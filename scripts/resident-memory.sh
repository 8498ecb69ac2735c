#!/usr/bin/env bash
# The server's resident memory against its weight file (the issue's 1.15x target):
# starts `multilora serve` on MODEL (extra flags in SERVE_FLAGS), samples VmRSS as soon
# as the process exists (its start: the binary and libraries), waits until it serves,
# sends one short request with `multilora bench`, and prints VmRSS after loading and
# after that request, and the growth from start, each over the file's size, with the
# largest mappings.
# Usage: scripts/resident-memory.sh MODEL [PORT]   (build first: cargo build --release)
set -euo pipefail
model=${1:?usage: $0 MODEL [PORT]}
port=${2:-50071}
bin=./target/release/multilora
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
file_bytes=$(stat -c %s "$model")
# shellcheck disable=SC2086
"$bin" serve --model "$model" --listen "127.0.0.1:$port" ${SERVE_FLAGS:-} >/tmp/resident-serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
rss() { awk '/^VmRSS/ {print $2 * 1024}' "/proc/$pid/status"; }
start=""
while [ -z "$start" ]; do start=$(rss); done
for _ in $(seq 600); do
  grep -q "serving" /tmp/resident-serve.log 2>/dev/null && break
  kill -0 $pid 2>/dev/null || { cat /tmp/resident-serve.log; exit 1; }
  sleep 0.5
done
ratio() { awk -v a="$1" -v b="$file_bytes" 'BEGIN {printf "%.1f MB (%.2fx the file)", a / 1e6, a / b}'; }
loaded=$(rss)
"$bin" bench --endpoint "http://127.0.0.1:$port" --requests 1 --concurrency 1 \
  --input-len 16 --output-len 8 --ignore-eos >/dev/null
served=$(rss)
echo "model $model: $(awk -v b="$file_bytes" 'BEGIN {printf "%.1f MB", b / 1e6}')"
echo "resident after loading:         $(ratio "$loaded")"
echo "resident after the first request: $(ratio "$served")"
echo "resident at start:              $(ratio "$start")"
echo "growth, start to first request: $(ratio $((served - start)))"
echo "largest resident mappings (KB):"
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = $6 == "" ? "[anon]" : $6} /^Rss:/ {rss[name] += $2}
     END {for (n in rss) print rss[n], n}' "/proc/$pid/smaps" | sort -rn | head -6
