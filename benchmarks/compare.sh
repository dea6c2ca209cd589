#!/usr/bin/env bash
# Runs `rlprune bench` and the PyTorch script (benchmarks/pytorch_bench.py) on the same model,
# batch and thread count, one after the other in the same run, and prints both medians and the
# ratio rlprune / PyTorch of images per second.
#
#   benchmarks/compare.sh [MODEL] [BATCH] [THREADS] [extra flags for both, e.g. --train]
#
# Environment: RLPRUNE (default target/release/rlprune), PYTHON (default python3; needs torch),
# REPEATS (default 10), WARMUP (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-gfnet-ti}
BATCH=${2:-8}
THREADS=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
RLPRUNE=${RLPRUNE:-target/release/rlprune}
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-10}
WARMUP=${WARMUP:-2}
common=(--batch "$BATCH" --threads "$THREADS" --warmup "$WARMUP" --repeats "$REPEATS" --json "$@")

echo "# $(date -u +%FT%TZ) on $(hostname), $(nproc) cores; load before: $(uptime | sed 's/.*load average/load average/')"
ours=$("$RLPRUNE" bench "$MODEL" "${common[@]}")
echo "$ours"
theirs=$("$PYTHON" -W ignore benchmarks/pytorch_bench.py "$MODEL" "${common[@]}")
echo "$theirs"
echo "# load after: $(uptime | sed 's/.*load average/load average/')"
"$PYTHON" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = (json.loads(s) for s in sys.argv[1:3])
assert a["params"] == b["params"], f"the two models differ: {a['params']} vs {b['params']} parameters"
print(f"{a['model']} {a['mode']} batch {a['batch']} threads {a['threads']}: "
      f"rlprune {a['images_per_s']:.2f} images/s (p10-p90 {a['images_per_s_p10']:.2f}-{a['images_per_s_p90']:.2f}), "
      f"PyTorch {b.get('torch', '')} {b['images_per_s']:.2f} images/s (p10-p90 {b['images_per_s_p10']:.2f}-{b['images_per_s_p90']:.2f}); "
      f"ratio rlprune/PyTorch {a['images_per_s'] / b['images_per_s']:.2f}")
PY
