"""Summarises `ncu --metrics gpu__time_duration.sum --print-summary per-kernel` output:
GPU time per kernel name (all invocations), largest first, and the total.

    python3 scripts/ncu_summary.py ncu.txt
"""
import re
import sys

UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def main(path):
    totals, calls = {}, {}
    name, invocations = None, 1
    for line in open(path, errors="replace"):
        text = line.strip()
        m = re.search(r"Invocations\s*[:=]?\s*(\d+)", text)
        if m or re.search(r"\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", text):
            name = re.split(r"[(<\s]", text, maxsplit=1)[0]
            invocations = int(m.group(1)) if m else 1
            continue
        parts = text.split()
        if name and parts and parts[0] == "gpu__time_duration.sum" and len(parts) >= 3:
            unit = UNITS.get(parts[1], 1.0)
            average = float(parts[-1].replace(",", ""))
            totals[name] = totals.get(name, 0.0) + average * unit * invocations
            calls[name] = calls.get(name, 0) + invocations
            name = None
    if not totals:
        print("no kernel durations found in", path)
        return
    total = sum(totals.values())
    print(f"{'kernel':<60} {'calls':>7} {'total us':>11} {'share':>6}")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{k[:60]:<60} {calls[k]:>7} {v:>11.1f} {100 * v / total:>5.1f}%")
    print(f"{'all kernels':<60} {sum(calls.values()):>7} {total:>11.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
