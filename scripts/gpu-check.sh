#!/usr/bin/env bash
# The GPU check of the CUDA path, in two halves.
#
#   bash scripts/gpu-check.sh build   # here, on a machine without a GPU
#   bash run.sh                       # on the GPU machine, inside the staged folder
#   bash run.sh quick                 # the same without (c) and (c2)
#   bash run.sh perf                  # the decode-speed figures, as JSON (under 5 minutes)
#
# Build half: links the CUDA test and bench binaries and the server with the pinned
# CUDA 13.0 toolchain (scripts/cuda-env.sh) against the CUDA 13 libraries from PyPI and a
# libcuda stub (link time only: at run time the driver's libcuda.so.1 is used), strips
# them into one xz archive and stages everything the run needs in target/gpu-stage (with
# the working tree at most 62 MB: the GPU machine receives at most 64 MiB and reaches
# nothing): the binaries, the default
# model's tokenizer (for `model synth`), and this script as run.sh.
#
# Run half (under 5 minutes): makes the models and adapters there from seeds and writes
# every figure to gpu-figures.txt:
#   (a) every kernel against its oracle, (b) the seeded model on the CPU and the GPU
#   (tests/cuda_backend.rs, with --include-ignored); (c) the kernel and step benchmark
#   (benches/cuda_lora.rs); (d) a closed-loop load run of the server on the synthetic 1B
#   model in bf16: base only, one adapter, 64 distinct adapters, and cold rank-64
#   all-linear adapters loaded beside 16 running streams; (e) tenants, a burst beyond the
#   queue bounds, mid-generation deadlines and another tenant's adapter on the GPU.
set -euo pipefail

# The GPU machine receives at most 64 MiB: the working tree and the staged folder.
TRAVEL_LIMIT_MB=62

build_half() {
  cd "$(dirname "$0")/.."
  local root stage link
  root=$(pwd)
  stage="$root/target/gpu-stage"
  link="$root/target/cuda-link"
  bash scripts/cuda-env.sh true  # installs the pinned toolchain
  # Link-time libraries: cuBLAS, cuRAND, NVRTC (pinned to the 13.0 release) and the
  # CUDA runtime, as lib*.so names in one folder, plus a libcuda stub.
  local pins=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
  if [ ! -f .venv-cuda/.link-libs ]; then
    .venv-cuda/bin/pip install --quiet --disable-pip-version-check "${pins[@]}"
    touch .venv-cuda/.link-libs
  fi
  local cu13
  cu13=$(cd .venv-cuda/lib/python3*/site-packages/nvidia/cu13 && pwd)
  rm -rf "$link" && mkdir -p "$link"
  for lib in cublas cublasLt nvrtc cudart curand; do
    local so
    so=$(find "$cu13" "$cu13/.." -name "lib$lib.so.*" -not -name "*.alt.*" 2>/dev/null | sort | head -1)
    [ -n "$so" ] || { echo "lib$lib.so.* not found under $cu13" >&2; exit 1; }
    ln -sf "$so" "$link/lib$lib.so"
  done
  # The stub: every driver entry point cudarc declares, as an empty function (cudarc's
  # source is in cargo's registry once the dependencies are fetched).
  cargo fetch --quiet
  local sys
  sys=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*\|pub fn cu[A-Za-z0-9_]*' "$sys" | awk '{print $NF}' | sort -u |
    sed 's/.*/void &(void) {}/' > "$link/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c"
  ln -sf libcuda.so "$link/libcuda.so.1"

  export RUSTFLAGS="-L $link"
  local log="$root/target/gpu-build.log"
  bash scripts/cuda-env.sh cargo build --release --features cuda --bin multilora
  bash scripts/cuda-env.sh cargo test --release --features cuda --test cuda_backend --no-run 2>&1 | tee "$log"
  bash scripts/cuda-env.sh cargo bench --features cuda --bench cuda_lora --no-run 2>&1 | tee -a "$log"
  local test_bin bench_bin
  test_bin=$(grep -o 'target/cuda/release/deps/cuda_backend-[0-9a-f]*' "$log" | tail -1)
  bench_bin=$(grep -o 'target/cuda/release/deps/cuda_lora-[0-9a-f]*' "$log" | tail -1)
  rm -rf "$stage" && mkdir -p "$stage/bin"
  cp target/cuda/release/multilora "$stage/bin/multilora"
  cp "$test_bin" "$stage/bin/cuda_backend"
  cp "$bench_bin" "$stage/bin/cuda_lora"
  strip "$stage"/bin/*
  # The default model's tokenizer as a folder (`model synth --tokenizer-from` reads
  # tokenizer.json from it): a tiny synthetic model's folder without its weights. The
  # CUDA binary runs here against the stub (synth makes no CUDA call).
  local tok
  tok=$(bash scripts/fetch-model.sh any)
  LD_LIBRARY_PATH="$link:$cu13/lib" "$stage/bin/multilora" model synth --shape tiny \
    --out "$stage/tokenizer" --tokenizer-from "$tok" > /dev/null
  rm -f "$stage/tokenizer/model.safetensors"
  # The three binaries share most of their code and all of candle's PTX: one xz stream
  # with a window larger than any binary stores the shared part once (run.sh unpacks).
  tar -C "$stage/bin" -cf - . | xz -9e --lzma2=dict=192MiB -T1 > "$stage/bin.tar.xz"
  rm -rf "$stage/bin"
  cp "$0" "$stage/run.sh"
  cp scripts/ncu_summary.py "$stage/"
  # What travels to the GPU machine is the working tree plus this folder.
  local size tree
  size=$(du -sm "$stage" | cut -f1)
  tree=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 ))
  echo "staged $stage: ${size} MB (the working tree adds ${tree} MB)"
  du -sh "$stage"/bin.tar.xz "$stage/tokenizer"
  if [ $((size + tree)) -gt "$TRAVEL_LIMIT_MB" ]; then
    echo "the staged folder and the working tree are over $TRAVEL_LIMIT_MB MB" >&2
    exit 1
  fi
}

# LD_LIBRARY_PATH for the CUDA 13 libraries of the GPU machine (cuBLAS, cuRAND, NVRTC):
# CUDA_LIBS if set, else the first folder found holding each.
find_cuda_libs() {
  local dirs=() lib d
  for lib in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10 libcudart.so.13; do
    d=$(find ${CUDA_LIBS:-} /usr/local /usr/lib /opt /root /home -name "$lib" 2>/dev/null | head -1 || true)
    [ -n "$d" ] && dirs+=("$(dirname "$d")") || echo "warning: $lib not found" >&2
  done
  local IFS=:
  echo "${dirs[*]}"
}

wait_port() {
  local port=$1 pid=$2
  for _ in $(seq 1 600); do
    (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && return 0
    kill -0 "$pid" 2> /dev/null || return 1
    sleep 0.5
  done
  return 1
}

# Unpacks the staged binaries (once) and points the loader at the CUDA 13 libraries.
unpack() {
  if [ -f bin.tar.xz ] && [ ! -x bin/multilora ]; then
    mkdir -p bin
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' bin.tar.xz bin
    chmod +x bin/*
  fi
  export LD_LIBRARY_PATH="$(find_cuda_libs):${LD_LIBRARY_PATH:-}"
}

run_half() {
  cd "$(dirname "$0")"
  # On the device tool's machine, $OUT is what comes back: write there as we go, so a
  # run stopped at its time limit still returns what it measured.
  local out=${OUT:+$OUT/}gpu-figures.txt work=gpu-work
  unpack
  mkdir -p "$work"
  : > "$out"
  { echo "# gpu-check $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee -a "$out"
  echo "## (a) kernels against their oracles, (b) the model on the CPU and the GPU" | tee -a "$out"
  timeout 150 ./bin/cuda_backend --include-ignored --test-threads=1 --nocapture 2>&1 | tee -a "$out" || echo "TESTS FAILED" | tee -a "$out"
  # `quick` leaves out the benchmark and the profile (c, c2): the server's checks only.
  if [ "${1:-run}" != quick ]; then
    echo "## (c) kernel and step benchmark" | tee -a "$out"
    timeout 120 ./bin/cuda_lora --bench 2>&1 | tee -a "$out" || echo "BENCH FAILED" | tee -a "$out"
    echo "## (c2) GPU time per kernel of the 1B decode step (ncu; the bench's step figures under the profiler)"
    if command -v ncu > /dev/null; then
      timeout 150 ncu --metrics gpu__time_duration.sum --print-summary per-kernel \
        ./bin/cuda_lora --bench --step-only > "$work/ncu.txt" 2>&1 || echo "NCU FAILED" | tee -a "$out"
      python3 "$(pwd)/ncu_summary.py" "$work/ncu.txt" 2>&1 | tee -a "$out" || true
      if [ -n "${OUT:-}" ]; then gzip -c "$work/ncu.txt" > "$OUT/ncu.txt.gz"; fi
    else
      echo "ncu not found" | tee -a "$out"
    fi
  fi
  echo "## (d) closed-loop load on the synthetic 1B model (bf16)" | tee -a "$out"
  timeout 200 bash "$(basename "$0")" load "$work" 2>&1 | tee -a "$out" || echo "LOAD RUN FAILED" | tee -a "$out"
  echo "## (e) tenants, backpressure and deadlines on the GPU" | tee -a "$out"
  timeout 120 bash "$(basename "$0")" tenants "$work" 2>&1 | tee -a "$out" || echo "TENANT RUN FAILED" | tee -a "$out"
  echo "figures in $out"
  if [ -n "${OUT:-}" ]; then cp "$work/server.log" "$work/tenants-server.log" "$OUT/" 2>/dev/null || true; fi
}

load_runs() {
  local work=$1 bin=./bin/multilora port=50071
  [ -f "$work/m1b/model.safetensors" ] || $bin model synth --shape 1b --out "$work/m1b" --tokenizer-from tokenizer > /dev/null
  $bin adapters synth --model "$work/m1b" --out "$work/a64" --count 64 --prefix a --ranks 16 --targets q,k,v,o --distinct 8 > /dev/null
  $bin adapters synth --model "$work/m1b" --out "$work/cold" --count 4 --prefix cold --ranks 64 \
    --targets q,k,v,o,gate,up,down --seed 9 > /dev/null
  $bin serve --model "$work/m1b" --device cuda --listen "127.0.0.1:$port" --adapter-dir "$work/a64" --adapter-dir "$work/cold" \
    --kv-cache-memory 8GiB --adapter-memory 4GiB > "$work/server.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' RETURN
  wait_port $port $pid || { tail -20 "$work/server.log"; return 1; }
  local common=(--endpoint "http://127.0.0.1:$port" --concurrency 64 --input-len 128 --output-len 64
                --ignore-eos --quiet --seed 1)
  echo "- base only";   $bin bench "${common[@]}" --warmup 16 --requests 192 | head -8
  echo "- one adapter"; $bin bench "${common[@]}" --warmup 16 --requests 192 --adapters a-0 | head -8
  # Warm-up over all 64, so the figure is serving, not first loads.
  echo "- 64 adapters"; $bin bench "${common[@]}" --warmup 64 --requests 192 --num-adapters 64 --adapter-prefix a --popularity distinct | head -8
  # The same with 8-token prompts: how much of the gap above is prefill.
  local short=(--endpoint "http://127.0.0.1:$port" --concurrency 64 --input-len 8 --output-len 64
               --ignore-eos --warmup 16 --quiet --seed 1 --requests 192)
  echo "- base only, 8-token prompts";   $bin bench "${short[@]}" | head -3
  echo "- one adapter, 8-token prompts"; $bin bench "${short[@]}" --adapters a-0 | head -3
  # 16 streams that all start at once and decode for several seconds (no second wave of
  # prefills), first alone, then with 4 cold rank-64 all-linear adapters requested while
  # they decode: the streams' largest inter-token gap against their median.
  local streams_args=(--endpoint "http://127.0.0.1:$port" --concurrency 16 --requests 16
                      --input-len 128 --output-len 1024 --ignore-eos --warmup 0 --quiet)
  echo "- 16 streams alone"
  $bin bench "${streams_args[@]}" --seed 3 --json "$work/alone.json" | head -3
  echo "- 16 streams with cold rank-64 all-linear adapters requested while they decode"
  $bin bench "${streams_args[@]}" --seed 2 --json "$work/streams.json" > "$work/streams.txt" &
  local streams=$!
  sleep 1.5
  for i in 0 1 2 3; do
    $bin bench --endpoint "http://127.0.0.1:$port" --adapters "cold-$i" --concurrency 1 --requests 1 \
      --input-len 16 --output-len 4 --quiet --seed $i | head -1
    sleep 0.3
  done
  wait $streams
  head -3 "$work/streams.txt"
  python3 - "$work/alone.json" "$work/streams.json" <<'PY' || true
import json, sys
for label, path in zip(["alone", "beside the cold loads"], sys.argv[1:]):
    s = json.load(open(path))["summary"]
    itl, e2e = s["itl"], s["e2e"]
    print(f"streams {label}: inter-token gap max {itl['max']*1e3:.1f} ms, p99.9 "
          f"{itl['p999']*1e3:.1f} ms, p99 {itl['p99']*1e3:.1f} ms, median "
          f"{itl['p50']*1e3:.1f} ms, max/median {itl['max']/itl['p50']:.2f} (target < 1.5 "
          f"beside the loads); e2e max {e2e['max']:.2f} s")
PY
}

# Issue 15's limits with the engine on the GPU (the synthetic 1B model of load_runs):
# a burst of 10x the running and waiting bounds (the excess refused at once), deadlines
# that expire mid-generation (every KV block back afterwards), another tenant's adapter
# (PERMISSION_DENIED), and a valid request after each.
tenant_runs() {
  local work=$1 bin=./bin/multilora port=50073 http=8073
  [ -f "$work/m1b/model.safetensors" ] || $bin model synth --shape 1b --out "$work/m1b" --tokenizer-from tokenizer > /dev/null
  [ -d "$work/a64" ] || $bin adapters synth --model "$work/m1b" --out "$work/a64" --count 64 --prefix a --ranks 16 --targets q,k,v,o --distinct 8 > /dev/null
  digest() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
  printf '[[tenant]]\nname = "a"\napi_key_sha256 = ["%s"]\nadapters = ["*"]\n\n[[tenant]]\nname = "b"\napi_key_sha256 = ["%s"]\nadapters = ["b-*"]\n' \
    "$(digest gpu-key-a)" "$(digest gpu-key-b)" > "$work/tenants.toml"
  echo gpu-key-a > "$work/a.key"
  echo gpu-key-b > "$work/b.key"
  $bin serve --model "$work/m1b" --device cuda --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http" \
    --adapter-dir "$work/a64" --tenants-file "$work/tenants.toml" --max-running 32 \
    --max-waiting-requests 16 --kv-cache-memory 8GiB > "$work/tenants-server.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' RETURN
  wait_port $port $pid || { tail -20 "$work/tenants-server.log"; return 1; }
  local common=(--endpoint "http://127.0.0.1:$port" --warmup 0 --seed 1 --quiet --ignore-eos)
  local ok=(--api-keys "$work/a.key" --concurrency 1 --requests 1 --input-len 16 --output-len 8)
  echo "- burst: 480 at once against 32 running + 16 waiting (the excess RESOURCE_EXHAUSTED)"
  $bin bench "${common[@]}" --api-keys "$work/a.key" --concurrency 480 --requests 480 \
    --input-len 128 --output-len 256 --num-adapters 8 --adapter-prefix a --json "$work/burst.json" | head -3
  echo "- deadline 400 ms on 16 requests of 1,024 tokens (DEADLINE_EXCEEDED mid-generation)"
  $bin bench "${common[@]}" --api-keys "$work/a.key" --concurrency 16 --requests 16 \
    --input-len 64 --output-len 1024 --deadline-ms 400 --json "$work/deadline.json" | head -3
  sleep 0.5
  echo "- tenant b asks for a-0 (PERMISSION_DENIED)"
  $bin bench "${common[@]}" --api-keys "$work/b.key" --concurrency 1 --requests 1 \
    --input-len 16 --output-len 8 --adapters a-0 --json "$work/denied.json" | head -3
  echo "- a valid request after each"
  $bin bench "${common[@]}" "${ok[@]}" --adapters a-1 --json "$work/after.json" | head -3
  python3 - "$work" "$http" <<'PY'
import json, re, sys, urllib.request
work, http = sys.argv[1], sys.argv[2]
def summary(name):
    return json.load(open(f"{work}/{name}.json"))["summary"]
metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10).read().decode()
held = re.search(r'multilora_kv_blocks\{state="sequences"\} (\S+)', metrics)
burst, deadline, denied, after = (summary(n) for n in ["burst", "deadline", "denied", "after"])
print(f"burst: {burst['succeeded']} served, errors {burst.get('errors', {})}")
print(f"deadline: {deadline['succeeded']} finished, errors {deadline.get('errors', {})}")
print(f"denied: errors {denied.get('errors', {})}; after: {after['succeeded']} succeeded")
print(f"KV blocks held by sequences afterwards: {held.group(1) if held else 'not found'}")
checks = [
    set(burst.get("errors", {})) <= {"RESOURCE_EXHAUSTED"} and burst.get("errors"),
    set(deadline.get("errors", {})) == {"DEADLINE_EXCEEDED"},
    denied.get("errors") == {"PERMISSION_DENIED": 1},
    after["succeeded"] == 1,
    held is not None and float(held.group(1)) == 0,
]
print("tenant checks: " + ("passed" if all(checks) else f"FAILED {checks}"))
PY
}


# The decode-speed figures (issue 30), under 5 minutes: the attention kernels against the
# CPU first, then the kernel and step benchmark with cudarc's event tracking on and off,
# with each attention kernel and with the fused kernels, then the closed loop on the synthetic 1B model (bf16):
# base only, one adapter, 64 distinct rank-16 adapters on q,v and on every linear layer,
# and base only again with event tracking on. Text in gpu-perf.txt, one JSON object in
# gpu-figures-<card>.json (commit both under bench/results/).
perf_half() {
  cd "$(dirname "$0")"
  unpack
  local work=gpu-work bin=./bin/multilora
  mkdir -p "$work"
  local card
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z' | sed 's/^nvidia-//; s/-*$//')
  local out=${OUT:+$OUT/}gpu-perf.txt json=${OUT:+$OUT/}gpu-figures-${card:-unknown}.json
  : > "$out"
  { echo "# gpu-check perf $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee -a "$out"
  echo "## attention and fused kernels against the CPU" | tee -a "$out"
  timeout 90 ./bin/cuda_backend --include-ignored --test-threads=1 paged_attention fused_kernels 2>&1 | tee "$work/attention-parity.txt" | tail -4 | tee -a "$out" || true
  echo "## kernel and step benchmark (event tracking off, the default)" | tee -a "$out"
  timeout 120 ./bin/cuda_lora --bench 2>&1 | tee -a "$out" > "$work/bench.txt" || echo "BENCH FAILED" | tee -a "$out"
  echo "## the step with event tracking on" | tee -a "$out"
  MULTILORA_CUDA_EVENT_TRACKING=1 timeout 60 ./bin/cuda_lora --bench --step-only 2>&1 | tee -a "$out" > "$work/step-events.txt" || true
  echo "## the step with split decode attention" | tee -a "$out"
  MULTILORA_CUDA_ATTENTION=split timeout 60 ./bin/cuda_lora --bench --step-only 2>&1 | tee -a "$out" > "$work/step-split.txt" || true
  echo "## the step with the fused kernels" | tee -a "$out"
  MULTILORA_CUDA_FUSED=1 timeout 60 ./bin/cuda_lora --bench --step-only 2>&1 | tee -a "$out" > "$work/step-fused.txt" || true
  echo "## the step with both" | tee -a "$out"
  MULTILORA_CUDA_ATTENTION=split MULTILORA_CUDA_FUSED=1 timeout 60 ./bin/cuda_lora --bench --step-only 2>&1 | tee -a "$out" > "$work/step-new.txt" || true
  echo "## closed loop" | tee -a "$out"
  timeout 200 bash "$(basename "$0")" closed-loop "$work" 2>&1 | tee -a "$out" || echo "CLOSED LOOP FAILED" | tee -a "$out"
  python3 - "$work" "$json" "${card:-unknown}" <<'PY' | tee -a "$out"
import json, os, re, sys, datetime
work, path, card = sys.argv[1:]
def figures(name):
    found = {}
    try:
        for line in open(os.path.join(work, name)):
            m = re.match(r"figure (\S+) (\S+)", line)
            if m:
                found[m.group(1)] = float(m.group(2))
    except FileNotFoundError:
        pass
    return found
def loop(name):
    try:
        s = json.load(open(os.path.join(work, f"loop-{name}.json")))["summary"]
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return {"tok_s": s["token_throughput"], "tpot_p50_ms": s["tpot"]["p50"] * 1e3,
            "ttft_p50_ms": s["ttft"]["p50"] * 1e3}
def phases():
    pattern = re.compile(r"step phases over (\d+) steps \(mean us per step, (\S+) rows\): plan (\d+), "
                         r"upload (\d+), enqueue (\d+), sync (\d+), sample (\d+)")
    windows = []
    try:
        for line in open(os.path.join(work, "perf-server-0.log")):
            m = pattern.search(line)
            if m:
                keys = ["steps", "rows", "plan_us", "upload_us", "enqueue_us", "sync_us", "sample_us"]
                windows.append(dict(zip(keys, map(float, m.groups()))))
    except FileNotFoundError:
        pass
    return windows
bench, events, split = figures("bench.txt"), figures("step-events.txt"), figures("step-split.txt")
fused, new = figures("step-fused.txt"), figures("step-new.txt")
parity = open(os.path.join(work, "attention-parity.txt")).read() if os.path.exists(os.path.join(work, "attention-parity.txt")) else ""
run = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": card,
    # No CUDA graphs yet: nothing replays, so nothing can be compared bitwise.
    "graph_vs_eager_bitwise": None,
    "attention_parity_passed": "test result: ok" in parity,
    "step_ms_b64": bench.get("step_ms_b64"),
    "gemm_ms_b64": bench.get("gemm_ms_b64"),
    "gemm_timing": "eager (not graph-captured)",
    "step_over_gemm": bench.get("step_over_gemm"),
    "distinct64_step_ratio": bench.get("distinct64_step_ratio"),
    "step_ms_b64_event_tracking_on": events.get("step_ms_b64"),
    "step_ms_b64_split_attention": split.get("step_ms_b64"),
    "step_ms_b64_fused": fused.get("step_ms_b64"),
    "step_ms_b64_split_and_fused": new.get("step_ms_b64"),
    "attention_pct_of_copy": {k: bench.get(f"attention_pct_of_copy.{k}.per_head") for k in ["b64_ctx128", "b8_ctx8192"]},
    "attention_pct_of_copy_split": {k: bench.get(f"attention_pct_of_copy.{k}.split") for k in ["b64_ctx128", "b8_ctx8192"]},
    "bgmv_pct_of_copy": bench.get("bgmv_pct_of_copy"),
    "closed_loop": {k: loop(k) for k in ["base", "one_adapter", "distinct64_qv_r16", "distinct64_all_r16"]},
    "closed_loop_event_tracking_on": {"base": loop("base_events")},
    # The server's own log: mean microseconds per step over each 10-second window.
    "step_phases": phases(),
}
json.dump([run], open(path, "w"), indent=1)
print(json.dumps(run, indent=1))
print(f"figures in {path}")
PY
}

# The closed loops of perf_half: 64 streams, 128-token prompts, 64 tokens out, equal
# warm-up and request counts for every run.
closed_loop_runs() {
  local work=$1 bin=./bin/multilora port=50075
  [ -f "$work/m1b/model.safetensors" ] || $bin model synth --shape 1b --out "$work/m1b" --tokenizer-from tokenizer > /dev/null
  [ -d "$work/qv" ] || $bin adapters synth --model "$work/m1b" --out "$work/qv" --count 64 --prefix qv --ranks 16 --targets q,v --distinct 8 > /dev/null
  [ -d "$work/all" ] || $bin adapters synth --model "$work/m1b" --out "$work/all" --count 64 --prefix all --ranks 16 \
    --targets q,k,v,o,gate,up,down --distinct 8 > /dev/null
  local common=(--endpoint "http://127.0.0.1:$port" --concurrency 64 --input-len 128 --output-len 64
                --ignore-eos --quiet --seed 1 --warmup 64 --requests 256)
  for events in 0 1; do
    MULTILORA_CUDA_EVENT_TRACKING=$events $bin serve --model "$work/m1b" --device cuda --listen "127.0.0.1:$port" \
      --adapter-dir "$work/qv" --adapter-dir "$work/all" --kv-cache-memory 8GiB --adapter-memory 4GiB > "$work/perf-server-$events.log" 2>&1 &
    local pid=$!
    wait_port $port $pid || { tail -20 "$work/perf-server-$events.log"; kill $pid 2>/dev/null; return 1; }
    if [ $events = 0 ]; then
      echo "- base only";     $bin bench "${common[@]}" --json "$work/loop-base.json" | head -3
      echo "- one adapter";   $bin bench "${common[@]}" --adapters qv-0 --json "$work/loop-one_adapter.json" | head -3
      echo "- 64 distinct q,v rank 16"
      $bin bench "${common[@]}" --num-adapters 64 --adapter-prefix qv --popularity distinct --json "$work/loop-distinct64_qv_r16.json" | head -3
      echo "- 64 distinct all-linear rank 16"
      $bin bench "${common[@]}" --num-adapters 64 --adapter-prefix all --popularity distinct --json "$work/loop-distinct64_all_r16.json" | head -3
    else
      echo "- base only, event tracking on"; $bin bench "${common[@]}" --json "$work/loop-base_events.json" | head -3
    fi
    kill $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
  done
}

case "${1:-run}" in
  build) build_half ;;
  run|quick) run_half "${1:-run}" ;;
  perf) perf_half ;;
  closed-loop) cd "$(dirname "$0")" && closed_loop_runs "$2" ;;
  load) cd "$(dirname "$0")" && load_runs "$2" ;;
  tenants) cd "$(dirname "$0")" && tenant_runs "$2" ;;
  *) echo "usage: $0 build|run|quick|perf|load WORK|tenants WORK|closed-loop WORK" >&2; exit 2 ;;
esac
