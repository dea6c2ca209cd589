#!/usr/bin/env python3
"""rlprune against PyTorch on the CPU, every backbone users train here, one table.

For each row (model, mode, batch) and thread count, the two frameworks take turns round by
round (rlprune, PyTorch, rlprune, PyTorch, ...), each round a fresh process that runs `--warmup`
untimed and `--repeats` timed steps, so that a change of machine load hits both sides alike.
Per side the table gives the median over the rounds of each round's median images/s, with
the p10-p90 spread of those round medians, the ratio of the two medians, the median and range of the per-round ratios, and
the load average before and after the row.

    benchmarks/suite.py                                  # the whole suite (about an hour idle)
    benchmarks/suite.py --rows small-cnn:train --threads 2 --rounds 5
    benchmarks/suite.py --markdown docs/results/cpu-benchmarks.md --jsonl bench.jsonl

Needs a release build (`cargo build --release`) and a Python with torch (`--python`, default
$PYTHON or python3). Both sides build the same architecture; a row whose parameter counts
differ stops the suite.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (model, mode, batch): the rows of the CPU-speed acceptance, in order.
DEFAULT_ROWS = [
    ("small-cnn", "train", 64),
    ("small-cnn", "infer", 64),
    ("resnet20-cifar", "train", 64),
    ("resnet20-cifar", "infer", 64),
    ("vgg16-cifar", "train", 64),
    ("vgg16-cifar", "infer", 64),
    ("gfnet-ti", "train", 8),
    ("gfnet-ti", "infer", 8),
    ("deit-s", "train", 8),
    ("deit-s", "infer", 8),
    ("hornet-t-7x7", "train", 8),
    ("hornet-t-7x7", "infer", 8),
    ("dynamicvit-deit-s-0.7", "infer", 8),
]


def load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def quantile(xs, p):
    """Linear interpolation between order statistics (NumPy's default), as `rlprune bench`."""
    s = sorted(xs)
    pos = p * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_side(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr.strip()}")
    line = out.stdout.strip().splitlines()[-1]
    return json.loads(line)


def measure(args, model, mode, batch, threads):
    common = ["--batch", str(batch), "--threads", str(threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--json"]
    if mode == "train":
        common.append("--train")
    ours_cmd = [args.rlprune, "bench", model] + common
    theirs_cmd = [args.python, "-W", "ignore", os.path.join(HERE, "pytorch_bench.py"), model] + common
    load_before = load()
    ours, theirs, ratios, reports = [], [], [], []
    for r in range(args.rounds):
        a = run_side(ours_cmd)
        b = run_side(theirs_cmd)
        if a["params"] != b["params"]:
            sys.exit(f"{model}: rlprune has {a['params']} parameters, PyTorch {b['params']}: not the same model")
        ours.append(a["images_per_s"])
        theirs.append(b["images_per_s"])
        ratios.append(a["images_per_s"] / b["images_per_s"])
        reports += [a, b]
        print(f"  round {r + 1}: rlprune {a['images_per_s']:.1f}, PyTorch {b['images_per_s']:.1f} img/s, ratio {ratios[-1]:.2f}", file=sys.stderr)
    row = {
        "model": model,
        "mode": mode,
        "batch": batch,
        "threads": threads,
        "rounds": args.rounds,
        "rlprune": statistics.median(ours),
        "rlprune_p10": quantile(ours, 0.1),
        "rlprune_p90": quantile(ours, 0.9),
        "pytorch": statistics.median(theirs),
        "pytorch_p10": quantile(theirs, 0.1),
        "pytorch_p90": quantile(theirs, 0.9),
        "torch": reports[1].get("torch", ""),
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "ratio_rounds_median": statistics.median(ratios),
        "ratio_rounds_min": min(ratios),
        "ratio_rounds_max": max(ratios),
        "params": reports[0]["params"],
        "load_before": load_before,
        "load_after": load(),
    }
    return row


def markdown(rows, header):
    lines = [header, "",
             "| model | mode | batch | threads | rlprune img/s (p10–p90) | PyTorch img/s (p10–p90) | ratio | per-round ratios (min–max) | load before → after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['mode']} | {r['batch']} | {r['threads']} "
            f"| {r['rlprune']:.1f} ({r['rlprune_p10']:.1f}–{r['rlprune_p90']:.1f}) "
            f"| {r['pytorch']:.1f} ({r['pytorch_p10']:.1f}–{r['pytorch_p90']:.1f}) "
            f"| **{r['ratio']:.2f}** | {r['ratio_rounds_median']:.2f} ({r['ratio_rounds_min']:.2f}–{r['ratio_rounds_max']:.2f}) "
            f"| {r['load_before']} → {r['load_after']} |"
        )
    return "\n".join(lines) + "\n"


def parse_rows(spec):
    rows = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        model = parts[0]
        mode = parts[1] if len(parts) > 1 else "train"
        if mode not in ("train", "infer"):
            sys.exit(f"--rows: mode must be train or infer, got {mode!r} in {item!r}")
        default = next((b for m, _, b in DEFAULT_ROWS if m == model), 8)
        batch = int(parts[2]) if len(parts) > 2 else default
        rows.append((model, mode, batch))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", help="MODEL[:MODE[:BATCH]],... (default: the whole suite)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per row (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per round and side (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round and side (default 1)")
    p.add_argument("--rlprune", default=os.path.join(ROOT, "target", "release", "rlprune"))
    p.add_argument("--python", default=os.environ.get("PYTHON", "python3"), help="a Python with torch")
    p.add_argument("--markdown", help="write the table (with date, machine and command) to this file")
    p.add_argument("--jsonl", help="append one JSON line per row to this file")
    a = p.parse_args()
    if a.rounds < 1 or a.repeats < 1 or a.warmup < 0:
        p.error("--rounds and --repeats must be >= 1, --warmup >= 0")
    rows = parse_rows(a.rows) if a.rows else DEFAULT_ROWS
    threads = [int(t) for t in a.threads.split(",")]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for model, mode, batch in rows:
        for t in threads:
            print(f"{model} {mode} batch {batch}, {t} thread(s), load {load()}", file=sys.stderr)
            row = measure(a, model, mode, batch, t)
            results.append(row)
            print(f"{model} {mode} b{batch} t{t}: rlprune {row['rlprune']:.1f} img/s, PyTorch {row['pytorch']:.1f} img/s, ratio {row['ratio']:.2f}", flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    header = (
        f"Measured {started} on {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
        f"PyTorch {results[0]['torch'] if results else '?'}, {a.rounds} alternating rounds of {a.warmup} warm-up + {a.repeats} timed steps per side.\n"
        f"Command: `benchmarks/suite.py {' '.join(sys.argv[1:])}`"
    )
    table = markdown(results, header)
    print(table)
    if a.markdown:
        tmp = a.markdown + ".tmp"
        with open(tmp, "w") as f:
            f.write(table)
        os.replace(tmp, a.markdown)


if __name__ == "__main__":
    main()
