#!/usr/bin/env bash
# On a CUDA host: build the extension in place for this GPU with all cores, run the cuda tests,
# run the op benchmark, and print a short table last.
#   scripts/gpu_test.sh                 everything
#   OPS=rms_norm TESTS="rms_norm and not compile" scripts/gpu_test.sh   (TESTS: a pytest -k expression)
#   SANITIZE=1 also runs compute-sanitizer memcheck and racecheck over scripts/sanitize_ops.py
#   (every kernel once, forward and backward, on small aligned and unaligned shapes).
#   EXTRA_BENCH="benchmarks/bench_linear_ce.py benchmarks/bench_lora.py ..." runs more benchmark
#   scripts after the op benchmark (each prints its own table).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-build/gpu-logs}
mkdir -p "$LOG_DIR"
[ -d .gpu-bundle/site ] && export PYTHONPATH="$PWD/.gpu-bundle/site:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# GPU_ARCHS, not an inherited TORCH_CUDA_ARCH_LIST, picks the archs (default: sm_90).
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${GPU_ARCHS:-9.0}
export UNSLOTH_EXT_REQUIRE_CUDA_BUILD=1
# A g++ that links libstdc++ statically into the extension breaks c10's error formatting (a crash
# on the first error message with a number in it): build with the system compiler when present.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi

stage() { echo; echo "=== $1"; }
declare -A status

stage "build (archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
start=$(date +%s)
if python setup.py -q build_ext --inplace >"$LOG_DIR/build.log" 2>&1; then
  status[build]="ok ($(( $(date +%s) - start )) s)"
else
  tail -40 "$LOG_DIR/build.log"; status[build]="FAILED"
  echo "build failed"; exit 1
fi

stage "environment"
python -m unsloth_ext

stage "cuda tests"
python -m pytest python_tests -m cuda -q -rfs ${TESTS:+-k "$TESTS"} 2>&1 | tee "$LOG_DIR/tests.log" | tail -30
status[tests]=$(tail -1 "$LOG_DIR/tests.log")

if [ "${SANITIZE:-0}" = "1" ]; then
  for tool in memcheck racecheck; do
    stage "compute-sanitizer $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      python scripts/sanitize_ops.py >"$LOG_DIR/sanitize-$tool.log" 2>&1
    rc=$?
    tail -5 "$LOG_DIR/sanitize-$tool.log"
    status[$tool]=$([ $rc = 0 ] && echo clean || echo "FAILED (rc $rc)")
  done
fi

if [ "${BENCH:-1}" = "1" ]; then
  stage "benchmarks"
  python benchmarks/bench_ops.py ${OPS:+--ops "$OPS"} 2>&1 | tee "$LOG_DIR/bench.log" | tail -40
fi

for script in ${EXTRA_BENCH:-}; do
  stage "$script"
  name=$(basename "$script" .py)
  python $script 2>&1 | tee "$LOG_DIR/$name.log" | tail -25
  status[$name]=$([ "${PIPESTATUS[0]}" = 0 ] && echo ok || echo FAILED)
done

stage "summary"
for k in "${!status[@]}"; do printf '%-10s %s\n' "$k" "${status[$k]}"; done
grep -E "^\| [a-z0-9_]+ \| (fwd|bwd)" "$LOG_DIR/bench.log" 2>/dev/null
