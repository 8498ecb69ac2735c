#!/usr/bin/env python3
"""Load client for llama.cpp's HTTP server (llama-server), for scripts/bench-peers.sh.

Drives the native POST /completion endpoint in closed loops: each workload runs
CONCURRENCY streams (threads), each sending its next request when its last one ended,
until REQUESTS requests have been sent. Every request is greedy (temperature 0), asks
for --output-len tokens with end-of-sequence ignored, sets cache_prompt false, and gets
its own --input-len-token window of a fixed text (tokenized once by the server's
/tokenize, sent as token ids), so no two requests share a prompt.

Per workload it reports what `multilora bench` reports, defined the same way: requests,
errors, output tokens, wall time (first request sent to last response ended), output
tokens/s (all output tokens / wall time), mean per-stream decode tokens/s (per request
(tokens - 1) / (end - first token), averaged) and mean time to first token. Streaming
(server-sent events) by default; with --no-stream, TTFT and decode speed come from the
server's own `timings` instead.

Standard library only. Example:
  python3 scripts/peer_load.py --endpoint http://127.0.0.1:8080 \
      --workloads 1x8,32x64 --json out.json
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

# The same text `multilora bench` cuts its prompts from by default (src/bench/runner.rs).
CORPUS = (
    "The harbour town woke before the sun. Fishing boats came in one by one, their decks "
    "loaded with nets, and the market filled with voices bargaining over the morning "
    "catch. A baker on the corner pulled the first loaves from the oven while a "
    "schoolteacher reviewed her lesson on the history of the lighthouse, built two "
    "hundred years ago after a storm wrecked three ships on the rocks. Travellers asked "
    "for directions to the museum, the old fort and the cliff path that runs north along "
    "the coast to a village known for its cheese, its wool and its autumn festival. In "
    "the afternoon the wind turned, clouds gathered over the bay, and the ferry to the "
    "islands left early so that it would be back before the weather closed in. Explain, "
    "summarise, translate, classify, answer questions and write stories about all of it."
)


class Client:
    """One HTTP/1.1 connection per call (like a fresh stream), to host:port."""

    def __init__(self, endpoint, timeout):
        url = urllib.parse.urlparse(endpoint)
        self.host, self.port = url.hostname, url.port or 80
        self.timeout = timeout

    def post(self, path, body):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def post_json(self, path, body):
        conn, resp = self.post(path, body)
        try:
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:200]!r}")
            return json.loads(data)
        finally:
            conn.close()


def prompts(client, text, input_len, count):
    """`count` distinct windows of `input_len` token ids, wrapping around the text."""
    ids = client.post_json("/tokenize", {"content": text, "add_special": False})["tokens"]
    if not ids:
        raise RuntimeError("the prompt text tokenizes to nothing")
    # A stride coprime with the length gives distinct starts for up to len(ids) requests.
    stride = 37
    while _gcd(stride, len(ids)) != 1:
        stride += 1
    out = []
    for i in range(count):
        start = (i * stride) % len(ids)
        out.append([ids[(start + k) % len(ids)] for k in range(input_len)])
    return out


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def one_request(client, prompt, args):
    """Sends one completion; returns its record (times in seconds, time.perf_counter)."""
    body = {
        "prompt": prompt,
        "n_predict": args.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
        "stream": not args.no_stream,
    }
    rec = {"start": time.perf_counter(), "first": None, "end": None, "tokens": 0, "error": None}
    try:
        conn, resp = client.post("/completion", body)
        try:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            if args.no_stream:
                final = json.loads(resp.read())
                rec["end"] = time.perf_counter()
                t = final.get("timings", {})
                rec["tokens"] = final.get("tokens_predicted", t.get("predicted_n", 0))
                # Server-side figures: prompt time stands in for TTFT.
                rec["ttft"] = t.get("prompt_ms", float("nan")) / 1e3
                rec["decode_tok_s"] = t.get("predicted_per_second", float("nan"))
            else:
                events, final = 0, None
                for raw in resp:  # server-sent events: "data: {...}" lines
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    msg = json.loads(payload)
                    if "error" in msg:
                        raise RuntimeError(f"server error: {msg['error']}")
                    now = time.perf_counter()
                    if msg.get("stop"):
                        final = msg
                        break
                    if msg.get("content") or msg.get("tokens"):
                        events += 1
                        if rec["first"] is None:
                            rec["first"] = now
                rec["end"] = time.perf_counter()
                if final is None:
                    raise RuntimeError("the stream ended without a final message")
                rec["tokens"] = final.get("tokens_predicted", events)
        finally:
            conn.close()
    except Exception as e:  # a failed request is counted, not fatal
        rec["error"] = str(e)
        rec["end"] = time.perf_counter()
    return rec


def run_workload(client, concurrency, requests, prompt_list, args):
    records = [None] * requests
    next_index = iter(range(requests))
    lock = threading.Lock()

    def stream():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            records[i] = one_request(client, prompt_list[i], args)

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarize(name, concurrency, records):
    ok = [r for r in records if r["error"] is None]
    t0 = min(r["start"] for r in records)
    wall = max(r["end"] for r in records) - t0
    tokens = sum(r["tokens"] for r in ok)
    ttfts, rates = [], []
    for r in ok:
        if "ttft" in r:  # non-streaming: server timings
            ttfts.append(r["ttft"])
            rates.append(r["decode_tok_s"])
        elif r["first"] is not None:
            ttfts.append(r["first"] - r["start"])
            if r["tokens"] >= 2 and r["end"] > r["first"]:
                rates.append((r["tokens"] - 1) / (r["end"] - r["first"]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "name": name,
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "first_error": next((r["error"] for r in records if r["error"]), None),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else float("nan"),
        "mean_stream_decode_tok_s": mean(rates),
        "mean_ttft_s": mean(ttfts),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:8080")
    p.add_argument("--workloads", default="1x8,32x64",
                   help="comma-separated CONCURRENCYxREQUESTS (default: 1x8,32x64)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (n_predict)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests sent first")
    p.add_argument("--prompts", help="a text file to cut prompts from (default: built in)")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    p.add_argument("--timeout", type=float, default=600, help="per-request seconds")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    workloads = []
    for w in args.workloads.split(","):
        c, n = (int(x) for x in w.lower().split("x"))
        if c < 1 or n < 1:
            p.error(f"--workloads {w}: both numbers must be positive")
        workloads.append((w, c, n))

    text = open(args.prompts).read() if args.prompts else CORPUS
    client = Client(args.endpoint, args.timeout)
    total = args.warmup + sum(n for _, _, n in workloads)
    prompt_list = prompts(client, text, args.input_len, total)

    for i in range(args.warmup):
        rec = one_request(client, prompt_list[i], args)
        if rec["error"]:
            sys.exit(f"warm-up request failed: {rec['error']}")
    used = args.warmup

    results = []
    for name, c, n in workloads:
        print(f"llama.cpp workload {name}: {c} stream(s), {n} requests", file=sys.stderr)
        recs = run_workload(client, c, n, prompt_list[used:used + n], args)
        used += n
        results.append(summarize(name, c, recs))
        if results[-1]["errors"]:
            break  # figures with failed requests compare with nothing; stop here

    header = ("workload", "requests", "errors", "out tokens", "wall s", "out tok/s",
              "decode tok/s/stream", "mean TTFT ms")
    rows = [(r["name"], r["requests"], r["errors"], r["output_tokens"], f"{r['wall_s']:.2f}",
             f"{r['output_tok_s']:.1f}", f"{r['mean_stream_decode_tok_s']:.1f}",
             f"{r['mean_ttft_s'] * 1e3:.0f}") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    for r in results:
        if r["errors"]:
            print(f"{r['name']}: {r['errors']} failed; first: {r['first_error']}", file=sys.stderr)

    if args.json:
        setup = {k: getattr(args, k) for k in ("endpoint", "input_len", "output_len", "warmup",
                                               "no_stream")}
        with open(args.json, "w") as f:
            json.dump({"server": "llama.cpp", "setup": setup, "workloads": results}, f, indent=2)
    if any(r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
