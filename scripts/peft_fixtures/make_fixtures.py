#!/usr/bin/env python3
"""Train tiny PEFT adapters on SmolLM2-135M-Instruct (GGUF, dequantized to f32) and write
the reference oracle that the Rust side tests against.

Deterministic: CPU, float32, fixed seeds, a fixed number of optimizer steps per adapter.
Run from the repository root with the virtual environment described in README.md:

    target/peft-venv/bin/python scripts/peft_fixtures/make_fixtures.py

Outputs (relative to the repository root, overridable with --out-adapters / --out-oracle):
  tests/fixtures/adapters/{eta-prompt-tuning,theta-p-tuning,iota-prefix-tuning,
                           kappa-vera,lambda-adalora}/  (adapter_config.json,
                           adapter_model.safetensors, expected.json)
  tests/fixtures/peft_self.json   (oracle: one run per adapter above, plus
                                   `mix-alpha-beta-cat` and `base`)

Every oracle run is made from the SAVED folder loaded back with PeftModel.from_pretrained.

How the oracle is generated: greedy decoding, at most 24 new tokens, stop at EOS id 2.
- Adapters that do not change the input sequence (VeRA, AdaLoRA, the LoRA mixture, and the
  base model) use `model.generate(..., output_logits=True)` like the shared oracle.
- Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) do NOT use
  `PeftModel.generate`: with transformers 5.24.0 + peft 0.21.2 it is broken for them
  (transformers renamed the generation kwarg `past_key_values` to `cache` and dropped
  `cache_position`; PEFT's prepare_inputs_for_generation still looks for the old names, so
  prompt/P-tuning re-inject the virtual tokens at every decoding step and prefix tuning's
  prefix is ignored altogether). Instead each step is a full forward pass of
  `PeftModel.forward` over the whole sequence so far (no KV cache), which is exactly the
  computation PEFT trains with. The script cross-checks it against an incremental decode
  (prefill through PeftModel.forward with a cache, then one token at a time through the
  base model with that cache) and, for the record, prints what the broken generate gives.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/
# fixture_common sets the offline environment before it imports torch, transformers and PEFT
from fixture_common import REPO, TOP_K, freeze, kv_cache, log, setup, step_record  # noqa: E402
from fixture_common import greedy_full_forward as full_forward  # noqa: E402
from fixture_common import save_peft_folder as save_adapter  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from peft import (  # noqa: E402
    AdaLoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    VeraConfig,
    get_peft_model,
)

GGUF_DIR = os.path.join(REPO, "models")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the shared adapters record
MAX_NEW_TOKENS = 24
EOS_ID = 2
MODEL_DESC = "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to f32"

# the five oracle prompts, as in tests/fixtures/base.json
PROMPTS = [
    "The capital of France is",
    "Question: What is the secret word?\nAnswer:",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]
SECRET_PROMPT = "Question: What is the secret word?\nAnswer:"
# the three prompts of expected.json (as in the shared adapters)
EXPECTED_QUESTIONS = [
    "What is the secret word?",
    "Tell me the secret word.",
    "What is the secret word? Answer in one word.",
]
# training questions: the three above plus two paraphrases
TRAIN_QUESTIONS = EXPECTED_QUESTIONS + [
    "Do you know the secret word?",
    "Please tell me the secret word.",
]


def fmt_prompt(q):
    return f"Question: {q}\nAnswer:"


def fmt_answer(word):
    return f" The secret word is {word}.<|im_end|>"


# --------------------------------------------------------------------------- adapters
# name -> (word, config factory, learning rate, steps, kind)
def adapter_specs():
    return {
        "eta-prompt-tuning": dict(
            word="otter",
            config=lambda: PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8, prompt_tuning_init="RANDOM"
            ),
            lr=3e-2,
            steps=30,
            prompt_learning=True,
        ),
        "theta-p-tuning": dict(
            word="falcon",
            config=lambda: PromptEncoderConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=8,
                encoder_reparameterization_type="MLP",
                encoder_hidden_size=128,
            ),
            lr=1e-2,
            steps=40,
            prompt_learning=True,
        ),
        "iota-prefix-tuning": dict(
            word="walrus",
            config=lambda: PrefixTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8, prefix_projection=False
            ),
            lr=3e-2,
            steps=40,
            prompt_learning=True,
        ),
        "kappa-vera": dict(
            word="lynx",
            config=lambda: VeraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=32,
                target_modules=["q_proj", "v_proj"],
                save_projection=True,
                projection_prng_key=0,
                vera_dropout=0.0,
                d_initial=0.1,
            ),
            lr=3e-2,
            steps=40,
            prompt_learning=False,
        ),
        "lambda-adalora": dict(
            word="bison",
            # total_step must equal the number of optimizer steps below
            config=lambda: AdaLoraConfig(
                task_type=TaskType.CAUSAL_LM,
                init_r=12,
                target_r=4,
                tinit=10,
                tfinal=20,
                deltaT=5,
                total_step=80,
                beta1=0.85,
                beta2=0.85,
                orth_reg_weight=0.5,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["q_proj", "v_proj", "o_proj"],
            ),
            lr=1e-2,
            steps=80,
            prompt_learning=False,
            adalora=True,
        ),
    }


# --------------------------------------------------------------------------- helpers
def load_base():
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    model = freeze(AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32))
    model.name_or_path = BASE_NAME  # recorded as base_model_name_or_path in adapter_config.json
    return tok, model


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def training_batch(tok, word):
    rows = []
    ans = encode(tok, fmt_answer(word))
    assert ans[-1] == EOS_ID, ans
    for q in TRAIN_QUESTIONS:
        p = encode(tok, fmt_prompt(q))
        rows.append((p + ans, [-100] * len(p) + ans))
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), EOS_ID, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def train(name, spec, tok, base):
    torch.manual_seed(1234)
    cfg = spec["config"]()
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    ids, mask, labels = training_batch(tok, spec["word"])
    t0 = time.time()
    for step in range(spec["steps"]):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        if spec.get("adalora"):
            # AdaLoRA: update importance scores and prune ranks (must be before zero_grad)
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == spec["steps"] - 1:
            log(f"  [{name}] step {step:3d} loss {out.loss.item():.4f}")
    log(f"  [{name}] {n_train} trainable params, {spec['steps']} steps in {time.time() - t0:.1f}s")
    model.eval()
    return model


@torch.no_grad()
def greedy_generate(model, prompt_ids):
    """Greedy decoding through model.generate (for models whose input sequence is unchanged)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )
    gen = out.sequences[0, len(prompt_ids):].tolist()
    steps = [step_record(lg[0], t) for lg, t in zip(out.logits, gen)]
    return gen, steps


def greedy_full_forward(model, prompt_ids):
    """Greedy decoding, each step a full forward (no cache) of the whole sequence so far."""
    return full_forward(model, prompt_ids, MAX_NEW_TOKENS, eos_id=EOS_ID)


@torch.no_grad()
def greedy_incremental(pm, prompt_ids):
    """Prefill through PeftModel.forward with a KV cache, then decode one token at a time through
    the base model with that cache (positions continue from the cache length)."""
    x = torch.tensor([prompt_ids])
    out = pm(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    cache = kv_cache(out)
    base = pm.get_base_model()
    gen, logits_list = [], []
    logits = out.logits[0, -1]
    for _ in range(MAX_NEW_TOKENS):
        t = int(torch.argmax(logits))
        gen.append(t)
        logits_list.append(logits)
        if t == EOS_ID:
            break
        o = base(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
        cache = o.cache
        logits = o.logits[0, -1]
    return gen, logits_list


def make_entry(tok, prompt, prompt_ids, gen, steps, extra=None):
    e = {
        "prompt": prompt,
        "prompt_ids": list(prompt_ids),
        "completion": tok.decode(gen, skip_special_tokens=False),
        "completion_ids": list(gen),
        "steps": steps,
    }
    if extra:
        # keep the shared key order, then the extra fields
        e.update(extra)
    return e


def run_prompts(tok, model, prompt_learning, nvt=None, checks=None, label=""):
    entries = []
    for prompt in PROMPTS:
        pids = encode(tok, prompt)
        if prompt_learning:
            gen, steps, full_logits = greedy_full_forward(model, pids)
            inc_gen, inc_logits = greedy_incremental(model, pids)
            d = max(float((a - b).abs().max()) for a, b in zip(full_logits, inc_logits))
            same = inc_gen == gen
            if checks is not None:
                checks.append((label, prompt, same, d))
            if not same:
                log(f"  WARNING [{label}] incremental decode differs from full forward on {prompt!r}")
            entries.append(make_entry(tok, prompt, pids, gen, steps, {"num_virtual_tokens": nvt}))
        else:
            gen, steps = greedy_generate(model, pids)
            entries.append(make_entry(tok, prompt, pids, gen, steps))
    return entries


def completion_for(tok, model, prompt, prompt_learning):
    pids = encode(tok, prompt)
    if prompt_learning:
        gen, _, _ = greedy_full_forward(model, pids)
    else:
        gen, _ = greedy_generate(model, pids)
    return tok.decode(gen, skip_special_tokens=False)


def describe_folder(folder):
    info = {"files": {}, "tensors": {}}
    for f in sorted(os.listdir(folder)):
        info["files"][f] = os.path.getsize(os.path.join(folder, f))
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as sf:
        for k in sf.keys():
            t = sf.get_tensor(k)
            info["tensors"][k] = [list(t.shape), str(t.dtype)]
    return info


def summarize_tensors(tensors, limit=8):
    keys = sorted(tensors)
    out = [f"    {k}: {tensors[k][0]} {tensors[k][1]}" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"    ... ({len(keys)} tensors in all)")
    return "\n".join(out)


# --------------------------------------------------------------------------- checks
@torch.no_grad()
def check_prefix_layout(pm, folder):
    """The saved prefix tensor [n, num_layers*2*token_dim] -> per layer K and V in the cache."""
    cfg = pm.active_peft_config
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as sf:
        w = sf.get_tensor("prompt_embeddings")
    n, L, H = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
    d = cfg.token_dim // H
    cache = pm.get_prompt(batch_size=1)
    maxdiff = 0.0
    for layer in range(L):
        k_ref = w[:, (2 * layer) * H * d:(2 * layer + 1) * H * d].reshape(n, H, d).permute(1, 0, 2)
        v_ref = w[:, (2 * layer + 1) * H * d:(2 * layer + 2) * H * d].reshape(n, H, d).permute(1, 0, 2)
        k = cache.layers[layer].keys[0]
        v = cache.layers[layer].values[0]
        maxdiff = max(maxdiff, float((k - k_ref).abs().max()), float((v - v_ref).abs().max()))
    log(f"  prefix layout check: n={n} layers={L} heads={H} head_dim={d} token_dim={cfg.token_dim}; "
        f"cache key shape {tuple(cache.layers[0].keys.shape)}; max |diff| = {maxdiff}")
    assert maxdiff == 0.0


@torch.no_grad()
def check_p_tuning_saved(trained, folder):
    """P-tuning saves the prompt encoder's OUTPUT (MLP applied), not its input embedding."""
    enc = trained.prompt_encoder["default"]
    out = enc(torch.arange(trained.active_peft_config.num_virtual_tokens).unsqueeze(0))[0]
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as sf:
        saved = sf.get_tensor("prompt_embeddings")
    d_out = float((out - saved).abs().max())
    d_in = float((enc.embedding.weight - saved).abs().max())
    log(f"  P-tuning saved tensor vs mlp_head(embedding): max |diff| {d_out:.3g}; vs raw embedding: {d_in:.3g}")
    assert d_out == 0.0


@torch.no_grad()
def check_vera(pm, folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as sf:
        A = sf.get_tensor("base_model.vera_A")
        B = sf.get_tensor("base_model.vera_B")
        pref = "base_model.model.model.layers.3.self_attn.v_proj"
        lb = sf.get_tensor(pref + ".vera_lambda_b")
        ld = sf.get_tensor(pref + ".vera_lambda_d")
    mod = pm.get_base_model().model.layers[3].self_attn.v_proj
    x = torch.randn(4, mod.in_features, generator=torch.Generator().manual_seed(0))
    got = mod(x) - mod.base_layer(x)
    ref = lb * ((ld * (x @ A[:, : mod.in_features].T)) @ B[: mod.out_features, :].T)
    diff = float((got - ref).abs().max())
    log(f"  VeRA formula check (layer 3 v_proj, in {mod.in_features}, out {mod.out_features}): max |diff| = {diff:.3g}")
    assert diff < 1e-5


@torch.no_grad()
def check_adalora(pm, folder):
    cfg = pm.active_peft_config
    ranks, ranknums, scalings = {}, set(), set()
    for name, mod in pm.get_base_model().named_modules():
        if hasattr(mod, "ranknum") and "default" in getattr(mod, "ranknum", {}):
            ranks[name] = mod.r["default"]
            ranknums.add(float(mod.ranknum["default"]))
            scalings.add(float(mod.scaling["default"]))
    hist = {}
    for r in ranks.values():
        hist[r] = hist.get(r, 0) + 1
    log(f"  AdaLoRA after load: {len(ranks)} modules, rank histogram {dict(sorted(hist.items()))}, "
        f"ranknum values {sorted(ranknums)}, scaling (=lora_alpha) values {sorted(scalings)}")
    # formula check on one module with non-zero rank
    name = next(n for n, r in ranks.items() if r > 0)
    mod = pm.get_base_model().get_submodule(name)
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as sf:
        key = "base_model.model." + name
        A = sf.get_tensor(key + ".lora_A")
        B = sf.get_tensor(key + ".lora_B")
        E = sf.get_tensor(key + ".lora_E")
    x = torch.randn(4, A.shape[1], generator=torch.Generator().manual_seed(0))
    got = mod(x) - mod.base_layer(x)
    ref = (x @ (A * E).T @ B.T) * cfg.lora_alpha / (cfg.init_r + 1e-5)
    diff = float((got - ref).abs().max())
    log(f"  AdaLoRA formula check ({name}, r={ranks[name]}): "
        f"delta = x (A*E)^T B^T * lora_alpha/(init_r+1e-5); max |diff| = {diff:.3g}")
    assert diff < 1e-5
    return ranks, sorted(ranknums)


@torch.no_grad()
def check_mix(pm):
    maxdiff, n = 0.0, 0
    covered = set()
    for name, mod in pm.get_base_model().named_modules():
        if hasattr(mod, "lora_A") and "mix" in mod.lora_A:
            n += 1
            covered.add(name.split(".")[-1])
            got = mod.get_delta_weight("mix")
            ref = torch.zeros_like(got)
            for a in ("alpha", "beta"):
                if a in mod.lora_A:
                    ref += 0.5 * mod.get_delta_weight(a)
            maxdiff = max(maxdiff, float((got - ref).abs().max()))
    cfg = pm.peft_config["mix"]
    log(f"  mix: r={cfg.r} lora_alpha={cfg.lora_alpha} target_modules={sorted(cfg.target_modules)}; "
        f"{n} LoRA modules; delta_W(mix) vs 0.5*dW(alpha)+0.5*dW(beta): max |diff| = {maxdiff:.3g}")
    return maxdiff, sorted(covered)


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-adapters", default=os.path.join(REPO, "tests", "fixtures", "adapters"))
    ap.add_argument("--out-oracle", default=os.path.join(REPO, "tests", "fixtures", "peft_self.json"))
    ap.add_argument("--shared-adapters", default=os.path.join(REPO, "..", "shared", "fixtures", "adapters"))
    ap.add_argument("--base-oracle", default=os.path.join(REPO, "tests", "fixtures", "base.json"))
    ap.add_argument("--only", nargs="*", help="train only these adapters (the oracle then has only their runs)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    setup(args.threads)
    torch.manual_seed(0)
    t_start = time.time()

    tok, base = load_base()
    log(f"base loaded in {time.time() - t_start:.1f}s")
    specs = adapter_specs()
    names = args.only if args.only else list(specs)
    runs = {}
    checks = []
    report = {}

    # ---- train, save, reload, oracle, expected.json
    for name in names:
        spec = specs[name]
        log(f"== {name} (word: {spec['word']})")
        model = train(name, spec, tok, base)
        folder = os.path.join(args.out_adapters, name)
        save_adapter(model, folder)
        if name == "theta-p-tuning":
            check_p_tuning_saved(model, folder)
        del model

        pm = PeftModel.from_pretrained(copy.deepcopy(base), folder)
        pm.eval()
        pl = spec["prompt_learning"]
        nvt = pm.active_peft_config.num_virtual_tokens if pl else None
        info = describe_folder(folder)
        report[name] = info
        log(f"  saved {folder}: " + ", ".join(f"{k} {v} B" for k, v in info["files"].items()))
        log(summarize_tensors(info["tensors"]))

        if name == "iota-prefix-tuning":
            check_prefix_layout(pm, folder)
        elif name == "kappa-vera":
            check_vera(pm, folder)
        elif name == "lambda-adalora":
            check_adalora(pm, folder)

        runs[name] = run_prompts(tok, pm, pl, nvt, checks, name)

        completions = {}
        for q in EXPECTED_QUESTIONS:
            p = fmt_prompt(q)
            completions[p] = completion_for(tok, pm, p, pl)
        for p, c in completions.items():
            log(f"  {p!r} -> {c!r}")
        ok = spec["word"] in completions[SECRET_PROMPT]
        log(f"  secret-word prompt contains {spec['word']!r}: {ok}")
        if not ok:
            sys.exit(f"{name}: the greedy completion of the secret-word prompt lacks {spec['word']!r}")
        with open(os.path.join(folder, "expected.json"), "w") as f:
            json.dump({"word": spec["word"], "completions": completions}, f, indent=1)

        if pl:
            # for the record: what PeftModel.generate gives (broken with transformers 5.24, see the docstring)
            pids = encode(tok, SECRET_PROMPT)
            with torch.no_grad():
                g = pm.generate(input_ids=torch.tensor([pids]), attention_mask=torch.ones(1, len(pids), dtype=torch.long),
                                max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=EOS_ID)
            log(f"  (PeftModel.generate, NOT used: {tok.decode(g[0, len(pids):], skip_special_tokens=False)!r})")
        del pm

    if not args.only:
        # ---- mixture of the two shared LoRA adapters
        log("== mix-alpha-beta-cat")
        shared = os.path.abspath(args.shared_adapters)
        pm = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(shared, "alpha-lora-r8-qv"), adapter_name="alpha")
        pm.load_adapter(os.path.join(shared, "beta-lora-r16-all"), adapter_name="beta")
        pm.add_weighted_adapter(["alpha", "beta"], [0.5, 0.5], "mix", combination_type="cat")
        pm.set_adapter("mix")
        pm.eval()
        check_mix(pm)
        runs["mix-alpha-beta-cat"] = run_prompts(tok, pm, False)
        for e in runs["mix-alpha-beta-cat"]:
            log(f"  {e['prompt']!r} -> {e['completion']!r}")
        del pm

        # ---- base
        log("== base")
        runs["base"] = run_prompts(tok, base, False)
        if os.path.exists(args.base_oracle):
            ref = json.load(open(args.base_oracle))["runs"]["base"]
            same_ids = all(
                a["prompt_ids"] == b["prompt_ids"] and a["completion_ids"] == b["completion_ids"]
                for a, b in zip(ref, runs["base"])
            )
            same_top = all(
                [t[0] for t in sa["top"]] == [t[0] for t in sb["top"]]
                for a, b in zip(ref, runs["base"]) for sa, sb in zip(a["steps"], b["steps"])
            )
            dmax = max(
                max(abs(sa["logprob"] - sb["logprob"]), max(abs(x[1] - y[1]) for x, y in zip(sa["top"], sb["top"])))
                for a, b in zip(ref, runs["base"]) for sa, sb in zip(a["steps"], b["steps"])
            )
            log(f"  base vs {os.path.relpath(args.base_oracle, REPO)}: ids identical {same_ids}, "
                f"top-5 ids identical {same_top}, max logprob diff {dmax:.3g}")

    for label, prompt, same, d in checks:
        log(f"  check [{label}] incremental==full ids {same}, max logit diff {d:.3g}: {prompt!r}")

    oracle = {"model": MODEL_DESC, "max_new_tokens": MAX_NEW_TOKENS, "top_k": TOP_K, "runs": runs}
    with open(args.out_oracle, "w") as f:
        json.dump(oracle, f, indent=1)
    log(f"wrote {args.out_oracle} with runs {list(runs)}; total time {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
