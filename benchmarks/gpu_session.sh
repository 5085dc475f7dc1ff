#!/usr/bin/env bash
# One lent-GPU session in ONE device call of under 9 minutes: build, the GPU tests, the kernel
# benchmarks, the model benchmarks, compute-sanitizer on the CUDA tests, whole-model
# torch.compile benchmarks in whatever time is left, the report.
#
#   bash benchmarks/gpu_session.sh                    # every stage, in the order below
#   bash benchmarks/gpu_session.sh build test         # chosen stages, in the order given
#   SESSION_DRY_RUN=1 bash benchmarks/gpu_session.sh  # print the plan (commands, time limits)
#   bash benchmarks/gpu_session.sh sweep-cuda sweep-triton   # a second call, machine still warm:
#                                                     # every CUDA and Triton kernel variant timed
#   bash benchmarks/gpu_session.sh bench-cpu          # issue 10's CPU targets on this machine's
#                                                     # CPU (an idle one), GPU hidden; not a default stage
#
# Each stage runs under its own `timeout`: its budget, cut to what is left of the session
# (SESSION_SECONDS, default 510) after the minimum the later stages keep for themselves. A stage
# that fails or runs out of time does not stop the next. The benchmarks write their JSON after
# every case, so a benchmark stage stopped by its limit still leaves every case it finished,
# and the report covers them.
#
# What comes back (the device tool returns at most 8 files, 2 folders deep), in $OUT (or
# ./gpu-out):
#   summary.txt            stages (exit code, seconds, limit), GPU, versions, test and
#                          sanitizer summaries, the report's tables
#   logs.tgz               every log: build, tests (+ junit XML), sanitizers, benchmarks, the
#                          benchmarks' raw JSONs (refreshed after every stage)
#   <device>-<date>.json   the kernel and model benchmarks merged, with .md (tables) and .png
#
# Environment knobs (defaults in brackets): SESSION_SECONDS [510]; GPU_TESTS [tests/test_cuda.py
# tests/test_triton.py tests/test_cuda_ext.py tests/test_module.py tests/test_native.py
# tests/test_ops.py tests/test_fuse_model.py]; TEST_WORKERS [12];
# CPU_THREADS [1] (bench-cpu: torch.set_num_threads; "default" for torch's default);
# SANITIZE_TESTS [tests/test_cuda.py]; SANITIZE_K [see below]; BENCH_KERNEL_ARGS and
# BENCH_MODEL_ARGS (extra pytest arguments); TORCH_CUDA_ARCH_LIST [9.0]; MAX_JOBS [16].
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sa-gpu-session.XXXXXX")
LOGS="$WORK/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DRY=${SESSION_DRY_RUN:-0}
# 510 s and a 5 s grace per stage that hits its limit: under 9 minutes however the stages run.
SESSION_SECONDS=${SESSION_SECONDS:-510}
# A dry run spends no time; it plays each stage as if it ran to its limit (the worst case).
SIMULATED=0
now() { echo $((SECONDS + SIMULATED)); }
DEADLINE=$((SECONDS + SESSION_SECONDS))
GPU_TESTS=${GPU_TESTS:-tests/test_cuda.py tests/test_triton.py tests/test_cuda_ext.py tests/test_module.py tests/test_native.py tests/test_ops.py tests/test_fuse_model.py}
TEST_WORKERS=${TEST_WORKERS:-12}
SANITIZE_TESTS=${SANITIZE_TESTS:-tests/test_cuda.py}
# Every kernel path (warp, block, vectorised, two-sweep, channels_last, strided), forward and
# backward, in one single and one half precision: enough launches for the tools, few enough to
# finish under them.
SANITIZE_K=${SANITIZE_K:-test_matches_reference and (float32 or bfloat16)}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# stage name -> (budget seconds, seconds it keeps for itself when earlier stages run long)
# Budgets are predictions (from the 2026-11-28 H200 session: build 30 s, the CUDA and Triton
# tests 36 s with -n 12, 5-10 s per cold torch.compile of the reference), not measurements of
# this script; the first session's summary.txt replaces them.
declare -A BUDGET=([info]=15 [build]=150 [test]=120 [bench-kernels]=240 [bench-models]=150
                   [sanitize]=120 [bench-model-compile]=200 [report]=30 [bench-cpu]=400
                   [sweep-cuda]=200 [sweep-triton]=200)
declare -A MINIMUM=([info]=5 [build]=60 [test]=45 [bench-kernels]=90 [bench-models]=60
                    [sanitize]=45 [bench-model-compile]=0 [report]=20 [bench-cpu]=0
                    [sweep-cuda]=60 [sweep-triton]=60)
ALL_STAGES=(info build test bench-kernels bench-models sanitize bench-model-compile report)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
for stage in "${STAGES[@]}"; do
  [ -n "${BUDGET[$stage]+x}" ] || { echo "unknown stage $stage (${ALL_STAGES[*]} bench-cpu sweep-cuda sweep-triton)"; exit 2; }
done

note() { echo "$*" | tee -a "$SUMMARY"; }

# The seconds a stage may run: its budget, or what is left once the stages after it have
# their minimum, whichever is less.
limit_for() {
  local index=$1 stage=${STAGES[$1]} reserve=0 later
  for later in "${STAGES[@]:$((index + 1))}"; do reserve=$((reserve + MINIMUM[$later])); done
  local left=$((DEADLINE - $(now) - reserve)) budget=${BUDGET[$stage]}
  echo $((left < budget ? left : budget))
}

# run_limited SECONDS LOG COMMAND...: the command under `timeout` (it and its children: timeout
# signals its whole process group), output to LOG; returns its exit code (124: timed out).
run_limited() {
  local seconds=$1 log=$2
  shift 2
  if [ "$DRY" = 1 ]; then
    echo "  would run (limit ${seconds}s, log $(basename "$log")): $*"
    SIMULATED=$((SIMULATED + seconds))
    return 0
  fi
  timeout --signal=TERM --kill-after=5 "$seconds" "$@" >"$log" 2>&1
}

# pytest's closing line ("312 passed, 45 skipped in 36.1s"), or its last line if it never got there
pytest_outcome() {
  local line
  line=$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$1" | tail -1)
  [ -n "$line" ] || line="(no pytest summary) $(tail -1 "$1")"
  echo "$line" | tee -a "$SUMMARY"
}

pack_logs() {
  [ "$DRY" = 1 ] && return
  tar -czf "$OUT/logs.tgz.tmp" -C "$WORK" logs && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
}

stage_info() {
  local t=$1
  run_limited "$t" "$LOGS/info.log" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; \
    $PY -c 'import torch, sa_kernels; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"backends\", sa_kernels.available_backends())'; \
    $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pytest-benchmark|pytest-xdist|matplotlib) '"
  local rc=$?
  [ "$DRY" = 1 ] || cat "$LOGS/info.log" >>"$SUMMARY"
  return $rc
}

stage_build() {
  # The CPU kernels only for the capability torch runs with here (each module is a compile).
  local isa
  isa=$("$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())" 2>/dev/null)
  run_limited "$1" "$LOGS/build.log" env SA_KERNELS_CPU_CAPABILITIES="${isa:-default},default" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
  local rc=$?
  [ "$DRY" = 1 ] || tail -3 "$LOGS/build.log" | tee -a "$SUMMARY"
  return $rc
}

stage_test() {
  # shellcheck disable=SC2086  # GPU_TESTS is a list of paths
  run_limited "$1" "$LOGS/tests.log" "$PY" -m pytest $GPU_TESTS -q -ra -n "$TEST_WORKERS" \
    -p no:cacheprovider --junitxml="$LOGS/tests.xml"
  local rc=$?
  [ "$DRY" = 1 ] || pytest_outcome "$LOGS/tests.log"
  return $rc
}

stage_bench() {  # stage_bench SECONDS NAME FILE EXTRA_ARGS
  local t=$1 name=$2 file=$3 extra=$4
  # shellcheck disable=SC2086  # extra is a list of pytest arguments
  run_limited "$t" "$LOGS/$name.log" "$PY" -m pytest "$file" --benchmark-only -p no:cacheprovider \
    --sa-json="$LOGS/$name.json" $extra
  local rc=$?
  [ "$DRY" = 1 ] || pytest_outcome "$LOGS/$name.log"
  return $rc
}

stage_sanitize() {
  local t=$1 rc=0 tools=(memcheck racecheck synccheck) i=0 tool each start code
  for tool in "${tools[@]}"; do
    each=$((t / (${#tools[@]} - i)))  # an equal share of what is left
    start=$(now)
    run_limited "$each" "$LOGS/sanitizer-$tool.log" compute-sanitizer --tool "$tool" \
      --error-exitcode 7 --print-limit 20 --report-api-errors no --target-processes all \
      "$PY" -m pytest "$SANITIZE_TESTS" -v -x -p no:cacheprovider -k "$SANITIZE_K"
    code=$?
    rc=$((rc | code))
    t=$((t - ($(now) - start)))
    i=$((i + 1))
    if [ "$DRY" != 1 ]; then
      note "compute-sanitizer $tool: exit $code$([ $code = 124 ] && echo ' (time limit)')"
      grep -E "ERROR SUMMARY" "$LOGS/sanitizer-$tool.log" | tail -1 | tee -a "$SUMMARY"
      pytest_outcome "$LOGS/sanitizer-$tool.log"
    fi
  done
  return $rc
}

# Issue 10's CPU targets (--sa-shapes cpu) with the GPU hidden, reported on their own: a CPU
# report beside the GPU one (its files are named cpu-...-t<threads>).
stage_bench_cpu() {
  local t=$1 threads=() rc
  [ "${CPU_THREADS:-1}" = default ] || threads=(--sa-threads "${CPU_THREADS:-1}")
  run_limited $((t - 20)) "$LOGS/bench-cpu.log" env CUDA_VISIBLE_DEVICES= "$PY" -m pytest \
    benchmarks/test_bench_shuffle_attention.py --benchmark-only -p no:cacheprovider \
    --sa-json="$LOGS/bench-cpu.json" --sa-shapes cpu "${threads[@]}" ${BENCH_CPU_ARGS:-}
  rc=$?
  [ "$DRY" = 1 ] || pytest_outcome "$LOGS/bench-cpu.log"
  if [ "$DRY" = 1 ] || [ -s "$LOGS/bench-cpu.json" ]; then
    run_limited 20 "$LOGS/report-cpu.log" "$PY" -m sa_kernels.bench --json "$LOGS/bench-cpu.json" \
      --out "$OUT" || rc=1
  fi
  return $rc
}

# The kernel variants of issues 11 and 12 (not default stages: a second call of the session,
# right after the first while the machine is warm, so the build is still there):
#   bash benchmarks/gpu_session.sh sweep-cuda sweep-triton
# Their JSON and markdown go into logs.tgz; the tables into summary.txt.
stage_sweep_cuda() {
  run_limited "$1" "$LOGS/sweep-cuda.log" "$PY" benchmarks/cuda_variants.py --out "$LOGS/sweep-cuda" \
    --budget-s $(($1 - 20))
  local rc=$?
  [ "$DRY" = 1 ] || { tail -40 "$LOGS/sweep-cuda.log" >>"$SUMMARY"; }
  return $rc
}

stage_sweep_triton() {
  run_limited "$1" "$LOGS/sweep-triton.log" "$PY" benchmarks/triton_sweep.py --out "$LOGS/sweep-triton" \
    --max-seconds $(($1 - 60))
  local rc=$?
  [ "$DRY" = 1 ] || { tail -40 "$LOGS/sweep-triton.log" >>"$SUMMARY"; }
  return $rc
}

stage_report() {
  local jsons=() f
  for f in "$LOGS/bench-kernels.json" "$LOGS/bench-models.json" "$LOGS/bench-model-compile.json"; do
    [ -s "$f" ] && jsons+=(--json "$f")
  done
  if [ ${#jsons[@]} -eq 0 ] && [ "$DRY" != 1 ]; then
    note "report: no benchmark JSON to report"
    return 1
  fi
  [ "$DRY" = 1 ] && jsons=(--json "$LOGS/bench-kernels.json" --json "$LOGS/bench-models.json")
  run_limited "$1" "$LOGS/report.log" "$PY" -m sa_kernels.bench "${jsons[@]}" --out "$OUT"
  local rc=$?
  [ "$DRY" = 1 ] || sed -n '/^# Shuffle Attention/,/^wrote /p' "$LOGS/report.log" >>"$SUMMARY"
  return $rc
}

note "gpu_session: stages ${STAGES[*]}; ${SESSION_SECONDS}s in all; results in $OUT"
status=0
for i in "${!STAGES[@]}"; do
  stage=${STAGES[$i]}
  t=$(limit_for "$i")
  if [ "$t" -lt 5 ]; then
    note "== $stage: not run (no time left)"
    [ "${MINIMUM[$stage]}" -gt 0 ] && status=1  # a stage with no minimum is optional
    continue
  fi
  [ "$DRY" = 1 ] && echo "== $stage (limit ${t}s)"
  start=$(now)
  case "$stage" in
    info) stage_info "$t" ;;
    build) stage_build "$t" ;;
    test) stage_test "$t" ;;
    bench-kernels) stage_bench "$t" bench-kernels benchmarks/test_bench_shuffle_attention.py \
                     "${BENCH_KERNEL_ARGS:-}" ;;
    bench-models) stage_bench "$t" bench-models benchmarks/test_bench_models.py \
                    "${BENCH_MODEL_ARGS:-}" ;;
    bench-model-compile) stage_bench "$t" bench-model-compile benchmarks/test_bench_models.py \
                           "--sa-compile all -k compile ${BENCH_MODEL_ARGS:-}" ;;
    sanitize) stage_sanitize "$t" ;;
    report) stage_report "$t" ;;
    bench-cpu) stage_bench_cpu "$t" ;;
    sweep-cuda) stage_sweep_cuda "$t" ;;
    sweep-triton) stage_sweep_triton "$t" ;;
  esac
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  [ "$DRY" = 1 ] || note "== $stage: exit $rc$([ $rc = 124 ] && echo ' (time limit)') in $(($(now) - start))s (limit ${t}s)"
  pack_logs
done
note "gpu_session: done in $(now)s$([ "$DRY" = 1 ] && echo ' (dry run: every stage at its limit)'), exit $status"
pack_logs
rm -rf "$WORK"
exit $status
