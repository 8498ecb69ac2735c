#!/usr/bin/env bash
# Peer benchmark: multilora against llama.cpp's HTTP server (llama-server) on the same
# GGUF model, CPU only, base model (no adapters), greedy, 64-token prompts, 128 output
# tokens with end-of-sequence ignored. Two workloads, each run on one server at a time:
#   1x8   one stream, 8 sequential requests
#   32x64 32 concurrent streams, 64 requests in all
#
# llama-server is built from the llama.cpp source that the llama-cpp-python sdist on PyPI
# vendors (vendor/llama.cpp), with cmake from PyPI in a venv; everything lives under
# target/peers/ (git-ignored) and the build is reused on later runs. llama.cpp is driven
# by scripts/peer_load.py (its native /completion endpoint, streaming); multilora by its
# own harness, `multilora bench`. Writes bench/results/peers.md and the raw JSON reports
# under target/peers/results/.
#
# Environment:
#   SERVE_FLAGS        extra flags for `multilora serve` (e.g. "--dtype quantized")
#   SKIP_CARGO_BUILD=1 use target/release/multilora as it is (no `cargo build --release`)
#   LLAMA_CPP_PY       llama-cpp-python version whose vendored llama.cpp is built
#   MODEL              the GGUF file (default: the SmolLM2-135M-Instruct Q4_1 file)
#   THREADS            llama-server's compute threads (default: nproc; multilora serve
#                      has no such flag and sizes its own pool)
# Delete target/peers/build-* to rebuild llama-server after changing its build flags.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PY=${LLAMA_CPP_PY:-0.3.36}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
SERVE_FLAGS=${SERVE_FLAGS:-}
THREADS=${THREADS:-$(nproc)}
PEERS=$PWD/target/peers
SRC=$PEERS/src/llama_cpp_python-$LLAMA_CPP_PY/vendor/llama.cpp
BUILD=$PEERS/build-$LLAMA_CPP_PY
LLAMA_SERVER=$BUILD/bin/llama-server
RESULTS=$PEERS/results
LOGS=$PEERS/logs
OUT_MD=bench/results/peers.md
mkdir -p "$PEERS/cache" "$RESULTS" "$LOGS"
rm -f "$RESULTS"/*.json  # no figures from an earlier, interrupted run

log() { echo "== $*" >&2; }

# --- 1. llama-server, built once from the vendored llama.cpp --------------------------
build_llama_server() {
  if [ -x "$LLAMA_SERVER" ]; then
    log "reusing $LLAMA_SERVER"
    return 0
  fi
  local sdist=$PEERS/cache/llama_cpp_python-$LLAMA_CPP_PY.tar.gz
  if [ ! -f "$sdist" ]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PY sdist"
    # --no-binary for this package only: with :all: pip would also build the sdist's
    # build requirements (cmake itself) from source just to read its metadata.
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PY" -d "$PEERS/cache"
  fi
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    log "unpacking $sdist"
    mkdir -p "$PEERS/src"
    tar -xzf "$sdist" -C "$PEERS/src"
  fi
  if [ ! -x "$PEERS/venv/bin/cmake" ]; then
    log "installing cmake into $PEERS/venv"
    python3 -m venv "$PEERS/venv"
    "$PEERS/venv/bin/python" -m pip install --quiet --disable-pip-version-check cmake
  fi
  log "building llama-server (vendored llama.cpp, -j2; takes a while on 2 cores)"
  # No network at build time: no prebuilt web UI download (LLAMA_USE_PREBUILT_UI), no
  # npm UI build, no HTTPS (OpenSSL); a static binary, nothing else built.
  # AMX compiled out: with GGML_NATIVE on a CPU that has AMX, ggml's AMX matmul
  # (ggml_backend_amx_mul_mat) segfaults on this model's Q4_1 weights during the warm-up
  # run (seen on 0.3.36). -march=native defines the __AMX_*__ macros ggml keys its AMX
  # code on; undefining them keeps every other native instruction set (AVX-512, VNNI).
  local no_amx="-U__AMX_INT8__ -U__AMX_TILE__ -U__AMX_BF16__"
  nice -n 19 "$PEERS/venv/bin/cmake" -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    >"$LOGS/llama-cmake-configure.log" 2>&1 \
    || { tail -30 "$LOGS/llama-cmake-configure.log" >&2; return 1; }
  nice -n 19 "$PEERS/venv/bin/cmake" --build "$BUILD" --target llama-server -j 2 \
    >"$LOGS/llama-cmake-build.log" 2>&1 \
    || { tail -30 "$LOGS/llama-cmake-build.log" >&2; return 1; }
  [ -x "$LLAMA_SERVER" ] || { log "no $LLAMA_SERVER after the build"; return 1; }
}

# --- helpers ------------------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
# Runs a load client in the background and waits for it: bash runs a trap only once its
# foreground child has ended, so this lets an interrupt clean up at once.
CLIENT_PID=
run_client() {
  "$@" &
  CLIENT_PID=$!
  wait "$CLIENT_PID"
  CLIENT_PID=
}
cleanup() {
  if [ -n "$CLIENT_PID" ]; then kill "$CLIENT_PID" 2>/dev/null || true; fi
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_ready KIND PORT LOG: until /health answers 200 (http) or the port accepts (tcp).
wait_ready() {
  local kind=$1 port=$2 logfile=$3
  for _ in $(seq 600); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      log "the server exited before it was ready; the end of $logfile:"
      tail -20 "$logfile" >&2
      return 1
    fi
    if python3 - "$kind" "$port" <<'PY'
import socket, sys, urllib.request
kind, port = sys.argv[1], int(sys.argv[2])
try:
    if kind == "http":
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            sys.exit(0 if r.status == 200 else 1)
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
except Exception:
    sys.exit(1)
PY
    then return 0; fi
    sleep 0.5
  done
  log "the server was not ready after 300 s; see $logfile"
  return 1
}

# --- 2. the model -------------------------------------------------------------------
[ -f "$MODEL" ] || bash scripts/fetch-model.sh gguf >/dev/null

# --- 3. multilora binary ------------------------------------------------------------
if [ "${SKIP_CARGO_BUILD:-0}" != 1 ]; then
  log "cargo build --release"
  cargo build --release
fi
MULTILORA=$PWD/target/release/multilora
[ -x "$MULTILORA" ] || { log "missing $MULTILORA (run cargo build --release)"; exit 1; }

build_llama_server

# --- 4. llama.cpp -------------------------------------------------------------------
port=$(free_port)
log "starting llama-server on 127.0.0.1:$port (32 slots, 16384-token context, $THREADS threads)"
# -np 32 -c 16384: 512 tokens per slot (64 prompt + 128 output fit); -cram 0: no host-side
# prompt cache (requests also send cache_prompt: false).
"$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$port" \
  -np 32 -c 16384 -t "$THREADS" -tb "$THREADS" -cram 0 --no-webui \
  >"$LOGS/llama-server.log" 2>&1 &
SERVER_PID=$!
wait_ready http "$port" "$LOGS/llama-server.log"
run_client python3 scripts/peer_load.py --endpoint "http://127.0.0.1:$port" \
  --workloads 1x8,32x64 --input-len 64 --output-len 128 --warmup 1 \
  --json "$RESULTS/llamacpp.json"
stop_server

# --- 5. multilora -------------------------------------------------------------------
port=$(free_port)
log "starting multilora serve on 127.0.0.1:$port ${SERVE_FLAGS:+(flags: $SERVE_FLAGS)}"
# shellcheck disable=SC2086 # SERVE_FLAGS is a list of flags
"$MULTILORA" serve --model "$MODEL" --listen "127.0.0.1:$port" $SERVE_FLAGS \
  >"$LOGS/multilora-serve.log" 2>&1 &
SERVER_PID=$!
wait_ready tcp "$port" "$LOGS/multilora-serve.log"
endpoint=http://127.0.0.1:$port
log "multilora warm-up (1 request, not counted)"
run_client "$MULTILORA" bench --endpoint "$endpoint" --concurrency 1 --requests 1 --input-len 64 \
  --output-len 128 --ignore-eos --quiet >/dev/null
for w in 1x8 32x64; do
  c=${w%x*} n=${w#*x}
  log "multilora workload $w: $c stream(s), $n requests"
  run_client "$MULTILORA" bench --endpoint "$endpoint" --concurrency "$c" --requests "$n" \
    --input-len 64 --output-len 128 --ignore-eos --quiet --label "$w" \
    --json "$RESULTS/multilora-$w.json"
done
stop_server

# --- 6. summary ---------------------------------------------------------------------
llama_build=$("$LLAMA_SERVER" --version 2>&1 | grep -m1 '^version' || echo unknown)
python3 - "$RESULTS" "$OUT_MD" "$LLAMA_CPP_PY" "$MODEL" "$THREADS" "$SERVE_FLAGS" "$llama_build" <<'PY'
import json, os, platform, sys, time
results, out_md, llama_ver, model, threads, serve_flags, llama_build = sys.argv[1:8]

llama = {w["name"]: w for w in json.load(open(os.path.join(results, "llamacpp.json")))["workloads"]}

def ours(name):
    rep = json.load(open(os.path.join(results, f"multilora-{name}.json")))
    s = rep["summary"]
    rates = []
    for r in rep["records"]:
        n, t = len(r["token_times"]), r["token_times"]
        if r.get("error") is None and n >= 2 and r["end"] > t[0]:
            rates.append((n - 1) / (r["end"] - t[0]))
    return {
        "requests": s["requests"], "errors": s["requests"] - s["succeeded"],
        "output_tokens": s["output_tokens"], "wall_s": s["duration"],
        "output_tok_s": s["token_throughput"],
        "mean_stream_decode_tok_s": sum(rates) / len(rates) if rates else float("nan"),
        "mean_ttft_s": s["ttft"]["mean"],
    }

try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    cpu = platform.processor() or "unknown CPU"

labels = {"1x8": "1 stream, 8 requests", "32x64": "32 streams, 64 requests"}
rows, detail = [], []
for name in ("1x8", "32x64"):
    l, m = llama[name], ours(name)
    ratio = m["output_tok_s"] / l["output_tok_s"] if l["output_tok_s"] else float("nan")
    rows.append(f"| {labels[name]} | {l['output_tok_s']:.1f} | {m['output_tok_s']:.1f} | {ratio:.2f} |")
    for who, d in (("llama.cpp", l), ("multilora", m)):
        detail.append(
            f"| {labels[name]} | {who} | {d['requests']} | {d['errors']} | {d['output_tokens']} "
            f"| {d['wall_s']:.2f} | {d['output_tok_s']:.1f} | {d['mean_stream_decode_tok_s']:.1f} "
            f"| {d['mean_ttft_s'] * 1e3:.0f} |")

table = "\n".join([
    "| workload | llama.cpp tok/s | multilora tok/s | ratio (multilora / llama.cpp) |",
    "| --- | ---: | ---: | ---: |", *rows])
md = f"""# Peer benchmark: multilora against llama.cpp

Produced by `make bench-peers` (scripts/bench-peers.sh) on {time.strftime('%Y-%m-%d %H:%M %Z')}.
Machine: {os.cpu_count()} cores ({cpu}), CPU only; the two servers ran one after the other.
Model: `{model}`, base model only (no adapters).
Each request: a 64-token prompt (a different window of the same text per request), 128
output tokens with end-of-sequence ignored, greedy.
Output tokens/s = all output tokens / (last response end - first request start).
One warm-up request per server is not counted.

- llama.cpp: `llama-server` built from the llama.cpp vendored in llama-cpp-python
  {llama_ver} ({llama_build}; Release, GGML_NATIVE=ON without AMX),
  `-np 32 -c 16384 -t {threads}`, native `/completion` endpoint, streaming,
  `cache_prompt: false`; client scripts/peer_load.py.
- multilora: `multilora serve` {('with `' + serve_flags + '`') if serve_flags else 'with default flags'}; client `multilora bench`.

{table}

Details (decode tok/s: per stream, after the first token, averaged over requests):

| workload | server | requests | errors | output tokens | wall s | output tok/s | decode tok/s per stream | mean TTFT ms |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
""" + "\n".join(detail) + "\n"
with open(out_md, "w") as f:
    f.write(md)
print()
print(table)
print(f"\nwritten to {out_md}; raw reports in {results}/")
PY
