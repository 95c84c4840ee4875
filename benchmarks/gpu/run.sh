#!/usr/bin/env bash
# The prepared GPU run of llmcore (docs/testing.md, "The GPU script"): everything a GPU
# machine should do in one short command, run from the repository root.
#
#   bash benchmarks/gpu/run.sh [--dry-run] [OUT_DIR]
#
# Output folder: $OUT if set, else OUT_DIR, else ./llmcore-runs/gpu-<date>. Steps, in order
# of value (a later step cut off by a time limit loses the least):
#
#   env                nvidia-smi, nvcc, python, torch, git commit        -> summary.txt
#   selftest-build     only when no runnable self-test binary was carried: cmake builds
#                      llmcore_cuda_selftest there for sm_90a, all cores  -> build.log
#   selftest           the torch-free CUDA self-test: every kernel checked, then timed
#                                                                         -> selftest.json/.log
#   selftest-sanitize  the self-test (--reduced --no-time) under compute-sanitizer memcheck
#                      and racecheck                                      -> selftest.log
#   build              the torch extension for sm_90a only (LLMCORE_CUDA_ARCHS=90a,
#                      MAX_JOBS=nproc), timed                             -> build.log
#   pytest             python3 -m pytest -m cuda -x -q                    -> pytest.log
#   sanitize           benchmarks/gpu/sanitize_cases.py (every kernel, small sizes) under
#                      compute-sanitizer memcheck and racecheck           -> sanitizer.log
#   bench              llmcore bench --device cuda --quick, one suite at a time, each
#                      added to bench.tar as it finishes                  -> bench.log, bench.tar
#
# Every step writes its log as it runs and appends "step status seconds" to summary.txt
# when it ends, so whatever is cut off, what ran before is saved. At most 8 files land in
# the output folder (the device tool returns no more), hence one tar for the bench
# results. Each step runs under its own time limit (STEP_TIMEOUT_<STEP>, seconds), cut to
# what is left of the whole run's budget (RUN_BUDGET, default 570 s: one device command
# may run 600 s); a step with under 20 s left is skipped (SKIPPED(budget) in the summary).
# STEPS (space-separated names) runs a subset, e.g. STEPS="pytest sanitize bench" for a
# second command on the same warm machine (the extension built by the first is kept).
# The self-test binary is taken from $LLMCORE_SELFTEST, else
# build/cuda-selftest/llmcore_cuda_selftest (built here, carried: `carry` that folder),
# else built there by the selftest-build step (about two minutes on 16 cores).
#
# --dry-run: prints each step's command and checks what can be checked without a GPU (the
# files and tools each step needs, the bench suites), writes nothing; exit 1 if a step
# could not run for a reason a GPU would not change (a missing file, an unknown suite).
set -uo pipefail

dry=0
out_arg=""
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $a" >&2; exit 2 ;;
    *) out_arg="$a" ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 2
py="${PYTHON:-python3}"
out="${OUT:-${out_arg:-$root/llmcore-runs/gpu-$(date +%Y%m%d-%H%M%S)}}"
selftest="${LLMCORE_SELFTEST:-$root/build/cuda-selftest/llmcore_cuda_selftest}"
selftest_device_build="$root/build/cuda-selftest-device"  # where selftest-build builds
nproc_="$(nproc 2>/dev/null || echo 4)"
ALL_STEPS="env selftest-build selftest selftest-sanitize build pytest sanitize bench"
STEPS="${STEPS:-$ALL_STEPS}"
BENCH_SUITES="${BENCH_SUITES:-attention decode bfp generate assisted train}"

# Per-step time limits (seconds); the device tool allows 600 s per command in all.
declare -A limit=(
  [env]="${STEP_TIMEOUT_ENV:-30}"
  [selftest-build]="${STEP_TIMEOUT_SELFTEST_BUILD:-240}"
  [selftest]="${STEP_TIMEOUT_SELFTEST:-150}"
  [selftest-sanitize]="${STEP_TIMEOUT_SELFTEST_SANITIZE:-120}"
  [build]="${STEP_TIMEOUT_BUILD:-420}"
  [pytest]="${STEP_TIMEOUT_PYTEST:-300}"
  [sanitize]="${STEP_TIMEOUT_SANITIZE:-240}"
  [bench]="${STEP_TIMEOUT_BENCH:-300}"
)
budget="${RUN_BUDGET:-570}"
deadline=$(( $(date +%s) + budget ))

problems=0
note() { echo "run.sh: $*"; }
need_file() {  # dry-run check of a file a step needs
  if [ -e "$1" ]; then note "  ok: $1"; else note "  MISSING: $1"; problems=$((problems + 1)); fi
}
need_tool() {  # a tool the GPU machine has; absent here is only reported
  if command -v "$1" >/dev/null 2>&1; then note "  ok: $1 ($(command -v "$1"))"
  else note "  not here (the GPU machine has it): $1"; fi
}

sanitizer() {  # compute-sanitizer TOOL CMD...: errors make it exit 1
  local tool="$1"; shift
  compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 50 "$@"
}

# run_step NAME LOG CMD...: the command under the time limit of step NAME, its output to
# LOG (appended), one line to summary.txt (labelled $LABEL if set, else NAME).
run_step() {
  local name="$1" log="$2"; shift 2
  local t0 rc secs label="${LABEL:-$name}" lim left
  t0=$(date +%s)
  left=$(( deadline - t0 - 5 ))  # what the run's budget leaves (5 s to write the summary)
  lim="${limit[$name]}"
  [ "$left" -lt "$lim" ] && lim="$left"
  if [ "$lim" -lt 20 ]; then
    printf '%-18s %-16s %5ss  %s\n' "$label" "SKIPPED(budget)" 0 "$log" >>"$out/summary.txt"
    echo "run.sh: $label: SKIPPED (${left}s of the budget left)"
    return 124
  fi
  { echo "=== $label (limit $lim s) ==="
    printf '$ %s\n' "$(printf '%s ' "$@" | tr -s '\n ' ' ' | cut -c1-300)"; } >>"$out/$log"
  timeout --kill-after=5 "$lim" "$@" >>"$out/$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  local status=ok
  [ "$rc" -eq 0 ] || status="FAILED(rc=$rc)"
  [ "$rc" -eq 124 ] && status="TIMEOUT(${lim}s)"
  printf '%-18s %-16s %5ss  %s\n' "$label" "$status" "$secs" "$log" >>"$out/summary.txt"
  echo "run.sh: $label: $status in ${secs}s (log: $log)"
  return "$rc"
}

# ---- the steps -------------------------------------------------------------------------
step_env() {
  if [ "$dry" = 1 ]; then
    note "env: nvidia-smi; nvcc --version; $py -c 'torch, cuda, device'; git rev-parse HEAD"
    need_tool nvidia-smi; need_tool nvcc; need_tool "$py"
    return
  fi
  run_step env summary.txt bash -c "
    echo \"date: \$(date -u +%FT%TZ)  host: \$(hostname)  nproc: $nproc_\"
    echo \"commit: \$(git rev-parse HEAD 2>/dev/null || echo unknown)\$(git diff --quiet 2>/dev/null || echo ' (dirty)')\"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
    nvcc --version | tail -1 || true
    command -v compute-sanitizer || echo 'compute-sanitizer: not found'
    $py -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  "
}

selftest_runs() { [ -x "$selftest" ] && "$selftest" --list >/dev/null 2>&1; }

step_selftest_build() {
  local b="$selftest_device_build"
  local cmd="cmake -S cmake -B $b -DLLMCORE_CUDA_ARCHS=90a -DLLMCORE_CHECK_BINDINGS=OFF -DLLMCORE_WERROR=OFF && cmake --build $b --target llmcore_cuda_selftest -j $nproc_"
  if [ "$dry" = 1 ]; then
    note "selftest-build: (only if $selftest is absent or does not run) $cmd"
    need_file cmake/CMakeLists.txt; need_tool cmake; need_tool nvcc
    if [ -x "$selftest" ]; then note "  ok: prebuilt $selftest (not rebuilt if it runs there)"
    else note "  not built here: it will be built on the GPU machine"; fi
    return
  fi
  if selftest_runs; then
    printf '%-18s %-16s %5ss  %s\n' selftest-build "SKIPPED(prebuilt)" 0 "$selftest" >>"$out/summary.txt"
    return
  fi
  [ -e "$selftest" ] && echo "run.sh: $selftest does not run here; building it" | tee -a "$out/build.log"
  run_step selftest-build build.log bash -c "$cmd" || return
  selftest="$b/llmcore_cuda_selftest"
}

step_selftest() {
  if [ "$dry" = 1 ]; then
    note "selftest: $selftest --json $out/selftest.json"
    if [ -x "$selftest" ]; then note "  ok: $selftest"
    else note "  not built here (the selftest-build step builds it there): $selftest"; fi
    return
  fi
  if [ ! -x "$selftest" ]; then
    printf '%-18s %-16s %5ss  %s\n' selftest "SKIPPED(not built)" 0 "$selftest" >>"$out/summary.txt"
    return
  fi
  run_step selftest selftest.log "$selftest" --json "$out/selftest.json"
  local rc=$? rest
  # 3: a CUDA error stopped it (its JSON holds what ran); the groups after the one that
  # failed run once more in a fresh process, their JSON appended to the log.
  [ "$rc" -eq 3 ] || return "$rc"
  rest="$(sed -n 's/.*groups not run: \(.*\)$/\1/p' "$out/selftest.log" | tail -1)"
  [ -n "$rest" ] && [ "$rest" != none ] || return "$rc"
  LABEL="selftest(rest)" run_step selftest selftest.log bash -c "
    '$selftest' --only '$rest' --json '$out/selftest-rest.json'; rc=\$?
    cat '$out/selftest-rest.json' 2>/dev/null; rm -f '$out/selftest-rest.json'; exit \$rc"
}

step_selftest_sanitize() {
  if [ "$dry" = 1 ]; then
    note "selftest-sanitize: compute-sanitizer --tool memcheck|racecheck $selftest --reduced --no-time"
    need_tool compute-sanitizer
    return
  fi
  if [ ! -x "$selftest" ]; then
    printf '%-18s %-16s %5ss\n' selftest-sanitize "SKIPPED(not built)" 0 >>"$out/summary.txt"
    return
  fi
  run_step selftest-sanitize selftest.log bash -c "
    $(declare -f sanitizer)
    rc=0
    sanitizer memcheck '$selftest' --reduced --no-time || rc=1
    sanitizer racecheck '$selftest' --reduced --no-time || rc=1
    exit \$rc"
}

step_build() {
  local cmd="LLMCORE_CUDA_ARCHS=90a MAX_JOBS=$nproc_ $py setup.py build_ext --inplace"
  if [ "$dry" = 1 ]; then
    note "build: $cmd"
    need_file setup.py; need_tool nvcc
    grep -q LLMCORE_CUDA_ARCHS setup.py && note "  ok: setup.py reads LLMCORE_CUDA_ARCHS" || {
      note "  MISSING: LLMCORE_CUDA_ARCHS in setup.py"; problems=$((problems + 1)); }
    return
  fi
  local t0; t0=$(date +%s)
  run_step build build.log env LLMCORE_CUDA_ARCHS=90a MAX_JOBS="$nproc_" \
    "$py" setup.py build_ext --inplace
  local rc=$?
  echo "build_seconds=$(( $(date +%s) - t0 )) jobs=$nproc_ archs=90a rc=$rc" | tee -a "$out/build.log" \
    >>"$out/summary.txt"
  return "$rc"
}

step_pytest() {
  if [ "$dry" = 1 ]; then
    note "pytest: $py -m pytest -m cuda -x -q -p no:cacheprovider"
    need_file pyproject.toml
    grep -q '"cuda:' pyproject.toml && note "  ok: the cuda marker is declared" || {
      note "  MISSING: the cuda marker in pyproject.toml"; problems=$((problems + 1)); }
    return
  fi
  run_step pytest pytest.log env PYTHONUNBUFFERED=1 "$py" -m pytest -m cuda -x -q -p no:cacheprovider
}

step_sanitize() {
  local prog=benchmarks/gpu/sanitize_cases.py
  if [ "$dry" = 1 ]; then
    note "sanitize: compute-sanitizer --tool memcheck $py $prog (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
    note "sanitize: compute-sanitizer --tool racecheck $py $prog"
    need_file "$prog"; need_tool compute-sanitizer
    "$py" "$prog" --list >/dev/null 2>&1 && note "  ok: $prog --list" || {
      note "  FAILED: $py $prog --list"; problems=$((problems + 1)); }
    return
  fi
  run_step sanitize sanitizer.log bash -c "
    $(declare -f sanitizer)
    rc=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitizer memcheck $py $prog || rc=1
    sanitizer racecheck $py $prog || rc=1
    exit \$rc"
}

step_bench() {
  local scratch="${TMPDIR:-/tmp}/llmcore-gpu-bench.$$"
  if [ "$dry" = 1 ]; then
    local known
    known="$("$py" -m llmcore.cli bench --list 2>/dev/null)"
    for s in $BENCH_SUITES; do
      note "bench: $py -m llmcore.cli bench $s --device cuda --quick --no-progress --no-plot --out $scratch; tar -rf $out/bench.tar"
      if grep -qx "$s" <<<"$known"; then note "  ok: suite $s"
      else note "  UNKNOWN suite: $s"; problems=$((problems + 1)); fi
    done
    return
  fi
  local rc=0
  for s in $BENCH_SUITES; do
    mkdir -p "$scratch"
    LABEL="bench:$s" run_step bench bench.log env PYTHONUNBUFFERED=1 "$py" -m llmcore.cli bench "$s" --device cuda \
      --quick --no-progress --no-plot --out "$scratch" || rc=1
    (cd "$scratch" && find . -type f -name '*.json' | tar -rf "$out/bench.tar" -T -) || rc=1
    rm -rf "$scratch"
  done
  return "$rc"
}

# ---- main -------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
  note "dry run: output folder would be $out; steps: $STEPS; budget ${budget}s"
else
  mkdir -p "$out" || exit 2
  echo "llmcore GPU run: steps $STEPS" >"$out/summary.txt"
  note "output folder: $out"
fi
for step in $STEPS; do
  case "$step" in
    env) step_env ;;
    selftest-build) step_selftest_build ;;
    selftest) step_selftest ;;
    selftest-sanitize) step_selftest_sanitize ;;
    build) step_build || { note "build failed: the torch steps would test a stale extension; stopping"; break; } ;;
    pytest) step_pytest ;;
    sanitize) step_sanitize ;;
    bench) step_bench ;;
    *) note "unknown step $step (known: $ALL_STEPS)"; problems=$((problems + 1)) ;;
  esac
done
if [ "$dry" = 1 ]; then
  note "dry run done: $problems problem(s)"
  [ "$problems" -eq 0 ] || exit 1
  exit 0
fi
echo "--- summary ($out/summary.txt) ---"
cat "$out/summary.txt"
