#!/usr/bin/env python3
"""Write tiny random-weight checkpoints of several model families, PEFT adapters on them, and
the greedy reference outputs that the Rust tests compare against.

Everything is built offline on the CPU: the configs are constructed in code, the weights are
random (rounded to bf16 values and saved as bf16 safetensors), the tokenizer is a small
byte-level BPE trained here on a synthetic text. Run from the repository root with the
virtual environment described in README.md:

    target/peft-venv/bin/python scripts/family_fixtures/make_family_fixtures.py

Output: tests/fixtures/families/<family>/ with
  config.json, generation_config.json, model.safetensors (bf16),
  tokenizer.json, tokenizer_config.json,
  lora/ (and for some families dora/, ia3/, prompt/): PEFT save_pretrained folders,
  oracle.json: {"family", "model_type", "runs": {"base": [...], "lora": [...], ...}, ...}
and for llama3 and qwen2-yarn also config.classic.json (rope_theta + rope_scaling form).

How the references are made: the checkpoint is loaded back from disk in float32 with eager
attention (adapters loaded back with PeftModel.from_pretrained). For each of four fixed prompts
(random ids) each of the 10 new tokens is the argmax of the last row of ONE FULL FORWARD over
the whole sequence so far (use_cache=False, no generate(), no EOS stopping). Each step records
the token, its log_softmax logprob, the top 5 [id, logprob] and `margin` (top1 - top2 logprob).
A family whose smallest margin is below --min-margin (default 0.01), whose adapters leave a
greedy completion unchanged, or whose completions contain an EOS id, is redone with the next
seed (the seeds are fixed, so the outputs are byte-for-byte reproducible).
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/
# fixture_common sets the offline environment before it imports torch, transformers and PEFT
from fixture_common import REPO, TOP_K, freeze, kv_cache, last_logits, log, save_peft_folder, setup  # noqa: E402
from fixture_common import greedy_full_forward as full_forward  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402

VOCAB = 320
NEW_TOKENS = 10
PROMPT_LENGTHS = [5, 11, 19, 29]
PROMPT_SEED = 20240
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
LLAMA3_EXTRA_SPECIALS = ["<|eot_id|>", "<|eom_id|>"]  # ids VOCAB-2, VOCAB-1

# weight init (std of a normal); the point is peaked logits, so embeddings are large
STD_LINEAR = 0.15
STD_QK_GEMMA2 = 0.3  # larger q/k so that attention scores reach the attn softcap's curved part
STD_EMBED = 0.6
# Tied embeddings: a large embedding makes the model repeat its last input token (the logit of the
# input token is ~|e|^2), so tied families get a smaller embedding and a larger final norm weight
# (the logits keep about the same spread). Gemma also multiplies the input by sqrt(hidden) = 8, so
# its embedding is smaller still, and its post-attention / post-feedforward norms scale by ~2 so
# that the layers' contributions are not drowned by the input embedding.
TIED = dict(embed_std=0.25, final_norm_scale=2.4)
GEMMA = dict(embed_std=0.06, final_norm_scale=10.0, post_norm_scale=2.0)
STD_BIAS = 0.1
STD_NORM = 0.1  # norm weights: 1 + N(0, STD_NORM), or N(0, STD_NORM) for Gemma's (1 + w) norms
STD_ADAPTER = 0.2  # lora_A / lora_B
STD_IA3 = 0.3  # ia3 vectors: 1 + N(0, STD_IA3)
STD_DORA_MAG = 0.2  # DoRA magnitude: PEFT's initial ||W + s BA|| times (1 + N(0, STD_DORA_MAG))

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
IA3_STD = dict(target=["k_proj", "v_proj", "up_proj", "down_proj"], ff=["up_proj", "down_proj"])
IA3_PHI3 = dict(target=["qkv_proj", "gate_up_proj", "down_proj"], ff=["gate_up_proj", "down_proj"])


def plain_rope(theta):
    """A `sensitivity` variant: the config's RoPE (scaled) replaced by plain RoPE with `theta`."""
    return lambda c: setattr(c, "rope_parameters", {"rope_type": "default", "rope_theta": theta})


def families():
    """name -> dict(config=factory, adapters=[...], gemma_norm, classic, ...)"""
    return {
        "llama3": dict(
            **TIED,
            config=lambda: LlamaConfig(
                **COMMON,
                head_dim=16,
                tie_word_embeddings=True,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
            eos=[EOS_ID, VOCAB - 2, VOCAB - 1],
            extra_specials=LLAMA3_EXTRA_SPECIALS,
            classic={
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            },
            adapters=["lora"],
            sensitivity={"rope_default_theta_500000": plain_rope(500000.0)},
        ),
        "llama-bias": dict(
            config=lambda: LlamaConfig(
                **COMMON,
                head_dim=16,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            adapters=["lora"],
        ),
        "qwen2": dict(
            **TIED,
            config=lambda: Qwen2Config(
                **COMMON,
                tie_word_embeddings=True,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            adapters=["lora", "dora", "ia3", "prompt"],
            ia3=IA3_STD,
        ),
        "qwen2-yarn": dict(
            **TIED,
            # built from the classic form (as Qwen2.5 checkpoints ship it); config.json records
            # what transformers 5 turns it into
            config=lambda: Qwen2Config(
                **COMMON,
                tie_word_embeddings=True,
                use_sliding_window=False,
                rope_theta=10000.0,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            ),
            classic={
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            },
            adapters=["lora"],
            sensitivity={"rope_default_no_yarn": plain_rope(10000.0)},
        ),
        "qwen3": dict(
            config=lambda: Qwen3Config(
                **COMMON,
                head_dim=32,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            adapters=["lora"],
        ),
        "mistral": dict(
            config=lambda: MistralConfig(
                **COMMON,
                head_dim=16,
                sliding_window=8,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            adapters=["lora"],
            window=True,
        ),
        "gemma2": dict(
            **GEMMA,
            config=lambda: Gemma2Config(
                **COMMON,
                head_dim=16,
                sliding_window=8,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                query_pre_attn_scalar=24,
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            gemma_norm=True,
            qk_std=STD_QK_GEMMA2,
            adapters=["lora", "dora", "ia3", "prompt"],
            ia3=IA3_STD,
            window=True,
            softcaps=True,
        ),
        "gemma3": dict(
            **GEMMA,
            config=lambda: Gemma3TextConfig(
                **{**COMMON, "num_hidden_layers": 4},
                head_dim=16,
                sliding_window=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                query_pre_attn_scalar=24,
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                },
            ),
            gemma_norm=True,
            adapters=["lora"],
            window=True,
            sensitivity={"full_layers_rope_theta_10000": lambda c: c.rope_parameters["full_attention"].update(
                rope_theta=10000.0)},
        ),
        "phi3": dict(
            config=lambda: Phi3Config(
                **COMMON,
                original_max_position_embeddings=256,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            adapters=["lora", "ia3"],
            ia3=IA3_PHI3,
            check_module="model.layers.1.self_attn.qkv_proj",
        ),
    }


# --------------------------------------------------------------------------- helpers
def bf16_round_(t):
    t.data.copy_(t.data.to(torch.bfloat16).to(t.dtype))
    return t


def randn_like(t, gen, std, mean=0.0):
    return torch.randn(t.shape, generator=gen, dtype=torch.float32) * std + mean


def prompts():
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# --------------------------------------------------------------------------- tokenizer
CORPUS_WORDS = (
    "the of and to in is was for on that with as by at from this his her are be it an not "
    "which or have had one their all were but there has been when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three adapter model server token"
).split()


def build_tokenizer(extra_specials):
    """A byte-level BPE with exactly VOCAB ids: <pad> 0, <s> 1, </s> 2, the 256 byte symbols,
    merges learnt from a synthetic text, then `extra_specials` at the end."""
    g = torch.Generator().manual_seed(7)
    lines = []
    for _ in range(400):
        idx = torch.randint(0, len(CORPUS_WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(CORPUS_WORDS[i] for i in idx) + ".")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(extra_specials),
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB - len(extra_specials), tok.get_vocab_size()
    if extra_specials:
        tok.add_special_tokens(extra_specials)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(["<pad>", "<s>", "</s>"]):
        assert tok.token_to_id(s) == i
    for i, s in enumerate(extra_specials):
        assert tok.token_to_id(s) == VOCAB - len(extra_specials) + i
    return tok


def write_tokenizer(folder, extra_specials):
    tok = build_tokenizer(extra_specials)
    tok.save(os.path.join(folder, "tokenizer.json"))
    specials = ["<pad>", "<s>", "</s>"] + list(extra_specials)
    ids = [0, 1, 2] + [VOCAB - len(extra_specials) + i for i in range(len(extra_specials))]
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": True}
            for i, s in zip(ids, specials)
        },
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
    # it must load in transformers as a plain tokenizers-backed tokenizer and round-trip text
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    text = "the adapter model said hello, world!"
    enc = hf(text, add_special_tokens=False)["input_ids"]
    assert hf.decode(enc) == text, hf.decode(enc)
    assert len(hf) == VOCAB and max(enc) < VOCAB, (len(hf), max(enc))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    # for the record: AutoTokenizer picks the model type's own class for some families, and that
    # class may add tokens of its own (e.g. Qwen2Tokenizer adds <|endoftext|> at id VOCAB)
    auto = AutoTokenizer.from_pretrained(folder)
    return {"auto_class": type(auto).__name__, "auto_len": len(auto),
            "auto_added": {int(i): str(t) for i, t in auto.added_tokens_decoder.items() if i >= VOCAB}}


# --------------------------------------------------------------------------- model
def randomize_base(model, gen, spec):
    """Re-initialise every parameter (normal, larger std than the default) and round it to bf16."""
    gemma = spec.get("gemma_norm", False)
    for name, p in model.named_parameters():
        leaf = name.split(".")[-2] if "." in name else name
        if p.ndim == 1 and "norm" in name:
            neutral = 0.0 if gemma else 1.0
            scale = 1.0  # multiplier the norm applies on average
            if name == "model.norm.weight":
                scale = spec.get("final_norm_scale", 1.0)
            elif gemma and (".post_attention_layernorm." in name or ".post_feedforward_layernorm." in name):
                scale = spec.get("post_norm_scale", 1.0)
            v = randn_like(p, gen, STD_NORM, neutral + scale - 1.0)
        elif name.endswith(".bias"):
            v = randn_like(p, gen, STD_BIAS)
        elif "embed_tokens" in name or name.startswith("lm_head"):
            v = randn_like(p, gen, spec.get("embed_std", STD_EMBED))
        elif leaf in ("q_proj", "k_proj") and spec.get("qk_std"):
            v = randn_like(p, gen, spec["qk_std"])
        elif p.ndim == 2:
            v = randn_like(p, gen, STD_LINEAR)
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(v)
        bf16_round_(p)


def load_f32(folder, config_file=None):
    kw = {}
    if config_file is not None:
        kw["config"] = transformers.AutoConfig.from_pretrained(config_file)
    return freeze(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kw))


def save_checkpoint(model, folder, spec):
    m = copy.deepcopy(model).to(torch.bfloat16)
    if spec.get("eos"):
        m.generation_config.eos_token_id = list(spec["eos"])
    m.save_pretrained(folder, safe_serialization=True)
    del m


def tensor_table(path):
    out = {}
    with safe_open(path, "pt") as sf:
        for k in sf.keys():
            t = sf.get_slice(k)
            out[k] = [list(t.get_shape()), t.get_dtype()]
    return out


# --------------------------------------------------------------------------- references
def greedy_full_forward(model, prompt_ids):
    """Greedy, each step one full forward (no cache) over the whole sequence so far; no EOS stopping,
    steps with their margin."""
    gen, steps, _ = full_forward(model, prompt_ids, NEW_TOKENS, margin=True)
    return gen, steps


@torch.no_grad()
def cached_vs_full(model, entries):
    """For the record: greedy decoding with transformers' KV cache (prefill, then one token at a time)
    against the cache-free references. Returns (all ids equal, max |logprob diff| over the top 5)."""
    same, d = True, 0.0
    for e in entries:
        x = torch.tensor([e["prompt_ids"]])
        out = model(input_ids=x, use_cache=True)
        cache = kv_cache(out)
        logits = out.logits[0, -1]
        for s in e["steps"]:
            lp = torch.log_softmax(logits.float(), -1)
            t = int(torch.argmax(lp))
            same = same and t == s["token"]
            d = max(d, max(abs(float(lp[i]) - v) for i, v in s["top"]))
            out = model(input_ids=torch.tensor([[s["token"]]]), cache=cache, use_cache=True)
            cache = kv_cache(out)
            logits = out.logits[0, -1]
    return same, d


def run_prompts(model, extra=None):
    entries = []
    for pids in prompts():
        gen, steps = greedy_full_forward(model, pids)
        e = {"prompt_ids": pids, "completion_ids": gen, "steps": steps}
        if extra:
            e.update(extra)
        entries.append(e)
    return entries


def min_margin(entries):
    return min(s["margin"] for e in entries for s in e["steps"])


# --------------------------------------------------------------------------- adapters
def adapter_config(kind, spec):
    if kind == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules="all-linear", init_lora_weights=False)
    if kind == "dora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=list(ATTN), use_dora=True, init_lora_weights=False)
    if kind == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(spec["ia3"]["target"]),
                         feedforward_modules=list(spec["ia3"]["ff"]))
    if kind == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, prompt_tuning_init="RANDOM")
    raise ValueError(kind)


def randomize_adapter(pm, kind, gen, embed_std):
    with torch.no_grad():
        if kind == "prompt":
            w = pm.prompt_encoder["default"].embedding.weight
            w.copy_(randn_like(w, gen, embed_std))
            bf16_round_(w)
            return
        # lora_A/lora_B first: DoRA's magnitude is defined from W + s*B@A
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(randn_like(p, gen, STD_ADAPTER))
                bf16_round_(p)
        for name, mod in pm.named_modules():
            if kind == "dora" and hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                lA, lB = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                s = mod.scaling["default"]
                norm = torch.linalg.norm(mod.base_layer.weight + s * (lB @ lA), dim=1)
                m = mod.lora_magnitude_vector["default"].weight
                m.copy_(norm * (1.0 + randn_like(m, gen, STD_DORA_MAG)))
                bf16_round_(m)
            if kind == "ia3" and hasattr(mod, "ia3_l") and "default" in mod.ia3_l:
                v = mod.ia3_l["default"]
                v.copy_(randn_like(v, gen, STD_IA3, 1.0))
                bf16_round_(v)


def save_adapter(pm, folder, family):
    save_peft_folder(pm, folder)
    # record a repository-relative name instead of the (absolute, machine-specific) folder path
    cpath = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cpath))
    cfg["base_model_name_or_path"] = f"tests/fixtures/families/{family}"
    for k in ("target_modules", "feedforward_modules"):  # PEFT writes sets in hash order
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k])
    with open(cpath, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


@torch.no_grad()
def check_adapter_formula(pm, kind, folder, module="model.layers.1.self_attn.v_proj"):
    """Recompute one adapted module's output from the SAVED tensors; returns a description."""
    g = torch.Generator().manual_seed(5)
    base = pm.get_base_model()
    keys = tensor_table(os.path.join(folder, "adapter_model.safetensors"))
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as sf:
        T = {k: sf.get_tensor(k) for k in keys}
    if kind == "prompt":
        # PEFT: inputs_embeds = cat(prompt_embeddings, embed_tokens(ids)) (embed_tokens includes Gemma's
        # sqrt(hidden) normalizer, the virtual tokens do NOT get it), positions 0.. over the whole row
        ids = prompts()[1]
        ref_in = torch.cat([T["prompt_embeddings"], base.get_input_embeddings()(torch.tensor(ids))], 0)[None]
        ref = base(inputs_embeds=ref_in, use_cache=False).logits[0, -1]
        got = last_logits(pm, ids)
        d = float((ref - got).abs().max())
        assert d < 1e-4, d
        return (f"prompt: logits == base(inputs_embeds=cat(prompt_embeddings, embed_tokens(ids))) with "
                f"default positions; max |diff| {d:.2g}")
    name = module
    mod = base.get_submodule(name)
    x = torch.randn(3, mod.base_layer.in_features, generator=g)
    W, b = mod.base_layer.weight, mod.base_layer.bias
    bias = b if b is not None else 0.0
    pre = "base_model.model." + name
    if kind == "dora":
        A, B, m = T[pre + ".lora_A.weight"], T[pre + ".lora_B.weight"], T[pre + ".lora_magnitude_vector"]
        s = 8 / 4
        Wp = W + s * (B @ A)
        ref = (x @ Wp.T) * (m / torch.linalg.norm(Wp, dim=1)) + bias
        what = "dora: y = (m / ||W + s B A||_row) * ((W + s B A) x) + bias, s = alpha/r = 2"
    elif kind == "ia3":
        l = T[pre + ".ia3_l"]
        ref = (x @ W.T + bias) * l.flatten()
        what = f"ia3 (non-feedforward, {name.split('.')[-1]}): y = (W x + bias) * l  (the bias is scaled too)"
    else:
        A, B = T[pre + ".lora_A.weight"], T[pre + ".lora_B.weight"]
        ref = x @ W.T + bias + 2.0 * (x @ A.T @ B.T)
        what = "lora: y = W x + bias + (alpha/r) B A x, alpha/r = 2"
    got = mod(x)
    d = float((ref - got).abs().max())
    assert d < 1e-4, (kind, d)
    out = f"{what}; max |diff| {d:.2g}"
    if kind == "ia3":
        ffname = "model.layers.1.mlp.down_proj"
        ff = base.get_submodule(ffname)
        xf = torch.randn(3, ff.base_layer.in_features, generator=g)
        lf = T["base_model.model." + ffname + ".ia3_l"]
        fb = ff.base_layer.bias if ff.base_layer.bias is not None else 0.0
        d2 = float(((xf * lf.flatten()) @ ff.base_layer.weight.T + fb - ff(xf)).abs().max())
        assert d2 < 1e-4
        out += f"; feedforward (down_proj): y = W (x * l) + bias, max |diff| {d2:.2g}"
    return out


# --------------------------------------------------------------------------- checks
@torch.no_grad()
def sensitivity(model, folder, spec, entries):
    """How much the references depend on the family's special features (max |logprob diff| over all
    steps of the base run when the feature is switched off)."""
    out = {}

    def variant(mutate):
        cfg = copy.deepcopy(model.config)
        mutate(cfg)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        m.load_state_dict(model.state_dict(), strict=False)
        if getattr(cfg, "tie_word_embeddings", False):
            m.tie_weights()
        m.eval()
        d, changed = 0.0, 0
        for e in entries:
            seq = list(e["prompt_ids"])
            for s in e["steps"]:
                lp = torch.log_softmax(last_logits(m, seq), -1)
                d = max(d, max(abs(float(lp[i]) - v) for i, v in s["top"]))
                changed += int(int(torch.argmax(lp)) != s["token"])
                seq.append(s["token"])
        return {"max_logprob_diff": d, "argmax_changed_steps": changed}

    if spec.get("window"):
        out["no_sliding_window"] = variant(lambda c: setattr(c, "sliding_window", 4096))
    if spec.get("softcaps"):
        out["no_attn_softcap"] = variant(lambda c: setattr(c, "attn_logit_softcapping", None))
        out["no_final_softcap"] = variant(lambda c: setattr(c, "final_logit_softcapping", None))
    for label, mutate in spec.get("sensitivity", {}).items():
        out[label] = variant(mutate)
    if hasattr(model.config, "query_pre_attn_scalar"):
        out["query_pre_attn_scalar_as_head_dim"] = variant(
            lambda c: setattr(c, "query_pre_attn_scalar", c.head_dim))
    return out


@torch.no_grad()
def check_window_semantics():
    """One-layer Mistral, window 8: which keys does the last query see? Perturb the token at
    distance d from the last position and see whether the last logits move."""
    torch.manual_seed(0)
    cfg = MistralConfig(**{**COMMON, "num_hidden_layers": 1}, head_dim=16, sliding_window=8)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    ids = list(range(10, 30))
    ref = last_logits(m, ids)
    seen = []
    for d in range(0, 12):
        alt = list(ids)
        alt[-1 - d] = 5
        if float((last_logits(m, alt) - ref).abs().max()) > 0:
            seen.append(d)
    return seen


# --------------------------------------------------------------------------- one family
def make_family(name, spec, out_root, seed, args):
    folder = os.path.join(out_root, name)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    cfg = spec["config"]()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize_base(model, gen, spec)
    model.eval()
    save_checkpoint(model, folder, spec)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    del model

    base = load_f32(folder)
    for k, v in base.state_dict().items():
        if k in ref_state:
            assert torch.equal(v, ref_state[k]), f"{name}: {k} changed in the bf16 round trip"
    info = {"tensors": tensor_table(os.path.join(folder, "model.safetensors"))}
    info["config"] = json.load(open(os.path.join(folder, "config.json")))
    info["generation_config"] = json.load(open(os.path.join(folder, "generation_config.json")))
    info["tokenizer"] = write_tokenizer(folder, spec.get("extra_specials", []))

    # the classic (rope_theta + rope_scaling) form of the config must give the same logits
    if spec.get("classic"):
        # as transformers 4.x wrote it: rope_theta + rope_scaling, and `torch_dtype` for `dtype`
        classic = {("torch_dtype" if k == "dtype" else k): v for k, v in info["config"].items()
                   if k != "rope_parameters"}
        classic.update(spec["classic"])
        with open(os.path.join(folder, "config.classic.json"), "w") as f:
            json.dump(classic, f, indent=2, sort_keys=True)
        with tempfile.TemporaryDirectory() as td:
            shutil.copy(os.path.join(folder, "config.classic.json"), os.path.join(td, "config.json"))
            os.symlink(os.path.join(folder, "model.safetensors"), os.path.join(td, "model.safetensors"))
            cm = load_f32(td)
            ids = prompts()[3]
            d = float((last_logits(cm, ids) - last_logits(base, ids)).abs().max())
            info["classic_rope_parameters"] = cm.config.rope_parameters
            del cm
        assert info["classic_rope_parameters"] == base.config.rope_parameters, (
            info["classic_rope_parameters"], base.config.rope_parameters)
        assert d == 0.0, f"{name}: classic config gives different logits ({d})"
        info["classic_logit_diff"] = d

    def rejected(run):
        """Why this seed is no good (a near-tie, or an adapter that leaves a completion unchanged)."""
        e = runs[run]
        if min_margin(e) < args.min_margin:
            return f"min margin {min_margin(e):.2g} < {args.min_margin} in run {run}"
        if run != "base" and any(a["completion_ids"] == b["completion_ids"] for a, b in zip(e, runs["base"])):
            return f"run {run} leaves a greedy completion equal to base"
        # no EOS id in any completion, so that decoding with or without EOS stopping agrees
        if hit := sorted({t for a in e for t in a["completion_ids"] if t in eos_ids}):
            return f"run {run} generates the EOS id(s) {hit}"
        return None

    eos_ids = set()
    for c in (info["config"], info["generation_config"]):
        v = c.get("eos_token_id")
        eos_ids |= set(v) if isinstance(v, list) else ({v} if v is not None else set())

    runs = {"base": run_prompts(base)}
    if why := rejected("base"):  # checked after each run, so that a bad seed costs little
        return None, why
    info["checks"] = {}
    info["adapters"] = {}
    embed_std = float(base.get_input_embeddings()(torch.arange(3, VOCAB)).std())
    for kind in spec["adapters"]:
        pcfg = adapter_config(kind, spec)
        pm = get_peft_model(copy.deepcopy(base), pcfg)
        randomize_adapter(pm, kind, gen, embed_std)
        sub = os.path.join(folder, kind)
        save_adapter(pm, sub, name)
        resolved = getattr(pm.peft_config["default"], "target_modules", None)
        del pm
        pm = PeftModel.from_pretrained(copy.deepcopy(base), sub)
        pm.eval()
        a = {"target_modules": sorted(resolved) if resolved is not None else None,
             "tensors": tensor_table(os.path.join(sub, "adapter_model.safetensors")),
             "config": json.load(open(os.path.join(sub, "adapter_config.json")))}
        a["check"] = check_adapter_formula(pm, kind, sub, spec.get("check_module", "model.layers.1.self_attn.v_proj"))
        info["adapters"][kind] = a
        extra = {"num_virtual_tokens": pm.active_peft_config.num_virtual_tokens} if kind == "prompt" else None
        runs[kind] = run_prompts(pm, extra)
        del pm
        if why := rejected(kind):
            return None, why

    margins = {r: min_margin(e) for r, e in runs.items()}
    unchanged = {}
    for r, e in runs.items():
        if r != "base":
            unchanged[r] = sum(a["completion_ids"] == b["completion_ids"] for a, b in zip(e, runs["base"]))
    info["margins"] = margins
    info["unchanged"] = unchanged

    info["checks"]["sensitivity"] = sensitivity(base, folder, spec, runs["base"])
    info["checks"]["kv_cache_decode"] = cached_vs_full(base, runs["base"])
    oracle = {
        "family": name,
        "model_type": base.config.model_type,
        "architecture": base.config.architectures[0] if base.config.architectures else type(base).__name__,
        "seed": seed,
        "new_tokens": NEW_TOKENS,
        "top_k": TOP_K,
        "eos_stopping": False,
        "decoding": "greedy; each step one full forward over the whole sequence (use_cache=False), "
                    "float32, eager attention",
        "min_margin": margins,
        "runs": runs,
    }
    with open(os.path.join(folder, "oracle.json"), "w") as f:
        json.dump(oracle, f, indent=1)
    return info, None


# --------------------------------------------------------------------------- main
def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "families"))
    ap.add_argument("--only", nargs="*", help="make only these families")
    ap.add_argument("--min-margin", type=float, default=1e-2,
                    help="redo a family with the next seed when a greedy step's top1-top2 logprob gap is below this")
    ap.add_argument("--tries", type=int, default=40, help="seeds to try per family before failing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", default=None, help="also write the per-family details (configs, tensor "
                                                    "names, resolved target modules, checks) to this JSON file")
    args = ap.parse_args()

    setup(args.threads)
    transformers.utils.logging.disable_progress_bar()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)

    seen = check_window_semantics()
    log(f"sliding window 8 (1-layer Mistral): the last query sees the tokens at distances {seen} "
        f"(0 = itself)")
    assert seen == list(range(8)), seen

    specs = families()
    names = args.only if args.only else list(specs)
    report = {"window_distances_seen": seen, "families": {}}
    for i, name in enumerate(names):
        t0 = time.time()
        for attempt in range(args.tries):
            seed = 1000 + 100 * list(specs).index(name) + attempt
            info, why = make_family(name, specs[name], args.out, seed, args)
            if info is not None:
                break
            log(f"  {name} seed {seed}: {why}; retrying")
        else:
            sys.exit(f"{name}: no seed out of {args.tries} passed")
        report["families"][name] = info
        info["seed"] = seed
        c = info["config"]
        log(f"== {name} (seed {seed}, {time.time() - t0:.1f}s): model_type {c['model_type']}, "
            f"{sum(math.prod(s) for s, _ in info['tensors'].values())} params")
        for r, m in info["margins"].items():
            extra = f", completions equal to base {info['unchanged'][r]}/4" if r in info["unchanged"] else ""
            log(f"  run {r:7s} min margin {m:.4f}{extra}")
        for kind, a in info["adapters"].items():
            log(f"  {kind}: targets {a['target_modules']}; {a['check']}")
        same, d = info["checks"]["kv_cache_decode"]
        log(f"  base with transformers' KV cache: ids equal {same}, max |logprob diff| {d:.2g}")
        for k, v in info["checks"].get("sensitivity", {}).items():
            log(f"  sensitivity {k}: {v}")
        if "classic_logit_diff" in info:
            log(f"  config.classic.json -> rope_parameters {info['classic_rope_parameters']}; "
                f"logit diff {info['classic_logit_diff']}")

    total = dir_size(args.out)
    log(f"wrote {args.out}: {total} bytes; total time {time.time() - t_start:.0f}s")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
