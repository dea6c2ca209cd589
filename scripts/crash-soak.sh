#!/usr/bin/env bash
# Crash soak: kills an RNP training run with SIGKILL at random points in each of its three
# phases (supervised backbone, router epochs, fine-tuning under the router), resumes it after
# every kill, and checks that
#   - after each kill, every file in the run directory is whole: each .safetensors parses and
#     its size matches its header, each .json parses, each line of metrics.jsonl parses;
#   - each resumed run ends with checkpoints equal, tensor for tensor and bit for bit, to an
#     uninterrupted run's, and the same metrics (timings aside).
# Rounds (a fresh run directory each) repeat until at least N kills have landed.
#
#   scripts/crash-soak.sh [N=20] [SEED=1]
#
# Needs a release build (cargo build --release) and python3. Prints one line per kill and a
# summary; exits 1 if any check failed.
set -euo pipefail

N=${1:-20}
SEED=${2:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RLPRUNE_BIN:-$ROOT/target/release/rlprune}
[ -x "$BIN" ] || { echo "crash-soak: $BIN not found; run cargo build --release first" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlprune-soak.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

cat > soak.toml <<'EOF'
name = "soak"
seed = 3
[data]
dataset = "synthetic"
size = 16
classes = 4
train_size = 16384
test_size = 256
batch_size = 32
eval_batch_size = 128
[backbone]
arch = "small-cnn"
channels = [16, 16, 32, 32]
[train]
epochs = 3
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
[controller]
kind = "channel-router"
hidden = 16
[rl]
epochs = 2
workers = 1
finetune_epochs = 2
finetune_lr = 0.05
budget = "mean"
flops_target = 0.6
[log]
every_steps = 10
histograms = false
EOF

cat > check.py <<'EOF'
"""check.py whole RUN: every file whole. check.py same REF RUN: equal checkpoints and metrics."""
import json, os, struct, sys

def safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] + [0])
    if 8 + n + end != len(raw):
        raise ValueError("size %d, header says %d" % (len(raw), 8 + n + end))
    return {k: raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
            for k, v in header.items() if k != "__metadata__"}

def whole(run):
    bad = []
    for d, _, files in os.walk(run):
        for f in files:
            p = os.path.join(d, f)
            try:
                if f.endswith(".safetensors"):
                    safetensors(p)
                elif f.endswith(".json"):
                    json.load(open(p))
                elif f == "metrics.jsonl":
                    for line in open(p):
                        json.loads(line)
            except Exception as e:
                bad.append("%s: %s" % (os.path.relpath(p, run), e))
    return bad

TIMING = {"seconds", "epoch_seconds", "rollout_seconds", "images_per_s", "rollout_images_per_s", "wall_seconds", "time"}

def metrics(run):
    out = []
    for line in open(os.path.join(run, "metrics.jsonl")):
        m = json.loads(line)
        out.append({k: v for k, v in m.items() if k not in TIMING and "seconds" not in k and "per_s" not in k})
    return out

def same(ref, run):
    diffs = []
    ck = os.path.join(ref, "checkpoints")
    for f in sorted(os.listdir(ck)):
        if not f.endswith(".safetensors"):
            continue
        a = safetensors(os.path.join(ck, f))
        other = os.path.join(run, "checkpoints", f)
        if not os.path.exists(other):
            diffs.append("%s missing" % f)
            continue
        b = safetensors(other)
        if a != b:
            diffs.append("%s: %d of %d tensors differ" % (f, sum(a[k] != b.get(k) for k in a), len(a)))
    if metrics(ref) != metrics(run):
        diffs.append("metrics.jsonl differs")
    return diffs

if sys.argv[1] == "whole":
    bad = whole(sys.argv[2])
    print("\n".join(bad))
    sys.exit(1 if bad else 0)
else:
    d = same(sys.argv[2], sys.argv[3])
    print("; ".join(d))
    sys.exit(1 if d else 0)
EOF

phase_of() {
    local run=$1
    python3 - "$run" <<'EOF'
import json, os, sys
run = sys.argv[1]
st = os.path.join(run, "backbone/checkpoints/state.json")
if not os.path.exists(st) or json.load(open(st))["epoch"] < 3:
    print("backbone"); sys.exit()
rs = os.path.join(run, "checkpoints/rnp_state.json")
if not os.path.exists(rs) or json.load(open(rs))["rl_epochs"] < 2:
    print("router"); sys.exit()
print("fine-tune")
EOF
}

echo "crash-soak: reference run (uninterrupted)"
t0=$(date +%s.%N)
"$BIN" train soak.toml --out ref > ref.log 2>&1
T=$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$(date +%s.%N)")
echo "crash-soak: the reference run took ${T}s"

RANDOM=$SEED
kills=0; failures=0; rounds=0; resumes=0
declare -A by_phase=([backbone]=0 [router]=0 [fine-tune]=0)
while [ "$kills" -lt "$N" ]; do
    rounds=$((rounds + 1))
    run="soak$rounds"
    started=0
    while :; do
        # A kill after 0.3 s to a third of the reference run's time, from this process's start.
        delay=$(python3 -c "import random; random.seed($SEED * 1000 + $kills); print(round(random.uniform(0.3, $T / 3), 2))")
        if [ "$started" -eq 0 ]; then
            "$BIN" train soak.toml --out "$run" > "$run.log" 2>&1 & pid=$!
            started=1
        else
            "$BIN" train soak.toml --resume "$run" >> "$run.log" 2>&1 & pid=$!
            resumes=$((resumes + 1))
        fi
        sleep "$delay"
        kill -9 "$pid" 2>/dev/null || true
        set +e; { wait "$pid"; } 2>/dev/null; rc=$?; set -e
        if [ "$rc" -eq 137 ]; then
            kills=$((kills + 1))
            phase=$(phase_of "$run")
            by_phase[$phase]=$((by_phase[$phase] + 1))
            if bad=$(python3 check.py whole "$run"); then
                echo "kill $kills: round $rounds, ${delay}s after start, in the $phase phase: every file whole"
            else
                echo "kill $kills: round $rounds, ${delay}s after start, in the $phase phase: HALF-WRITTEN: $bad"
                failures=$((failures + 1))
            fi
            if [ -z "$(ls -A "$run" 2>/dev/null)" ]; then
                # Killed before the run wrote anything: it starts again.
                rm -rf "$run"; started=0
            fi
        elif [ "$rc" -eq 0 ]; then
            if diffs=$(python3 check.py same ref "$run"); then
                echo "round $rounds finished: bit-exact with the uninterrupted run"
            else
                echo "round $rounds finished: DIFFERS from the uninterrupted run: $diffs"
                failures=$((failures + 1))
            fi
            break
        else
            echo "round $rounds: the process failed (exit $rc):"; tail -3 "$run.log"
            failures=$((failures + 1))
            break
        fi
    done
done
echo "crash-soak: $kills kills (backbone ${by_phase[backbone]}, router ${by_phase[router]}, fine-tune ${by_phase[fine-tune]}), $resumes resumes, $rounds rounds, $failures failures"
[ "$failures" -eq 0 ]
