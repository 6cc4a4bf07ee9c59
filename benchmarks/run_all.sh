#!/usr/bin/env bash
# The full benchmark suite, as used for the README figures. Writes into benchmarks/results/:
#   bench.txt / bench.json / bench.png   python -m cynorm bench (cynorm vs torch vs NumPy, and
#                                        ONNX Runtime / OpenVINO / JAX where importable)
#   stats.txt / stats.json               benchmarks/bench_stats_algorithms.py
#   torch_modules.txt / .json            python -m cynorm bench --torch-modules
#   standardize.txt / standardize.json   benchmarks/bench_standardize.py
# Extra arguments go to `python -m cynorm bench` (e.g. --threads 1,4,all or --ops layer_norm).
# Run it on a quiet machine: the numbers are ratios measured side by side, but a busy
# machine still adds noise, above all at the higher thread counts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=benchmarks/results
mkdir -p "$out"

python -m cynorm | tee "$out/selfcheck.txt"
python -m cynorm bench --json "$out/bench.json" --plot "$out/bench.png" "$@" \
    | tee "$out/bench.txt"
python benchmarks/bench_stats_algorithms.py --json "$out/stats.json" | tee "$out/stats.txt"
python -m cynorm bench --torch-modules --json "$out/torch_modules.json" \
    | tee "$out/torch_modules.txt"
python benchmarks/bench_standardize.py --json "$out/standardize.json" \
    | tee "$out/standardize.txt"
echo "results in $out/"
