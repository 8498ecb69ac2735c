"""Reads multilora's /metrics the way the inference gateway's endpoint picker does, with
prometheus_client's standard text parser.

  gateway_metrics.py scrape URL [--dashboard FILE]
      Checks every model-server protocol series is present with its type and sane
      values (and, with --dashboard, that every metric the Grafana dashboard queries is
      exported); prints the protocol values as JSON.
  gateway_metrics.py affinity --adapters A,B,... URL [URL ...]
      Applies the gateway's LoRA-affinity rule to each server's vllm:lora_requests_info
      (1.0 if the adapter is running, 0.8 if running + waiting adapters < max_lora, 0.6
      if it is waiting, else 0); prints {url: {adapter: score}} as JSON.
Exits 1 with a message when a check fails.
"""

import argparse
import json
import re
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

PROTOCOL = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:lora_requests_info": "gauge",
}


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def families(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        ctype = r.headers.get("Content-Type", "")
        if not ctype.startswith("text/plain"):
            fail(f"{url}: content type {ctype!r}")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def names(label):
    return [n for n in label.split(",") if n]


def protocol_values(url):
    fams = families(url)
    for name, kind in PROTOCOL.items():
        if name not in fams:
            fail(f"{url}: {name} missing")
        if fams[name].type != kind:
            fail(f"{url}: {name} is a {fams[name].type}, not a {kind}")
    one = {n: fams[n].samples for n in PROTOCOL}
    for n, samples in one.items():
        if len(samples) != 1:
            fail(f"{url}: {n} has {len(samples)} samples, want exactly 1 (the current label set)")
    info = one["vllm:lora_requests_info"][0]
    for label in ("max_lora", "running_lora_adapters", "waiting_lora_adapters"):
        if label not in info.labels:
            fail(f"{url}: vllm:lora_requests_info lacks label {label}")
    if abs(info.value - time.time()) > 300:
        fail(f"{url}: vllm:lora_requests_info value {info.value} is not the current Unix time")
    usage = one["vllm:kv_cache_usage_perc"][0].value
    if not 0.0 <= usage <= 1.0:
        fail(f"{url}: kv_cache_usage_perc {usage} outside [0, 1]")
    return fams, {
        "waiting": one["vllm:num_requests_waiting"][0].value,
        "running": one["vllm:num_requests_running"][0].value,
        "kv_usage": usage,
        "max_lora": int(info.labels["max_lora"]),
        "running_lora": names(info.labels["running_lora_adapters"]),
        "waiting_lora": names(info.labels["waiting_lora_adapters"]),
    }


def dashboard_metrics(path):
    with open(path) as f:
        dash = json.load(f)
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    found = set()
    for e in exprs:
        found.update(re.findall(r"\b(vllm:[a-zA-Z0-9_]+|multilora_[a-zA-Z0-9_]+)", e))
    if not found:
        fail(f"{path}: no metric in any expr")
    return found


def family_of(series, fams):
    """The family a series name belongs to (counters lose _total, histograms their
    _bucket/_sum/_count in prometheus_client's parser)."""
    if series in fams:
        return series
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in fams:
            return series[: -len(suffix)]
    return None


def scrape(args):
    fams, values = protocol_values(args.url)
    if args.dashboard:
        missing = sorted(s for s in dashboard_metrics(args.dashboard) if not family_of(s, fams))
        if missing:
            fail(f"the dashboard queries series /metrics does not export: {missing}")
    values["families"] = {n: f.type for n, f in fams.items()}
    print(json.dumps(values))


def score(values, adapter):
    running, waiting = values["running_lora"], values["waiting_lora"]
    if adapter in running:
        return 1.0
    if len(set(running) | set(waiting)) < values["max_lora"]:
        return 0.8
    if adapter in waiting:
        return 0.6
    return 0.0


def affinity(args):
    adapters = names(args.adapters)
    out = {}
    for url in args.urls:
        _, values = protocol_values(url)
        out[url] = {a: score(values, a) for a in adapters}
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scrape")
    s.add_argument("url")
    s.add_argument("--dashboard")
    a = sub.add_parser("affinity")
    a.add_argument("--adapters", required=True)
    a.add_argument("urls", nargs="+")
    args = p.parse_args()
    {"scrape": scrape, "affinity": affinity}[args.cmd](args)


if __name__ == "__main__":
    main()
