#!/usr/bin/env bash
# Everything a fresh GPU machine checks, in one command (no package registry needed: the machine
# brings its own torch and triton; pure-Python peers travel as wheels in .whl/):
#
#     bash benchmarks/run_gpu.sh [RESULTS_DIR]      (default: $OUT if set, else benchmarks/results)
#
# 1. installs pyfastrl without dependencies, and the wheels in .whl/ if any (liger-kernel,
#    prefix-grouper, ...; fetch them with `pip download --no-deps` as the README says);
# 2. runs the test suite with CUDA (all but the CPU compile check, marker `compile`): GPU-marked tests
#    run, Triton kernels compiled (the interpreter is only for CPU-only machines); log in RESULTS_DIR/tests.log;
# 3. runs `pyfastrl bench all --quick` into RESULTS_DIR (JSON, PNG, summary.md);
# 4. times candidate launch configurations per (op, head dim, dtype) on this GPU's architecture
#    (benchmarks/tune_configs.py --quick) and writes the winners to RESULTS_DIR/tuned_configs_<arch>.json,
#    ready to commit as a config table;
# 5. prints the test outcome and the benchmark summary table last.
# Exits non-zero when the tests, the benchmarks or the tuning fail, or no GPU is visible; every step runs.
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$results"

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pyfastrl-site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/pyfastrl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
unset TRITON_INTERPRET
python3 - <<'PY' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("run_gpu.sh: no CUDA GPU visible")
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

start=$(date +%s)
# -m "not compile": the compile check (tests/test_compile_check.py) compiles for sm_80 and sm_90a
# without a GPU; it is CI's job and would spend minutes of the lent machine's time.
python3 -m pytest -q -rs --durations=10 -p no:cacheprovider -m "not compile" 2>&1 | tee "$results/tests.log"
tests_status=${PIPESTATUS[0]}
tests_seconds=$(( $(date +%s) - start ))

start=$(date +%s)
python3 -m pyfastrl.cli bench all --quick --out "$results" 2>&1 | tee "$results/bench.log"
bench_status=${PIPESTATUS[0]}
bench_seconds=$(( $(date +%s) - start ))

start=$(date +%s)
python3 benchmarks/tune_configs.py --quick --out "$results" 2>&1 | tee "$results/tune.log"
tune_status=${PIPESTATUS[0]}
tune_seconds=$(( $(date +%s) - start ))

echo
echo "== run_gpu.sh summary =="
echo "tests: $(tail -n 1 "$results/tests.log") (exit $tests_status, ${tests_seconds} s)"
echo "bench: exit $bench_status, ${bench_seconds} s; results in $results"
echo "tuning: exit $tune_status, ${tune_seconds} s; winners in $results/tuned_configs_*.json"
[ -f "$results/summary.md" ] && cat "$results/summary.md"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$tune_status" -eq 0 ]
