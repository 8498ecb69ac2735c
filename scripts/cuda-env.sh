#!/usr/bin/env bash
# Runs a command with the pinned CUDA 13.0 toolchain of `make check-cuda` (nvcc from PyPI
# in .venv-cuda, installed here on first use) and a separate target folder
# (target/cuda), so CUDA builds never invalidate the plain build. PTX from a newer nvcc
# does not load on the GPU machine's driver (580 / CUDA 13.0): keep these pins.
#   bash scripts/cuda-env.sh cargo check --features cuda --all-targets
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-cuda
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 "nvidia-cuda-crt==13.0.*"
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
stamp="$VENV/.installed-$(echo "${PINS[*]}" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  touch "$stamp"
fi
N=$(cd "$VENV"/lib/python3*/site-packages/nvidia/cu13 && pwd)
export PATH="$N/bin:$PATH" CUDA_ROOT="$N" CUDA_PATH="$N" CUDA_HOME="$N"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
exec "$@"
