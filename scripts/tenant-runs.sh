#!/usr/bin/env bash
# The wall-clock figures of fair sharing and backpressure (README "Tenants and limits"),
# with the release binary on the default model; writes target/tenant-runs/.
#  1. Fairness: tenant B (short prompts, 1 request every 5 s) alone, then beside tenant A
#     sending 10x as many requests with long prompts: as two tenants (fair sharing), and
#     as one tenant (both with A's key: first come, first served). B's time to first
#     token in each case.
#  2. Overload: a burst of 10x the queue bound at once: how many are refused, how fast
#     a refusal comes, and the server's resident memory before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/multilora
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
work=target/tenant-runs
grpc=127.0.0.1:${RUNS_GRPC_PORT:-50072}
http=127.0.0.1:${RUNS_HTTP_PORT:-8072}
secs=${RUNS_SECONDS:-90}
rm -rf "$work"
mkdir -p "$work"
digest() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
cat >"$work/tenants.toml" <<EOF
[[tenant]]
name = "a"
api_key_sha256 = ["$(digest key-a)"]
adapters = ["*"]

[[tenant]]
name = "b"
api_key_sha256 = ["$(digest key-b)"]
adapters = ["*"]
EOF
echo key-a >"$work/a.txt"
echo key-b >"$work/b.txt"

start_server() {
  "$bin" serve --model "$model" --tenants-file "$work/tenants.toml" --listen "$grpc" \
    --http-listen "$http" "$@" >>"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://$http/metrics', timeout=2)" 2>/dev/null; then
      return
    fi
    sleep 1
  done
  echo "the server did not start" >&2
  exit 1
}
stop_server() { kill "$server"; wait "$server" 2>/dev/null || true; }
trap 'kill $server 2>/dev/null || true' EXIT
rss() { awk '/VmRSS/ {print $2}' "/proc/$server/status"; }

bench() {
  "$bin" bench --endpoint "http://$grpc" --requests 100000 --duration "$secs" --quiet \
    --ignore-eos "$@"
}
tenant_b() { bench --api-keys "$1" --rate 0.2 --input-len 32 --output-len 32 --seed 2 --json "$2"; }
tenant_a() { bench --api-keys "$work/a.txt" --rate 2 --input-len 768 --output-len 64 --seed 1 --json "$1"; }

start_server
echo "fairness: B alone"
tenant_b "$work/b.txt" "$work/b-alone.json" >/dev/null
echo "fairness: A (10x the requests, long prompts) and B as two tenants"
tenant_a "$work/a-fair.json" >/dev/null &
a=$!
tenant_b "$work/b.txt" "$work/b-fair.json" >/dev/null
wait $a
echo "fairness: A and B as one tenant (B sends A's key)"
tenant_a "$work/a-fifo.json" >/dev/null &
a=$!
tenant_b "$work/a.txt" "$work/b-fifo.json" >/dev/null
wait $a
stop_server

bound=32
start_server --max-waiting-requests $bound
rss0=$(rss)
echo "overload: $((10 * bound)) requests at once against a queue of $bound"
"$bin" bench --endpoint "http://$grpc" --api-keys "$work/a.txt" --rate 100000 \
  --requests $((10 * bound)) --concurrency 0 --input-len 64 --output-len 32 --ignore-eos --quiet \
  --json "$work/overload.json" >/dev/null
sleep 2
rss1=$(rss)
stop_server

python3 - "$work" "$rss0" "$rss1" "$bound" <<'PY'
import json, statistics, sys
work, rss0, rss1, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(name):
    return json.load(open(f"{work}/{name}.json"))
def ttft(name):
    t = load(name)["summary"]["ttft"]
    return t["p50"] * 1e3, t["p99"] * 1e3
alone, fair, fifo = ttft("b-alone"), ttft("b-fair"), ttft("b-fifo")
print(f"B's TTFT alone: p50 {alone[0]:.0f} ms, p99 {alone[1]:.0f} ms")
print(f"B's TTFT beside A, two tenants (fair): p50 {fair[0]:.0f} ms ({fair[0] / alone[0]:.1f}x alone), p99 {fair[1]:.0f} ms")
print(f"B's TTFT beside A, one tenant (FIFO): p50 {fifo[0]:.0f} ms ({fifo[0] / alone[0]:.1f}x alone), p99 {fifo[1]:.0f} ms")
for name in ["a-fair", "a-fifo"]:
    s = load(name)["summary"]
    print(f"A ({name}): {s['requests']} requests, {s['succeeded']} succeeded, output {s['token_throughput']:.0f} tok/s")
r = load("overload")
recs = r["records"]
refused = [x for x in recs if x.get("error") == "RESOURCE_EXHAUSTED"]
ok = [x for x in recs if not x.get("error")]
other = [x for x in recs if x.get("error") and x["error"] != "RESOURCE_EXHAUSTED"]
lat = sorted((x["end"] - x["start"]) * 1e3 for x in refused)
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
print(f"overload: {len(recs)} requests, {len(ok)} served, {len(refused)} refused, {len(other)} other errors")
print(f"refusal latency p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {lat[-1] if lat else float('nan'):.1f} ms")
print(f"resident memory before {rss0 / 1024:.1f} MiB, after {rss1 / 1024:.1f} MiB")
PY
