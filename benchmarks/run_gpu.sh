#!/usr/bin/env bash
# Everything a fresh GPU machine checks, in one command (no package registry needed: the machine
# brings its own torch, triton, pybind11 and pytest-xdist; pure-Python peers travel as wheels in .whl/):
#
#     bash benchmarks/run_gpu.sh [RESULTS_DIR]      (default: $OUT if set, else benchmarks/results)
#
# Steps (STEPS, default "gpu-tests tests bench tune"; each under its own time limit, so that the
# whole run ends inside a lent machine's 10-minute command limit and every step's log survives):
#   install    always: pyfastrl without dependencies, with the CUDA extension (PYFASTRL_BUILD_CUDA=1;
#              a failed build is reported and the rest runs without it), and the wheels in .whl/
#              (liger-kernel, prefix-grouper, ...; fetch them with `pip download --no-deps` as the
#              README says);
#   gpu-tests  the `gpu`-marked tests (compiled Triton, CUDA kernels, larger sizes): RESULTS_DIR/gpu_tests.log
#   tests      the rest of the suite with CUDA, Triton kernels compiled (the interpreter is only for
#              CPU-only machines), but not the CPU compile check (marker `compile`, CI's job): tests.log
#   bench      `pyfastrl bench all --quick` into RESULTS_DIR (JSON, PNG, summary.md): bench.log
#   profile    benchmarks/kernel_profile.py: per-kernel CUDA time of each op's forward + backward
#   tune       benchmarks/tune_configs.py --quick $TUNE_ARGS (e.g. TUNE_ARGS="--only
#              prefix_grouped_attention=128"): winners in RESULTS_DIR/tuned_configs_<arch>.json
# The outcome of each step and the benchmark summary table are printed last.
# Exits non-zero when a step fails or no GPU is visible; every step runs.
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-${OUT:-benchmarks/results}}"
steps="${STEPS:-gpu-tests tests bench profile tune}"
workers="${PYTEST_WORKERS:-8}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pyfastrl-site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/pyfastrl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! PYFASTRL_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -e . >"$results/install.log" 2>&1; then
    echo "run_gpu.sh: the CUDA extension did not build (tail of install.log below); installing without it"
    tail -n 30 "$results/install.log"
    python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
unset TRITON_INTERPRET
python3 - <<'PY' || exit 1
import torch, triton
if not torch.cuda.is_available():
    raise SystemExit("run_gpu.sh: no CUDA GPU visible")
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")
PY
python3 -m pyfastrl.cli info 2>&1 | tee "$results/info.log"

declare -A status seconds
run_step() {  # name, time limit in seconds, log file, command...
    local name=$1 limit=$2 log=$3; shift 3
    case " $steps " in *" $name "*) ;; *) return ;; esac
    local start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$results/$log"
    status[$name]=${PIPESTATUS[0]}
    seconds[$name]=$(( $(date +%s) - start ))
}
# -v names each test as it ends, so a step cut off by its limit still says which tests failed.
pytest_args=(-v -rfEs --durations=15 --timeout=120 -p no:cacheprovider -n "$workers")
run_step gpu-tests "${GPU_TESTS_LIMIT:-200}" gpu_tests.log python3 -m pytest "${pytest_args[@]}" -m gpu tests
run_step tests "${TESTS_LIMIT:-240}" tests.log python3 -m pytest "${pytest_args[@]}" -m "not gpu and not compile" tests
run_step bench "${BENCH_LIMIT:-200}" bench.log python3 -m pyfastrl.cli bench all --quick --out "$results"
run_step profile "${PROFILE_LIMIT:-120}" profile.log python3 benchmarks/kernel_profile.py --out "$results"
# shellcheck disable=SC2086  # TUNE_ARGS is a list of words
run_step tune "${TUNE_LIMIT:-200}" tune.log python3 benchmarks/tune_configs.py --quick ${TUNE_ARGS:-} --out "$results"

echo
echo "== run_gpu.sh summary (a step's exit 124 means it ran out of its time limit) =="
failed=0
for name in gpu-tests tests bench profile tune; do
    [ -n "${status[$name]:-}" ] || continue
    echo "$name: exit ${status[$name]}, ${seconds[$name]} s"
    [ "${status[$name]}" -eq 0 ] || failed=1
done
for log in gpu_tests.log tests.log; do [ -f "$results/$log" ] && echo "$log: $(tail -n 1 "$results/$log")"; done
[ -f "$results/summary.md" ] && cat "$results/summary.md"
exit $failed
