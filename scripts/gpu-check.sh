#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H100/H200, CUDA driver, no internet, no crates.io).
# Everything is built beforehand on a CPU machine and copied over (see docs/gpu.md):
#
#   cargo build --release --features cuda
#   cargo test --release --features cuda --test parity --test dynamicvit --no-run   # prints the test binaries
#   scripts/gpu-check.sh --bin target/release/rlprune \
#       --parity-test target/release/deps/parity-<hash> --parity-test target/release/deps/dynamicvit-<hash>
#
# Runs, each step under its own timeout, in about 9 minutes at most, most important first:
#   1. the parity fixtures on the GPU (GFNet, GFNet-H, HorNet 7x7 and GF, DynamicViT eval and
#      train mode). This step is a gate: the script exits 1 (after writing its table) when a
#      fixture is beyond the GPU tolerance, max abs 1e-3 and rel L2 2e-3 (cubecl 0.10 runs f32
#      matmuls as TF32 and cannot turn that off; with TF32 off the CPU tolerance, 1e-4 and 1e-5,
#      would apply; see tests/common), when a parity test fails, or when the step was asked for
#      and could not run;
#   2. `rlprune bench` against PyTorch eager (benchmarks/pytorch_bench.py, when python3 has torch
#      with CUDA) at batch 64: training steps of gfnet-ti and deit-s first (the issue's target),
#      then inference of gfnet-ti, deit-s, dynamicvit-deit-s-0.7 and hornet-t-7x7, then their
#      training steps;
#   3. short training runs on the GPU: the supervised small CNN on the shipped Fashion-MNIST
#      subset, and the RNP quickstart (RNP's router phase is CPU-only for now: that row records
#      the error a user gets).
#   4. (--variant LABEL=BIN, repeatable) the training steps of gfnet-ti and deit-s with other
#      builds of rlprune, e.g. `--features cuda-fusion` or `cuda-fusion-autotune`, with a longer
#      warm-up (their first steps compile and autotune kernels) and cubecl's autotune level
#      "minimal";
#   5. (step `profile`) cubecl's kernel profile of one gfnet-ti and one deit-s training step of
#      --bin: each kernel's total GPU time, the summary's top rows go into the table's log folder.
# A failing step is recorded in its row; the script goes on. Writes one markdown table (and a
# throughput comparison) to --out (default gpu-check.md) and prints it; --logs-tar FILE packs
# every step's log. --steps LIST runs a subset of parity,core,rest,train,variants,profile
# (default: all). Exit status: 0, or 1 when the parity gate failed, or 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/rlprune
PARITY_TESTS=()
OUT=gpu-check.md
LOGS_TAR=""
DEVICE=cuda
# Which parts run: parity, core (gfnet-ti and deit-s benches), rest (the other benches), train.
STEPS=parity,core,variants,profile,rest,train
VARIANTS=()
PARITY_DIR="${RLPRUNE_PARITY_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="$2"; shift 2 ;;
        --parity-test) PARITY_TESTS+=("$2"); shift 2 ;;
        --parity-dir) PARITY_DIR="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --logs-tar) LOGS_TAR="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --variant) VARIANTS+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$PARITY_DIR" ]; then
    for d in ../shared/parity ../../shared/parity shared/parity; do
        [ -d "$d" ] && PARITY_DIR="$d" && break
    done
fi
[ -x "$BIN" ] || { echo "gpu-check: $BIN is not an executable rlprune (build it with --features cuda)" >&2; exit 2; }

LOG_DIR=$(mktemp -d -t gpu-check.XXXXXX)
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); echo "gpu-check: $1 | $3 | $4" >&2; }
# One line of a log for a table cell: no pipes, bounded length.
cell() { tr '\n|' ' /' | sed 's/  */ /g' | cut -c1-200; }
# "images/s (p10, p90), ms per batch" from a bench JSON line.
summary() {
    local json
    json=$(tail -1)
    echo "$json" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('%.1f images/s (p10 %.1f, p90 %.1f), %.1f ms per batch' % (r['images_per_s'], r['images_per_s_p10'], r['images_per_s_p90'], r['latency_ms']))" 2> /dev/null \
        || echo "$json" | cell
}

CARD=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
[ -n "$CARD" ] || CARD="unknown (nvidia-smi failed)"
DATE=$(date -u +%Y-%m-%dT%H:%MZ)
T0=$(date +%s)
# A step that would start after BUDGET_S is recorded as skipped (each step has its own cap).
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
over_budget() { [ $(( $(date +%s) - T0 )) -ge "$BUDGET_S" ]; }
echo "gpu-check: $CARD, $DATE" >&2

# 1. Parity on the GPU: the test binaries read RLPRUNE_TEST_DEVICE and assert the same tolerance.
want() { [[ ",$STEPS," == *",$1,"* ]]; }
PARITY_MAX_ABS=1e-3
PARITY_REL_L2=2e-3
PARITY_FAILED=0
parity_failed() { PARITY_FAILED=1; row "$@"; }
if ! want parity; then
    :
elif [ ${#PARITY_TESTS[@]} -gt 0 ] && [ -n "$PARITY_DIR" ]; then
    for t in "${PARITY_TESTS[@]}"; do
        label=$(basename "$t" | sed 's/-[0-9a-f]*$//')
        log="$LOG_DIR/parity-$label.log"
        if [ ! -x "$t" ]; then parity_failed "parity $label" "$DEVICE" "no test binary $t" "FAILED (not run)"; continue; fi
        start=$(date +%s)
        RLPRUNE_TEST_DEVICE="$DEVICE" RLPRUNE_PARITY_DIR="$PARITY_DIR" timeout 150 "$t" --test-threads 1 --nocapture > "$log" 2>&1
        rc=$?
        secs=$(( $(date +%s) - start ))
        while IFS= read -r line; do
            # Each fixture's line against the GPU tolerance; the test's own verdict (all its
            # checks, same tolerance) is the "(all tests)" row.
            abs=$(echo "$line" | grep -oE 'max abs err [0-9.e+-]+' | awk '{print $4}')
            rel=$(echo "$line" | grep -oE 'rel L2 [0-9.e+-]+' | head -1 | awk '{print $3}')
            verdict="measured"
            if [ -n "$abs" ]; then
                verdict=$(awk -v a="$abs" -v r="${rel:-0}" -v ta="$PARITY_MAX_ABS" -v tr="$PARITY_REL_L2" \
                    'BEGIN { print (a <= ta && r <= tr ? "within tolerance" : "FAILED: beyond max abs " ta ", rel L2 " tr) }')
            fi
            case "$verdict" in FAILED*) PARITY_FAILED=1 ;; esac
            row "parity $label: ${line%%:*}" "$DEVICE" "$(echo "${line#*: }" | cell)" "$verdict"
        done < <(sed -E 's/^test [^ ]+ \.\.\. //' "$log" | grep -E '^[a-z0-9_. ]+: (max abs err|logits|loss|grad|kept)')
        for f in $(grep -E '^test .* FAILED$' "$log" | awk '{print $2}'); do
            parity_failed "parity $label test $f" "$DEVICE" "$(grep -A4 "^---- $f" "$log" | grep -v '^----' | cell)" "FAILED"
        done
        result=$(grep -E '^test result' "$log" | tail -1 | cell)
        if [ $rc -eq 124 ]; then parity_failed "parity $label" "$DEVICE" "timed out after 150 s" "FAILED"
        elif [ $rc -eq 0 ]; then row "parity $label (all tests)" "$DEVICE" "$result, ${secs} s" "ok"
        else parity_failed "parity $label (all tests)" "$DEVICE" "${result:-$(tail -3 "$log" | cell)}" "FAILED (rc $rc)"
        fi
    done
else
    parity_failed "parity" "$DEVICE" "not run: pass --parity-test (built with --features cuda) and the fixtures (--parity-dir), or leave parity out of --steps" "FAILED (not run)"
fi

# 2. Benchmarks at batch 64, rlprune then PyTorch eager on the same card.
HAVE_TORCH=0
[ -f benchmarks/pytorch_bench.py ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2> /dev/null && HAVE_TORCH=1
bench_pair() {
    local model="$1" mode="$2" flag="" log
    [ "$mode" = train ] && flag="--train"
    log="$LOG_DIR/bench-rlprune-$model-$mode.json"
    if over_budget; then row "rlprune bench $model $mode b64" "$DEVICE" "skipped: time budget used" "not run"; return; fi
    timeout 90 "$BIN" bench "$model" --batch 64 --warmup 3 --repeats 10 --device "$DEVICE" $flag --json > "$log" 2> "$log.err"
    rc=$?
    if [ $rc -eq 0 ]; then row "rlprune bench $model $mode b64" "$DEVICE" "$(summary < "$log")" "ok"
    elif [ $rc -eq 124 ]; then row "rlprune bench $model $mode b64" "$DEVICE" "timed out after 90 s" "FAILED"
    else row "rlprune bench $model $mode b64" "$DEVICE" "$(tail -2 "$log.err" | cell)" "FAILED (rc $rc)"
    fi
    [ $HAVE_TORCH -eq 1 ] || return
    log="$LOG_DIR/bench-pytorch-$model-$mode.json"
    if over_budget; then row "pytorch eager $model $mode b64" "cuda" "skipped: time budget used" "not run"; return; fi
    timeout 90 python3 benchmarks/pytorch_bench.py "$model" --batch 64 --warmup 3 --repeats 10 --device cuda $flag --json > "$log" 2> "$log.err"
    rc=$?
    if [ $rc -eq 0 ]; then row "pytorch eager $model $mode b64" "cuda" "$(summary < "$log")" "ok"
    else row "pytorch eager $model $mode b64" "cuda" "$(tail -2 "$log.err" | cell)" "FAILED (rc $rc)"
    fi
    # rlprune's f32 matmuls run on TF32 tensor cores (cubecl picks them); PyTorch with TF32 too.
    log="$LOG_DIR/bench-pytorchtf32-$model-$mode.json"
    if over_budget; then row "pytorch eager tf32 $model $mode b64" "cuda" "skipped: time budget used" "not run"; return; fi
    timeout 90 python3 benchmarks/pytorch_bench.py "$model" --batch 64 --warmup 3 --repeats 10 --device cuda --tf32 $flag --json > "$log" 2> "$log.err"
    rc=$?
    if [ $rc -eq 0 ]; then row "pytorch eager tf32 $model $mode b64" "cuda" "$(summary < "$log")" "ok"
    else row "pytorch eager tf32 $model $mode b64" "cuda" "$(tail -2 "$log.err" | cell)" "FAILED (rc $rc)"
    fi
}
[ $HAVE_TORCH -eq 1 ] || row "pytorch eager" "-" "skipped: no benchmarks/pytorch_bench.py or no torch with CUDA in python3" "not run"
if want core; then
    bench_pair gfnet-ti train
    bench_pair deit-s train
    bench_pair gfnet-ti infer
    bench_pair deit-s infer
fi
# 4. Other builds (fusion, autotune): steady-state training steps after a long warm-up. cubecl
# reads cubecl.toml from the working directory: kernels compiled once per process are cached in
# target/ for the later processes, and autotune tries the fewest candidates.
variant_bench() {
    local label="$1" bin="$2" model="$3" log
    log="$LOG_DIR/bench-variant-$label-$model.json"
    if over_budget; then row "rlprune[$label] bench $model train b64" "$DEVICE" "skipped: time budget used" "not run"; return; fi
    [ -x "$bin" ] || { row "rlprune[$label] bench $model train b64" "$DEVICE" "no executable $bin" "not run"; return; }
    printf '[compilation]\ncache = "target"\n[autotune]\nlevel = "minimal"\n' > cubecl.toml
    local start=$(date +%s)
    timeout 120 "$bin" bench "$model" --batch 64 --warmup 8 --repeats 10 --device "$DEVICE" --train --json > "$log" 2> "$log.err"
    local rc=$? secs=$(( $(date +%s) - start ))
    rm -f cubecl.toml
    if [ $rc -eq 0 ]; then row "rlprune[$label] bench $model train b64" "$DEVICE" "$(summary < "$log"), whole run ${secs} s" "ok"
    elif [ $rc -eq 124 ]; then row "rlprune[$label] bench $model train b64" "$DEVICE" "timed out after 120 s (warm-up 8 steps)" "FAILED"
    else row "rlprune[$label] bench $model train b64" "$DEVICE" "$(tail -2 "$log.err" | cell)" "FAILED (rc $rc)"
    fi
}
if want variants; then
    for v in "${VARIANTS[@]}"; do
        for model in gfnet-ti deit-s; do variant_bench "${v%%=*}" "${v#*=}" "$model"; done
    done
fi
# 5. Where a training step's GPU time goes: cubecl's profiler times every kernel (so the step is
# slower than unprofiled) and prints a summary per sync; the last one is the last step's.
profile_step() {
    local model="$1" log="$LOG_DIR/profile-$1-train.log"
    if over_budget; then row "profile $model train b64" "$DEVICE" "skipped: time budget used" "not run"; return; fi
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' "$log" > cubecl.toml
    timeout 60 "$BIN" bench "$model" --batch 64 --warmup 2 --repeats 3 --device "$DEVICE" --train --json > "$log.json" 2> "$log.err"
    local rc=$?
    rm -f cubecl.toml
    awk '/⎺/{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$log" > "$LOG_DIR/profile-$model-summary.txt" 2> /dev/null
    local total
    total=$(grep -E '^\| Total ' "$LOG_DIR/profile-$model-summary.txt" | cell)
    if [ $rc -eq 0 ] && [ -n "$total" ]; then
        row "profile $model train b64" "$DEVICE" "kernels of the last step: $total; step wall time $(summary < "$log.json")" "measured"
    else row "profile $model train b64" "$DEVICE" "$(tail -2 "$log.err" | cell)" "FAILED (rc $rc)"
    fi
}
if want profile; then
    for model in gfnet-ti deit-s; do profile_step "$model"; done
fi
if want rest; then
    for model in dynamicvit-deit-s-0.7 hornet-t-7x7; do bench_pair "$model" infer; done
    bench_pair dynamicvit-deit-s-0.7 train
    bench_pair hornet-t-7x7 train
fi

# 3. Short training runs on the GPU.
train_row() {
    local label="$1" exp="$2"; shift 2
    local log="$LOG_DIR/train-${label// /_}.log" start rc secs
    if over_budget; then row "train $label" "$DEVICE" "skipped: time budget used" "not run"; return; fi
    start=$(date +%s)
    timeout 120 "$BIN" train "$exp" --device "$DEVICE" --out "$LOG_DIR/run-${label// /_}" "$@" > "$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then row "train $label" "$DEVICE" "$(grep -iE 'top-?1|best' "$log" | tail -1 | cell), ${secs} s" "ok"
    elif [ $rc -eq 124 ]; then row "train $label" "$DEVICE" "timed out after 120 s" "FAILED"
    else row "train $label" "$DEVICE" "$(grep -E '^error' "$log" | tail -1 | cell) (${secs} s)" "FAILED (rc $rc)"
    fi
}
if want train; then
    train_row "small-cnn fashion-subset 2 epochs" experiments/fashion_mnist_cnn.toml \
        --set 'data.root="data/fashion-mnist-subset"' --set train.epochs=2 --set log.histograms=false
    train_row "rnp quickstart" experiments/quickstart.toml --set train.epochs=1 --set rl.epochs=1
fi

{
    echo "GPU check: $CARD; $DATE; rlprune $("$BIN" --version 2>/dev/null | awk '{print $2}'); $(( $(date +%s) - T0 )) s"
    echo
    echo "| step | device | result | status |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    # rlprune against PyTorch eager, images/s medians from the same run.
    python3 - "$LOG_DIR" <<'PY' 2> /dev/null
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
rows = []
for f in sorted(d.glob("bench-rlprune-*.json")):
    def load(name):
        try:
            return json.loads((d / name).read_text().strip().splitlines()[-1])
        except Exception:
            return None
    r = load(f.name)
    t = load(f.name.replace("bench-rlprune-", "bench-pytorch-"))
    t32 = load(f.name.replace("bench-rlprune-", "bench-pytorchtf32-"))
    if r is None or t is None:
        continue
    tf = f"{t32['images_per_s']:.1f} ({r['images_per_s'] / t32['images_per_s']:.2f}x)" if t32 else "-"
    rows.append(f"| {r['model']} | {r['mode']} | {r['images_per_s']:.1f} | {t['images_per_s']:.1f} | {r['images_per_s'] / t['images_per_s']:.2f}x | {tf} |")
if rows:
    print("| model (batch 64) | mode | rlprune images/s | PyTorch eager images/s | rlprune / PyTorch | PyTorch eager, TF32 matmuls (rlprune / it) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print()
PY
    for f in "$LOG_DIR"/profile-*-summary.txt; do
        [ -s "$f" ] || continue
        echo "Kernel profile, $(basename "$f" -summary.txt) (top 25 of the last step):"
        echo '```'
        head -28 "$f"
        echo '```'
    done
    echo "Logs: $LOG_DIR"
} > "$OUT"
[ -n "$LOGS_TAR" ] && tar czf "$LOGS_TAR" -C "$LOG_DIR" . 2> /dev/null
cat "$OUT"
if [ $PARITY_FAILED -ne 0 ]; then
    echo "gpu-check: the parity gate FAILED (see the parity rows)" >&2
    exit 1
fi
