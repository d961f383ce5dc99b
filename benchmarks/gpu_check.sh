#!/usr/bin/env bash
# Every GPU code path of the workflow, with random weights, in one run (about 3-5 minutes on one recent GPU;
# budget 8): UNI2-h and Nicheformer extraction (items/s, peak GPU memory, bf16 against fp32), one training of
# every fusion method (epochs/s; CoMM and DCCA again with training.precision bf16) and a few steps of
# Nicheformer's masked-language-model post-training.
# Each check runs in its own process (benchmarks/gpu_check.py) under a time limit, appends its rows to one TSV
# and counts as failed on an exception, a non-finite result, a model off the device or bf16 embeddings that
# drift from fp32. Exit status: the number of failed checks (0 = all passed).
#
#   bash benchmarks/gpu_check.sh                         # on a GPU machine: writes benchmarks/out/gpu_check.tsv
#   bash benchmarks/gpu_check.sh --device cpu --tiny     # the script's own test, seconds on a CPU
#   options: --device cuda|cpu|auto  --tiny  --out FILE.tsv  --timeout SECONDS (per check, default 120)
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=""
OUT=benchmarks/out/gpu_check.tsv
TIMEOUT=120
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --tiny) TINY="--tiny"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
echo "gpu_check: device $DEVICE ${TINY:+(tiny)}, rows -> $OUT"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
failed=0
start=$(date +%s)
for check in uni2h nicheformer train mlm; do
    t0=$(date +%s)
    timeout "$TIMEOUT" "$PY" benchmarks/gpu_check.py "$check" --device "$DEVICE" $TINY --out "$OUT"
    rc=$?
    if [ $rc -ne 0 ]; then
        failed=$((failed + 1))
        [ $rc -eq 124 ] && printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$check" "run" "" "" "FAIL" "timed out after ${TIMEOUT} s" >> "$OUT"
        echo "gpu_check: $check FAILED (exit $rc)" >&2
    fi
    echo "gpu_check: $check took $(( $(date +%s) - t0 )) s"
done
echo "gpu_check: $failed failed check(s), $(( $(date +%s) - start )) s in all; table: $OUT"
exit $failed
