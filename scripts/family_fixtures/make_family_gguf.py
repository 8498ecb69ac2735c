#!/usr/bin/env python3
"""Convert the tiny family checkpoints to GGUF with llama.cpp's own converter.

For each family folder tests/fixtures/families/<family>/ (written by make_family_fixtures.py)
this runs llama.cpp's convert_hf_to_gguf.py, the one vendored by the llama-cpp-python sdist
(version LLAMA_CPP_PY below), with `--outtype f32`, and writes
tests/fixtures/families/gguf/<family>.gguf plus SHA256SUMS (the sha256 of each .gguf and of
the checkpoint files it was made from, so `cd tests/fixtures/families/gguf && sha256sum -c
SHA256SUMS` says whether a GGUF is stale after make_family_fixtures.py rewrote its source).
The point is that a converter we did not write decides the GGUF tensor names, layouts (Q/K
permutation, norm +1, fused tensors, rope_freqs) and metadata, so the Rust GGUF reader can be
tested against it.

Run from the repository root with the fixtures' virtual environment (see README.md):

    target/peft-venv/bin/python scripts/family_fixtures/make_family_gguf.py [--only qwen2 gemma2]

Where llama.cpp comes from: the llama-cpp-python sdist, cached and unpacked in the same place
scripts/bench-peers.sh uses (target/peers/cache/, target/peers/src/). If the tarball is not
there it is fetched with `pip download --no-deps --no-binary llama-cpp-python
llama-cpp-python==<version>`, like bench-peers.sh does (its sha256 is checked before it is
unpacked). `--sdist FILE` uses a tarball you already have, `--llama-cpp DIR` an unpacked
vendor/llama.cpp folder.

Each conversion runs in its own child process whose import path puts the vendored gguf-py
(and the vendored `conversion` package) ahead of any installed `gguf`, so converter and gguf
library always match. Every family is converted twice (two separate processes); the two
files must be byte-identical (sha256) or the script fails.

What is patched, and only that (all of it vocabulary; see patch_converter_vocab below):
  1. `set_vocab` of the converter class of the family (LlamaModel, Qwen2Model, Qwen3Model,
     Gemma2Model, Gemma3Model, Phi3MiniModel) is replaced by the converter's own
     `TextModel._set_vocab_gpt2()`. The originals want a sentencepiece tokenizer.model
     (Llama, Qwen2/3 try sentencepiece first and crash with ModuleNotFoundError when the
     sentencepiece package is absent, before they would fall back to gpt2; Gemma 2 and Phi-3
     require tokenizer.model outright). Gemma 3's own set_vocab already calls
     _set_vocab_gpt2() when there is no tokenizer.model, so for it the patch changes nothing.
     Side effects of skipping the originals: Gemma 2's set_vocab would also have written
     `tokenizer.ggml.add_space_prefix = false` (a sentencepiece setting), Phi-3's would
     have written tokenizer.ggml.model "llama"; neither is written now.
  2. `TextModel.get_vocab_base_pre` returns "gpt-2" instead of looking the tokenizer's hash up
     in its table of known pre-tokenizers (ours is made up, so the lookup raises
     NotImplementedError). "gpt-2" is llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2, whose regex is
     exactly the GPT-2 regex of the fixtures' ByteLevel(use_regex=true) pre-tokenizer.
  3. `transformers.AutoTokenizer.from_pretrained`, which the converter's get_vocab_base() calls,
     loads the folder with PreTrainedTokenizerFast (the loader the fixtures' README
     prescribes). Plain AutoTokenizer picks Qwen2Tokenizer for the qwen2 folders, which adds
     an `<|endoftext|>` of its own at id 320 and trips the converter's
     `assert max(tokenizer.vocab.values()) < vocab_size`.
Nothing else is touched: hparams, set_gguf_parameters, modify_tensors (permutations, norm
shifts, splits), generate_extra_tensors (rope_freqs) and the writer are the converter's.

Checked on every run: general.architecture, tokenizer.ggml.model "gpt2" with 320 tokens and
the fixture's merges, every tensor F32; and (unless --no-verify) every GGUF tensor equals the
one re-derived from model.safetensors with the rules in README.md / expected_tensors() below
(names, Llama Q/K row permutation, Gemma norm +1, Phi-3 fused tensors, llama3 rope_freqs), and
no tensor is missing or extra.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

LLAMA_CPP_PY = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as pip downloads it
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEERS = os.path.join(REPO, "target", "peers")  # shared with scripts/bench-peers.sh
FAMILIES_DIR = os.path.join(REPO, "tests", "fixtures", "families")
FAMILIES = ["llama3", "llama-bias", "qwen2", "qwen2-yarn", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]
# GGUF general.architecture expected for each family
EXPECTED_ARCH = {
    "llama3": "llama", "llama-bias": "llama", "mistral": "llama",
    "qwen2": "qwen2", "qwen2-yarn": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3",
}
PRE_TOKENIZER = "gpt-2"


# ---------------------------------------------------------------------------------------------
# llama.cpp source
# ---------------------------------------------------------------------------------------------

def llama_cpp_dir(args) -> str:
    if args.llama_cpp:
        d = os.path.abspath(args.llama_cpp)
        if not os.path.isfile(os.path.join(d, "convert_hf_to_gguf.py")):
            sys.exit(f"{d}: no convert_hf_to_gguf.py")
        return d
    src = os.path.join(PEERS, "src", f"llama_cpp_python-{LLAMA_CPP_PY}", "vendor", "llama.cpp")
    if os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        return src
    sdist = args.sdist or os.path.join(PEERS, "cache", f"llama_cpp_python-{LLAMA_CPP_PY}.tar.gz")
    if not os.path.isfile(sdist):
        os.makedirs(os.path.dirname(sdist), exist_ok=True)
        print(f"== downloading the llama-cpp-python {LLAMA_CPP_PY} sdist", file=sys.stderr)
        # --no-binary for this package only (as scripts/bench-peers.sh): with :all: pip would
        # also build the sdist's build requirements from source just to read its metadata.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PY}",
                        "-d", os.path.dirname(sdist)], check=True)
    if sha256(sdist) != SDIST_SHA256:
        sys.exit(f"{sdist}: sha256 {sha256(sdist)}, expected {SDIST_SHA256}")
    print(f"== unpacking {sdist}", file=sys.stderr)
    os.makedirs(os.path.join(PEERS, "src"), exist_ok=True)
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(os.path.join(PEERS, "src"), filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(os.path.join(PEERS, "src"))
    if not os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        sys.exit(f"{sdist} did not unpack to {src}")
    return src


# ---------------------------------------------------------------------------------------------
# child: one conversion
# ---------------------------------------------------------------------------------------------

def patch_converter_vocab(hf_arch: str):
    """The vocabulary-only workarounds described in the module docstring."""
    import transformers
    from transformers import PreTrainedTokenizerFast
    import conversion
    from conversion.base import TextModel

    def _from_pretrained(path, *a, **k):
        return PreTrainedTokenizerFast.from_pretrained(path, *a, **k)
    transformers.AutoTokenizer.from_pretrained = staticmethod(_from_pretrained)

    def _get_vocab_base_pre(self, tokenizer):
        return PRE_TOKENIZER
    TextModel.get_vocab_base_pre = _get_vocab_base_pre

    cls = conversion.get_model_class(hf_arch)

    def _set_vocab(self):
        self._set_vocab_gpt2()
    cls.set_vocab = _set_vocab
    return cls


def child_convert(llama_dir: str, model_dir: str, outfile: str):
    sys.path[:0] = [os.path.join(llama_dir, "gguf-py"), llama_dir]
    import gguf
    want = os.path.join(llama_dir, "gguf-py", "gguf")
    if os.path.dirname(os.path.abspath(gguf.__file__)) != want:
        sys.exit(f"imported gguf from {gguf.__file__}, not the vendored {want}")
    import convert_hf_to_gguf
    with open(os.path.join(model_dir, "config.json")) as f:
        hf_arch = json.load(f)["architectures"][0]
    cls = patch_converter_vocab(hf_arch)
    print(f"== {os.path.basename(model_dir)}: {hf_arch} -> {cls.__module__}.{cls.__name__}", file=sys.stderr)
    sys.argv = ["convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", outfile, model_dir]
    convert_hf_to_gguf.main()


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

def run_child(llama_dir: str, family: str, outfile: str, verbose: bool):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0")
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", llama_dir,
           os.path.join(FAMILIES_DIR, family), outfile]
    r = subprocess.run(cmd, env=env, cwd=llama_dir, capture_output=not verbose, text=True)
    if r.returncode != 0:
        if not verbose:
            sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
        raise RuntimeError(f"{family}: the converter failed (exit {r.returncode})")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def field_value(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_gguf(gguf_mod, family: str, path: str):
    r = gguf_mod.GGUFReader(path)
    arch = field_value(r, "general.architecture")
    assert arch == EXPECTED_ARCH[family], (family, arch)
    assert field_value(r, "tokenizer.ggml.model") == "gpt2", family
    assert field_value(r, "tokenizer.ggml.pre") == PRE_TOKENIZER, family
    assert len(field_value(r, "tokenizer.ggml.tokens")) == 320, family
    with open(os.path.join(FAMILIES_DIR, family, "tokenizer.json")) as f:
        merges = json.load(f)["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert field_value(r, "tokenizer.ggml.merges") == merges, family
    for t in r.tensors:
        assert t.tensor_type == gguf_mod.GGMLQuantizationType.F32, (family, t.name, t.tensor_type)
    return r


# --- --verify: the converter's transformations, restated ---------------------------------------

def permute_llama(w, n_head):
    """convert_hf_to_gguf LlamaModel.permute: per head, rows [x0 x1 ... | y0 y1 ...] (HF's
    rotate_half halves) -> interleaved [x0 y0 x1 y1 ...] (ggml's NORM rope pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def expected_tensors(family: str):
    """GGUF name -> float32 numpy array (numpy/torch row-major shape, i.e. GGUF shape reversed),
    derived from model.safetensors with the rules in README.md (what the converter does)."""
    import math
    import numpy as np
    import torch
    from safetensors.torch import load_file
    d = os.path.join(FAMILIES_DIR, family)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    hf = {k: v.float() for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    arch = EXPECTED_ARCH[family]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gemma = arch in ("gemma2", "gemma3")
    out = {}
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    }
    if gemma:
        names.update({"post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    for k, v in hf.items():
        if k == "model.embed_tokens.weight":
            out["token_embd.weight"] = v
            continue
        if k == "model.norm.weight":
            out["output_norm.weight"] = v + 1 if gemma else v
            continue
        if k == "lm_head.weight":
            out["output.weight"] = v
            continue
        parts = k.split(".")
        assert parts[:2] == ["model", "layers"], k
        bid, module, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
        if arch == "phi3" and module == "mlp.gate_up_proj":
            out[f"blk.{bid}.ffn_up.weight"] = v  # kept fused (gate rows first, then up)
            continue
        name = f"blk.{bid}.{names[module]}.{suffix}"
        if arch == "llama" and module == "self_attn.q_proj":
            v = permute_llama(v, nh)
        if arch == "llama" and module == "self_attn.k_proj":
            v = permute_llama(v, nkv)
        if gemma and name.endswith("norm.weight"):
            v = v + 1
        out[name] = v
    rope = cfg.get("rope_parameters", {})
    if rope.get("rope_type") == "llama3":
        hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
        freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        lo = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
        hi = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
        fac = []
        for fr in freqs:  # 0-d float32 tensors, as in the converter (float32 arithmetic)
            wl = 2 * math.pi / fr
            if wl < hi:
                fac.append(1.0)
            elif wl > lo:
                fac.append(rope["factor"])
            else:
                s = (rope["original_max_position_embeddings"] / wl - rope["low_freq_factor"]) / (
                    rope["high_freq_factor"] - rope["low_freq_factor"])
                fac.append(1 / ((1 - s) / rope["factor"] + s))
        out["rope_freqs.weight"] = torch.tensor(fac, dtype=torch.float32)
    return {k: v.numpy().astype(np.float32) for k, v in out.items()}


def verify(reader, family: str):
    import numpy as np
    want = expected_tensors(family)
    got = {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    if set(want) != set(got):
        raise AssertionError(f"{family}: tensor names differ: only expected {sorted(set(want) - set(got))}, "
                             f"only in GGUF {sorted(set(got) - set(want))}")
    for name, w in want.items():
        if got[name].shape != w.shape or not np.array_equal(got[name], w):
            raise AssertionError(f"{family}: {name}: GGUF {got[name].shape} differs from the expected {w.shape}")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_convert(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=FAMILIES, help="convert only these families")
    ap.add_argument("--out", default=os.path.join(FAMILIES_DIR, "gguf"))
    ap.add_argument("--sdist", help="llama-cpp-python sdist tarball to unpack (default: the cache, else pip download)")
    ap.add_argument("--llama-cpp", help="an unpacked vendor/llama.cpp folder to use instead")
    ap.add_argument("--no-verify", action="store_true", help="skip re-deriving the tensors from safetensors")
    ap.add_argument("--verbose", action="store_true", help="show the converter's log")
    args = ap.parse_args()

    llama_dir = llama_cpp_dir(args)
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    import gguf  # the vendored one, for reading back
    families = args.only or FAMILIES
    os.makedirs(args.out, exist_ok=True)
    sums = read_sums(os.path.join(args.out, "SHA256SUMS"))
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            before = input_sums(family, args.out)
            a, b = os.path.join(tmp, f"{family}.a.gguf"), os.path.join(tmp, f"{family}.b.gguf")
            run_child(llama_dir, family, a, args.verbose)
            run_child(llama_dir, family, b, args.verbose)
            if input_sums(family, args.out) != before:
                raise SystemExit(f"{family}: its checkpoint folder changed during the conversion "
                                 "(is make_family_fixtures.py running?); run again")
            ha, hb = sha256(a), sha256(b)
            if ha != hb:
                keep = os.path.join(tempfile.gettempdir(), f"make_family_gguf-{family}-mismatch")
                os.makedirs(keep, exist_ok=True)
                shutil.copy(a, keep)
                shutil.copy(b, keep)
                raise SystemExit(f"{family}: two conversions differ ({ha} vs {hb}); both kept in {keep}")
            reader = check_gguf(gguf, family, a)
            if not args.no_verify:
                verify(reader, family)
            del reader  # it memory-maps the file
            dst = os.path.join(args.out, f"{family}.gguf")
            shutil.move(a, dst)
            for rel in list(sums):
                if rel.startswith(f"../{family}/"):
                    del sums[rel]
            sums.update(before)
            sums[f"{family}.gguf"] = ha
            print(f"{family:11} {EXPECTED_ARCH[family]:7} {os.path.getsize(dst):8d} bytes  sha256 {ha}")
    write_sums(os.path.join(args.out, "SHA256SUMS"), sums)


# SHA256SUMS (sha256sum format, paths relative to the gguf folder): every <family>.gguf and the
# checkpoint files it was converted from, so `cd tests/fixtures/families/gguf && sha256sum -c
# SHA256SUMS` tells whether a GGUF is stale after make_family_fixtures.py rewrote its source.
INPUT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json"]


def input_sums(family: str, out_dir: str) -> dict:
    res = {}
    for name in INPUT_FILES:
        path = os.path.join(FAMILIES_DIR, family, name)
        if os.path.isfile(path):
            rel = os.path.relpath(path, out_dir)
            res[rel] = sha256(path)
    return res


def read_sums(path: str) -> dict:
    res = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                h, name = line.rstrip("\n").split("  ", 1)
                res[name] = h
    return res


def sums_order(name: str):
    for i, family in enumerate(FAMILIES):
        if name == f"{family}.gguf":
            return (i, 1, name)
        if name.startswith(f"../{family}/"):
            return (i, 0, name)
    return (len(FAMILIES), 0, name)


def write_sums(path: str, sums: dict):
    with open(path, "w") as f:
        for name in sorted(sums, key=sums_order):
            f.write(f"{sums[name]}  {name}\n")

if __name__ == "__main__":
    main()
