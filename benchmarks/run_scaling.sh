#!/usr/bin/env bash
# Build cynorm for this machine and measure its thread scaling against torch
# (benchmarks/bench_scaling.py), for a many-core machine that is lent for minutes: one
# command, bounded in time, everything it prints also in $RESULTS/scaling.log and the
# table in $RESULTS/scaling.json (rewritten after every case, so a cut-off run keeps what
# it measured).
#
#   RESULTS=/some/dir BUDGET=270 bash benchmarks/run_scaling.sh
#
# Optional: WHEELS=dir of wheels (Cython, threadpoolctl) installed into a scratch
# site-packages when the machine's Python lacks them or the build fails with its own.
set -u -o pipefail
RESULTS=${RESULTS:-/tmp/cynorm-scaling}
BUDGET=${BUDGET:-270}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
log="$RESULTS/scaling.log"
{
  echo "== $(date -u) $(uname -m) $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
  lscpu 2>/dev/null | grep -E 'Model name|Socket|Core|Thread|NUMA node|L3' || true
  $PY -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
  gcc --version | head -1
} 2>&1 | tee "$log"

build() {
  # one build of the kernels for this machine (-march=native): bitwise the same results
  # as the per-level builds, and a quarter of their compile time
  CYNORM_ARCH=native timeout 240 $PY setup.py -q build_ext --inplace -j "$(nproc)" \
    >"$RESULTS/build.log" 2>&1
}
t0=$(date +%s)
if ! build; then
  echo "build failed with this Python's packages:" | tee -a "$log"
  tail -20 "$RESULTS/build.log" | tee -a "$log"
  if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/cynorm-site \
      "$WHEELS"/*.whl && export PYTHONPATH=/tmp/cynorm-site${PYTHONPATH:+:$PYTHONPATH}
    build || { tail -30 "$RESULTS/build.log" | tee -a "$log"; exit 1; }
  else
    exit 1
  fi
fi
echo "built in $(( $(date +%s) - t0 )) s" | tee -a "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c 'import cynorm; cynorm.show_config()' 2>&1 | tee -a "$log"
PYTHONUNBUFFERED=1 $PY benchmarks/bench_scaling.py --budget "$BUDGET" \
  --json "$RESULTS/scaling.json" 2>&1 | tee -a "$log"
