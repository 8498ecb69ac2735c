# The two commands: `make run` (build, fetch the default model, serve on 127.0.0.1:50051)
# and `make test` (every test, including the real-model ones).
GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf
VENV := .venv
PY := $(VENV)/bin/python
LISTEN ?= 127.0.0.1:50051

.PHONY: run test lint unit model python bench bench-micro bench-peers check-cuda gpu-build soak clean

# Demo adapters: two synthetic LoRA adapters (demo-0 rank 8, demo-1 rank 16).
DEMO := models/demo-adapters

run:
	cargo build --release
	model="$$(bash scripts/fetch-model.sh any)" && \
	  { [ -d $(DEMO) ] || ./target/release/multilora adapters synth --model "$$model" \
	      --out $(DEMO) --count 2 --prefix demo --ranks 8,16; } && \
	  exec ./target/release/multilora serve --model "$$model" --adapter-dir $(DEMO) --listen $(LISTEN)

model: $(GGUF)

$(GGUF):
	bash scripts/fetch-model.sh gguf

# The Python client example's dependencies, in a project-local virtual environment.
python: $(VENV)/.installed

$(VENV)/.installed: examples/python/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
	touch $@

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# Plain `cargo test` skips the real-model tests; this runs them too.
test: $(GGUF) python lint
	MULTILORA_PYTHON=$(abspath $(PY)) cargo test --all-targets -- --include-ignored

unit:
	cargo test

# The CUDA path without a GPU: the pinned nvcc 13.0 from PyPI (scripts/cuda-env.sh)
# compiles every .cu file to PTX and candle's CUDA backend; clippy checks every target
# with the `cuda` feature (in target/cuda, apart from the plain build).
check-cuda:
	bash scripts/cuda-env.sh cargo clippy --features cuda --all-targets -- -D warnings

# The build half of the GPU check: links and stages the CUDA binaries in
# target/gpu-stage (carry it to the GPU machine and run its run.sh there).
gpu-build: $(GGUF)
	bash scripts/gpu-check.sh build

# Not part of CI: 10 minutes (SOAK_SECONDS) of two tenants' traffic with adapter churn,
# deadlines and a queue bound; checks error codes, memory and KV blocks afterwards.
soak: $(GGUF)
	cargo build --release
	bash scripts/soak.sh

# The README's experiment (about 15 minutes): default model and a synthetic 1B-class
# model, base only and 1 to 2,048 adapters; writes bench/results/.
bench: $(GGUF)
	cargo build --release
	bash scripts/bench-experiment.sh

# Kernel, step and serving micro-benchmarks (ratios in one run).
bench-micro: $(GGUF)
	cargo bench --bench decode_step
	cargo bench --bench cpu_linear
	cargo bench --bench grpc_throughput
	cargo bench --bench adapter_throughput
	cargo bench --bench lora_kernels
	cargo bench --bench adapter_scale

# Peer benchmark against llama.cpp's llama-server, same GGUF model, CPU, base model only
# (about 4-9 minutes; the first run also builds llama-server from the llama-cpp-python
# sdist into target/peers/, 10-20 minutes on 2 cores). Writes bench/results/peers.md.
# Extra `multilora serve` flags: make bench-peers SERVE_FLAGS="--dtype quantized"
bench-peers: $(GGUF)
	SERVE_FLAGS="$(SERVE_FLAGS)" bash scripts/bench-peers.sh

clean:
	cargo clean
