#!/usr/bin/env bash
# Everything a lent GPU machine should run, in stages that each fit one 10-minute call:
#
#   bash benchmarks/gpu_session.sh build test      # build for the chip in hand, run the test suite
#   bash benchmarks/gpu_session.sh sanitize        # compute-sanitizer memcheck/racecheck on the CUDA tests
#   bash benchmarks/gpu_session.sh bench           # the benchmark suite and its report
#
# Logs and results go to $OUT (the device tool's output folder), or ./gpu-out. Commit what matters
# under benchmarks/results/. Written for the lent H100/H200 machines (torch with CUDA, nvcc, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0

for stage in "$@"; do
  case "$stage" in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
      python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || status=1
      tail -3 "$OUT/build.log"
      python3 -c "import sa_kernels, torch; print(sa_kernels.available_backends('cuda'), torch.__version__)" ;;
    test)
      python3 -m pytest tests/ -q -ra -x --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -40
      status=$((status | PIPESTATUS[0])) ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 7 python3 -m pytest tests/test_cuda.py -q -x \
          -k "not compile and not graph" >"$OUT/sanitizer-$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $?"; tail -5 "$OUT/sanitizer-$tool.log"
      done ;;
    bench)
      python3 -m sa_kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
      status=$((status | PIPESTATUS[0])) ;;
    *) echo "unknown stage $stage (build, test, sanitize, bench)"; exit 2 ;;
  esac
done
exit $status
