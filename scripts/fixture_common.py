"""Helpers shared by the fixture generators scripts/peft_fixtures/make_fixtures.py and
scripts/family_fixtures/make_family_fixtures.py: the offline environment, the pinned
transformers/PEFT versions, greedy decoding by full forwards, the oracle's step records, and
saving a PEFT folder.

Importing this module sets the environment (offline, no tokenizer threads, no warnings) before
it imports torch, transformers and PEFT, so the scripts import it before those. Each script
puts this folder (scripts/) on sys.path first.
"""

import os
import shutil
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402

EXPECTED_VERSIONS = {"transformers": "5.24.0", "peft": "0.21.2"}
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TOP_K = 5  # [id, logprob] pairs recorded per step


def log(*a):
    print(*a, flush=True)


def setup(threads):
    """Refuse other transformers/PEFT versions than the pinned ones, log the versions, and set
    torch's thread count."""
    have = {"transformers": transformers.__version__, "peft": peft.__version__}
    for pkg, want in EXPECTED_VERSIONS.items():
        if have[pkg] != want:
            sys.exit(f"{pkg} {have[pkg]} is installed, but these fixtures need {pkg}=={want}")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    torch.set_num_threads(threads)


def freeze(model):
    """Evaluation mode, no parameter requires a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def step_record(logits, chosen, margin=False):
    """One oracle step: the chosen token, its log_softmax logprob, the top TOP_K [id, logprob] and,
    with `margin`, top-1 minus top-2 logprob."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = torch.topk(lp, TOP_K)
    rec = {
        "token": int(chosen),
        "logprob": float(lp[chosen]),
        "top": [[int(i), float(v)] for v, i in zip(vals.tolist(), idx.tolist())],
    }
    if margin:
        rec["margin"] = float(vals[0] - vals[1])
    return rec


@torch.no_grad()
def last_logits(model, ids):
    """The last row of one full forward (no cache) over `ids`."""
    x = torch.tensor([ids])
    return model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1]


@torch.no_grad()
def greedy_full_forward(model, prompt_ids, new_tokens, eos_id=None, margin=False):
    """Greedy decoding, each step one full forward (no cache) over the whole sequence so far; stops
    after `eos_id` when one is given. Returns (ids, step records, logits per step)."""
    cur = list(prompt_ids)
    gen, steps, logits_list = [], [], []
    for _ in range(new_tokens):
        logits = last_logits(model, cur)
        t = int(torch.argmax(logits))
        gen.append(t)
        steps.append(step_record(logits, t, margin))
        logits_list.append(logits)
        cur.append(t)
        if t == eos_id:
            break
    return gen, steps, logits_list


def kv_cache(out):
    """The KV cache of a forward's output (transformers 5.24 names it `cache`)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def save_peft_folder(model, folder):
    """save_pretrained (safetensors) into a fresh `folder`, without PEFT's model card."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    readme = os.path.join(folder, "README.md")  # PEFT's model card; the committed folders have none
    if os.path.exists(readme):
        os.remove(readme)
