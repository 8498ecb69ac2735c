"""The official `openai` package against a live multilora HTTP front.

Usage: openai_sdk.py --base-url http://127.0.0.1:PORT/v1 --expect FILE

FILE (written by tests/openai_sdk.rs) holds what gRPC answered for the same greedy
requests: {"base": NAME, "adapters": [...], "completion": {MODEL: TEXT},
"chat": {MODEL: TEXT}, "prompt": P, "question": Q, "max_tokens": N}.
Checks completions and chat, streamed and not, an adapter chosen by `model`, usage,
`models.list()`, an unknown model (404 in OpenAI's error shape) and bad parameters
(400), and that a good request still succeeds after the errors. Exits 1 with a
message on the first mismatch; prints one `ok:` line otherwise.
"""

import argparse
import json
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def completions(client, exp):
    for model, want in exp["completion"].items():
        r = client.completions.create(
            model=model, prompt=exp["prompt"], max_tokens=exp["max_tokens"], temperature=0
        )
        check(r.choices[0].text == want, f"completion {model}: {r.choices[0].text!r} != {want!r}")
        check(r.usage.completion_tokens == exp["max_tokens"], f"usage {r.usage}")
        check(r.choices[0].finish_reason == "length", f"finish {r.choices[0].finish_reason}")
        check(r.model == model, f"model echoed as {r.model}")
        text, usage = "", None
        for chunk in client.completions.create(
            model=model,
            prompt=exp["prompt"],
            max_tokens=exp["max_tokens"],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        check(text == want, f"streamed completion {model}: {text!r} != {want!r}")
        check(usage is not None and usage.completion_tokens == exp["max_tokens"], f"stream usage {usage}")


def chat(client, exp):
    messages = [{"role": "user", "content": exp["question"]}]
    for model, want in exp["chat"].items():
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=exp["max_tokens"], temperature=0,
            logprobs=True, top_logprobs=2,
        )
        got = r.choices[0].message.content
        check(got == want, f"chat {model}: {got!r} != {want!r}")
        check(r.choices[0].message.role == "assistant", "role")
        check(len(r.choices[0].logprobs.content) == exp["max_tokens"], "chat logprobs per token")
        check(len(r.choices[0].logprobs.content[0].top_logprobs) == 2, "top_logprobs")
        check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage sum")
        text = ""
        finish = None
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=exp["max_tokens"], temperature=0, stream=True
        ):
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        check(text == want, f"streamed chat {model}: {text!r} != {want!r}")
        check(finish == "length", f"streamed finish {finish}")


def models(client, exp):
    listed = {m.id: m for m in client.models.list()}
    check(exp["base"] in listed, f"base {exp['base']} not in {sorted(listed)}")
    for a in exp["adapters"]:
        check(a in listed, f"adapter {a} not listed")
        check(getattr(listed[a], "parent", None) == exp["base"], f"{a}'s parent")


def errors(client, exp):
    try:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
        check(False, "unknown model accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")
        check(isinstance(e.body, dict) and e.body.get("message"), f"error body {e.body}")
        check(e.body.get("type") == "invalid_request_error", f"error type {e.body}")
    bad = [
        ({"n": 2}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
    ]
    for extra, param in bad:
        args = {"model": exp["base"], "prompt": "hi", "max_tokens": 2, **extra}
        try:
            client.completions.create(**args)
            check(False, f"{extra} accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"{extra}: status {e.status_code}")
            check(e.body.get("param") == param, f"{extra}: param {e.body}")
    try:
        client.chat.completions.create(model=exp["base"], messages=[], max_tokens=2)
        check(False, "empty messages accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"empty messages: status {e.status_code}")
    # The errors left nothing behind: the same request still gives the same text.
    model, want = next(iter(exp["completion"].items()))
    r = client.completions.create(
        model=model, prompt=exp["prompt"], max_tokens=exp["max_tokens"], temperature=0
    )
    check(r.choices[0].text == want, "a good request after the errors")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--expect", required=True)
    a = p.parse_args()
    with open(a.expect) as f:
        exp = json.load(f)
    client = openai.OpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=120)
    models(client, exp)
    completions(client, exp)
    chat(client, exp)
    errors(client, exp)
    print(f"ok: openai {openai.__version__}: completions and chat for {len(exp['completion'])} models")


if __name__ == "__main__":
    main()
