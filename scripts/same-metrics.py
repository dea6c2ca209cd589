#!/usr/bin/env python3
"""Whether two runs logged the same metrics: every metrics.jsonl under RUN_A and RUN_B (the run
and its phases, such as backbone/), line by line, with the fields that measure time left out.

    scripts/same-metrics.py RUN_A RUN_B

Exit status 0 when they agree, 1 with the first difference otherwise. Used to show that a change
of the code leaves training unchanged: the same experiment and seed, trained before and after.
"""
import json
import os
import sys

TIME_WORDS = ("second", "per_s", "timestamp", "wall", "elapsed")


def is_time(key):
    return any(w in key for w in TIME_WORDS) or key.endswith("_s")


def metrics(run):
    out = {}
    for root, _, files in os.walk(run):
        if "metrics.jsonl" in files:
            with open(os.path.join(root, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            out[os.path.relpath(root, run)] = [{k: v for k, v in r.items() if not is_time(k)} for r in rows]
    return out


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    a, b = metrics(sys.argv[1]), metrics(sys.argv[2])
    if not a:
        print(f"{sys.argv[1]}: no metrics.jsonl", file=sys.stderr)
        return 2
    if sorted(a) != sorted(b):
        print(f"different phases: {sorted(a)} and {sorted(b)}")
        return 1
    for phase in sorted(a):
        if len(a[phase]) != len(b[phase]):
            print(f"{phase}: {len(a[phase])} and {len(b[phase])} lines")
            return 1
        for i, (x, y) in enumerate(zip(a[phase], b[phase])):
            if x != y:
                diff = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
                print(f"{phase}/metrics.jsonl line {i + 1}: {diff}")
                return 1
    lines = sum(len(v) for v in a.values())
    print(f"same metrics: {len(a)} metrics.jsonl, {lines} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
