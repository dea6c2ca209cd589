#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H100/H200, CUDA driver, no internet, no crates.io).
# Everything is built beforehand on a CPU machine and copied over (see README, "GPU"):
#
#   cargo build --release --features cuda
#   cargo test --release --features cuda --test parity --no-run   # prints the test binary path
#   scripts/gpu-check.sh --bin target/release/rlprune --parity-test target/release/deps/parity-<hash>
#
# Runs, each step under its own timeout, in about 10 minutes at most:
#   1. the parity fixtures on the GPU (same tolerances as on the CPU: max abs 1e-4, rel L2 1e-5);
#   2. `rlprune bench` for gfnet-ti, deit-s, dynamicvit-deit-s-0.7, hornet-t-7x7 at batch 64,
#      inference and one training step;
#   3. short training runs on the GPU: the supervised small CNN, and the RNP quickstart (RNP's
#      router phase is CPU-only for now: that row records the error);
#   4. PyTorch eager timings of the same models, when python3 has torch and
#      benchmarks/pytorch_bench.py exists.
# A failing step is recorded in its row; the script goes on. Writes one markdown table to
# --out (default gpu-check.md) and prints it.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/rlprune
PARITY_TEST=""
OUT=gpu-check.md
DEVICE=cuda
PARITY_DIR="${RLPRUNE_PARITY_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="$2"; shift 2 ;;
        --parity-test) PARITY_TEST="$2"; shift 2 ;;
        --parity-dir) PARITY_DIR="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
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
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }
# One line of a log for a table cell: no pipes, bounded length.
cell() { tr '\n|' ' /' | sed 's/  */ /g' | cut -c1-160; }

CARD=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
[ -n "$CARD" ] || CARD="unknown (nvidia-smi failed)"
DATE=$(date -u +%Y-%m-%dT%H:%MZ)
T0=$(date +%s)
# The whole check stays under 10 minutes: a step that would start after 8 is recorded as skipped (each step is capped at 2 minutes).
BUDGET_S=480
over_budget() { [ $(( $(date +%s) - T0 )) -ge $BUDGET_S ]; }

# 1. Parity on the GPU.
if [ -n "$PARITY_TEST" ] && [ -x "$PARITY_TEST" ] && [ -n "$PARITY_DIR" ]; then
    log="$LOG_DIR/parity.log"
    RLPRUNE_TEST_DEVICE="$DEVICE" RLPRUNE_PARITY_DIR="$PARITY_DIR" timeout 150 "$PARITY_TEST" --test-threads 1 --nocapture > "$log" 2>&1
    rc=$?
    while IFS= read -r line; do
        name=${line%%:*}
        row "parity $name" "$DEVICE" "$(echo "${line#*: }" | cell)" "ok (≤ 1e-4 abs, ≤ 1e-5 rel L2)"
    done < <(grep -E '^[a-z0-9_.]+: max abs err' "$log")
    for t in $(grep -E '^test .* FAILED$' "$log" | awk '{print $2}'); do
        row "parity test $t" "$DEVICE" "$(grep -A3 "^---- $t" "$log" | grep -v '^----' | cell)" "FAILED"
    done
    [ $rc -eq 124 ] && row "parity" "$DEVICE" "timed out after 150 s" "FAILED"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && ! grep -q FAILED "$log" && row "parity" "$DEVICE" "$(tail -3 "$log" | cell)" "FAILED (rc $rc)"
else
    row "parity" "$DEVICE" "skipped: pass --parity-test (built with --features cuda) and the fixtures (--parity-dir)" "not run"
fi

# 2. Benchmarks: inference and a training step at batch 64.
for model in gfnet-ti deit-s dynamicvit-deit-s-0.7 hornet-t-7x7; do
    for mode in infer train; do
        flag=""; [ "$mode" = train ] && flag="--train"
        log="$LOG_DIR/bench-$model-$mode.log"
        if over_budget; then row "bench $model $mode b64" "$DEVICE" "skipped: 8-minute budget used" "not run"; continue; fi
        timeout 60 "$BIN" bench "$model" --batch 64 --device "$DEVICE" $flag --json > "$log" 2> "$log.err"
        rc=$?
        if [ $rc -eq 0 ]; then
            row "bench $model $mode b64" "$DEVICE" "$(tail -1 "$log" | cell)" "ok"
        elif [ $rc -eq 124 ]; then
            row "bench $model $mode b64" "$DEVICE" "timed out after 60 s" "FAILED"
        else
            row "bench $model $mode b64" "$DEVICE" "$(tail -2 "$log.err" | cell)" "FAILED (rc $rc)"
        fi
    done
done

# 3. Short training runs on the GPU: the small CNN on the shipped Fashion-MNIST subset (the
#    supervised trainer), then the RNP quickstart (its router phase is CPU-only for now, so
#    this row records the error the user gets).
train_row() {
    local label="$1" exp="$2"; shift 2
    local log="$LOG_DIR/train-$label.log" start rc secs
    if over_budget; then row "train $label" "$DEVICE" "skipped: 8-minute budget used" "not run"; return; fi
    start=$(date +%s)
    timeout 120 "$BIN" train "$exp" --device "$DEVICE" --out "$LOG_DIR/run-$label" "$@" > "$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        row "train $label" "$DEVICE" "$(tail -1 "$log" | cell), ${secs} s" "ok"
    elif [ $rc -eq 124 ]; then
        row "train $label" "$DEVICE" "timed out after 120 s" "FAILED"
    else
        row "train $label" "$DEVICE" "$(grep -E '^error' "$log" | tail -1 | cell) (${secs} s)" "FAILED (rc $rc)"
    fi
}
train_row "small-cnn fashion-subset 2 epochs" experiments/fashion_mnist_cnn.toml \
    --set 'data.root="data/fashion-mnist-subset"' --set train.epochs=2 --set log.histograms=false
train_row "rnp quickstart 1+1 epochs" experiments/quickstart.toml --set train.epochs=1 --set rl.epochs=1

# 4. PyTorch eager on the same card, when available.
if [ -f benchmarks/pytorch_bench.py ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2> /dev/null; then
    for model in gfnet-ti deit-s dynamicvit-deit-s-0.7 hornet-t-7x7; do
        for mode in infer train; do
            flag=""; [ "$mode" = train ] && flag="--train"
            log="$LOG_DIR/torch-$model-$mode.log"
            if over_budget; then row "pytorch eager $model $mode b64" "cuda" "skipped: 8-minute budget used" "not run"; continue; fi
            timeout 60 python3 benchmarks/pytorch_bench.py "$model" --batch 64 --device cuda $flag --json > "$log" 2>&1
            rc=$?
            if [ $rc -eq 0 ]; then
                row "pytorch eager $model $mode b64" "cuda" "$(tail -1 "$log" | cell)" "ok"
            else
                row "pytorch eager $model $mode b64" "cuda" "$(tail -2 "$log" | cell)" "FAILED (rc $rc)"
            fi
        done
    done
else
    row "pytorch eager" "-" "skipped: no benchmarks/pytorch_bench.py or no torch with CUDA in python3" "not run"
fi

{
    echo "GPU check: $CARD; $DATE; rlprune $("$BIN" --version 2>/dev/null | awk '{print $2}'); $(( $(date +%s) - T0 )) s"
    echo
    echo "| step | device | result | status |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Logs: $LOG_DIR"
} > "$OUT"
cat "$OUT"
