#!/usr/bin/env bash
# The accelerator checks and benchmarks as one prepared run (issue 11, item 1): correctness first, then the
# generator against the reference formulation, then adaptation at 1024 px (precision and formulation compared
# in one process, the fastest over a real 300 iterations with its own peak memory, torch.compile).
# Each stage has its own time limit so that a slow one cannot take the others' figures with it; logs go to
# $OUT (or ./device-logs). STAGES picks a subset, e.g. STAGES="compare adapt_300".
# Usage (on the GPU machine, from the repository root): bash bench/device_run.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-device-logs}; mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=${STAGES:-check generator compare adapt_300 compile}
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the machine lacks, carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T), limit ${secs}s): $*"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -v "^WARNING:root:No pretrained" "$OUT/$name.log" | tail -n 60; echo "=== $name rc=$rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
stage check 90 $PY bench/device_check.py
stage generator 90 $PY bench/generator.py --sizes 256 1024 --reps 10 --compare --reference --amp both
stage compare 120 $PY bench/adapt.py --size 1024 --iters 40 --amp off,bf16 --formulation grouped,scaled
read -r AMP FORM < <(sed -n 's/^fastest over 300 iterations: compile=off amp=\(.*\) formulation=\(.*\)$/\1 \2/p' \
  "$OUT/compare.log" 2>/dev/null; echo)
stage adapt_300 120 $PY bench/adapt.py --size 1024 --iters 299 --amp "${AMP:-auto}" --formulation "${FORM:-scaled}"
stage compile ${COMPILE_SECS:-240} $PY bench/adapt.py --size 1024 --iters 20 --amp "${AMP:-auto}" \
  --formulation "${FORM:-scaled}" --compile both
echo "=== done $(date +%T)"
