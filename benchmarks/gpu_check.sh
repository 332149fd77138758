#!/usr/bin/env bash
# gpu_check.sh - every CUDA test, then short GPU benchmarks, in one bounded run (`make gpu-check`).
#
# On the GPU machine (no package registry; see shared/device/README.md), through the offline kit:
#     bash .devkit/on-device.sh bash benchmarks/gpu_check.sh
# (carry .devkit; the runner puts the kit and the checkout on PYTHONPATH and writes $OUT/kit-env.txt).
# Anywhere else with a ready interpreter:  make gpu-check PY=python3   (installs nothing)
#
# It uses $PY (default python3) as it is: no venv, no pip.  Steps:
#   1. tests: each tests/test_*.py in its own pytest process (an import error in one file cannot hide the
#      others), `-m "gpu or on_device" --device $DEVICE`: the gpu-marked tests and every test that uses
#      the `device` fixture (tests/conftest.py marks those on_device), several files at a time;
#   2. benchmarks: the BENCHES list below, one after the other, each under its own `timeout`.
# A global deadline (GPU_CHECK_BUDGET_S, default 480 s = 8 min) bounds the whole run: the tests get at
# most GPU_CHECK_TEST_SHARE percent of it, each benchmark at most its own cap, and a step with too
# little time left is skipped with a message.  Results, at most 5 files under $OUT (default out/gpu;
# the device tool brings back 8 at most, the kit's runner adds kit-env.txt):
#   tests.log     every test file's pytest output, one after the other
#   bench.log     every benchmark's output
#   results.json  the JSON the benchmarks wrote, by step name
#   summary.txt   written last (and refreshed after each step): each step's status, exit code, seconds,
#                 and the pytest summary lines
# Exit status: 1 when a step failed or timed out; else 3 when a test file or benchmark was skipped for
# lack of time (incomplete); else 0.  Benchmarks skipped because there is no CUDA GPU do not count.
#
# Environment: PY (interpreter), OUT, GPU_CHECK_DEVICE (default cuda; "cpu" runs the same steps on the
# CPU, a dry run of the commands), GPU_CHECK_BUDGET_S, GPU_CHECK_TEST_SHARE (default 55),
# GPU_CHECK_JOBS (test files at a time, default min(4, cores)), GPU_CHECK_TESTS (default tests/test_*.py),
# GPU_CHECK_BENCHES (names from BENCHES to run, default all; "none": no benchmarks).
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-python3}"
OUT="${OUT:-out/gpu}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
TEST_SHARE="${GPU_CHECK_TEST_SHARE:-55}"
cores="$(nproc 2>/dev/null || echo 2)"
JOBS="${GPU_CHECK_JOBS:-$(( cores < 4 ? cores : 4 ))}"
MIN_STEP_S=15      # a step that would get less than this is skipped
RESERVE_S=10       # kept for writing the summary at the end

mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT"; exit 2; }
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
TESTS_LOG="$OUT/tests.log"
BENCH_LOG="$OUT/bench.log"
RESULTS="$OUT/results.json"
SUMMARY="$OUT/summary.txt"
: > "$TESTS_LOG"
: > "$BENCH_LOG"
START=$SECONDS
DEADLINE=$(( START + BUDGET ))
TEST_DEADLINE=$(( START + BUDGET * TEST_SHARE / 100 ))

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: interpreter '$PY' not found (set PY=python3, or run 'make setup' for the venv)" | tee "$SUMMARY"
  exit 2
fi

# ---------------------------------------------------------------------------------------------------
# Benchmarks: "name|cap in seconds|command" (the command runs with bash -c; $PY, $DEVICE and $SCRATCH
# are expanded here).  A command that writes JSON should write it to $SCRATCH/<name>.json: it ends up
# in results.json under <name>.  Add new benchmarks HERE.
# device_stage: the split pipeline's device stage alone (target >= 20,000 patches/s on an H200);
# engine_bench: `degrade bench` with --pipeline split (auto's choice on CUDA) on every core, the codec
# limit of the same host, the busy fractions, delivered to 1 and 2 clients.
BENCHES=(
  "grl_speed|120|$PY -m benchmarks.grl_speed --device $DEVICE --steps 10 --warmup 3 --precisions fp32,bf16"
  "nvcodec_speed|150|$PY -m benchmarks.nvcodec_speed --batches 2 --json $SCRATCH/nvcodec_speed.json"
  "device_stage|90|$PY -m benchmarks.device_stage --device $DEVICE --batches 8 --runs 3"
  "engine_bench|200|$PY -m server bench --device $DEVICE --pipeline split --runs 1 --batches 2 --skip-naive --clients 2 --json $SCRATCH/engine_bench.json"
  "grl_speed_compile|150|$PY -m benchmarks.grl_speed --device $DEVICE --steps 10 --warmup 3 --precisions bf16 --models ours --compile"
)
# ---------------------------------------------------------------------------------------------------

STEPS=()        # "name|status|rc|seconds|note" per step, in order
failed=0
incomplete=0

remaining() { echo $(( DEADLINE - RESERVE_S - SECONDS )); }
min() { if (( $1 < $2 )); then echo "$1"; else echo "$2"; fi; }
is_fail() { case "$1" in ok|skipped|no-cuda-tests) return 1 ;; *) return 0 ;; esac; }
status_of() {  # rc -> status
  case "$1" in
    0) echo ok ;;
    5) echo no-cuda-tests ;;   # pytest: nothing selected in this file
    124|137) echo timeout ;;
    *) echo failed ;;
  esac
}

write_summary() {
  local final="${1:-}"
  {
    echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo '?'))" \
         " device: $DEVICE ($cuda_note)  budget: ${BUDGET}s  elapsed: $(( SECONDS - START ))s  jobs: $JOBS"
    echo
    printf '%-34s %-14s %5s %6s  %s\n' step status rc secs "pytest summary / note"
    local s name status rc secs note
    for s in "${STEPS[@]}"; do
      IFS='|' read -r name status rc secs note <<< "$s"
      printf '%-34s %-14s %5s %6s  %s\n' "$name" "$status" "$rc" "$secs" "$note"
    done
    if [ -s "$SCRATCH/failures.txt" ]; then
      echo
      echo "failed tests (pytest's short summary lines):"
      cat "$SCRATCH/failures.txt"
    fi
    echo
    if [ -n "$final" ]; then
      echo "$final"
    else
      echo "(in progress)"
    fi
  } > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
}

# --- the device ---------------------------------------------------------------------------------------
cuda_note="$("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1 | tail -1)"
have_cuda=0
case "$cuda_note" in *"cuda True"*) have_cuda=1 ;; esac
echo "gpu_check: $PY, torch $cuda_note; device $DEVICE; budget ${BUDGET}s; results in $OUT"

# --- 1. tests, file by file -------------------------------------------------------------------------
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  read -r -a test_files <<< "$GPU_CHECK_TESTS"
else
  test_files=(tests/test_*.py)
fi
declare -A launched=() collected=()

collect_done() {  # append the finished files' logs and record their status
  local f log rc secs last status
  for f in "${!launched[@]}"; do
    [ -n "${collected[$f]:-}" ] && continue
    log="${launched[$f]}"
    [ -f "$log.rc" ] || continue
    read -r rc secs < "$log.rc"
    collected[$f]=1
    status="$(status_of "$rc")"
    # pytest's last line: "3 passed, 2 skipped, 40 deselected in 12.3s" (or the error that stopped it)
    last="$(grep -v '^\s*$' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//' | cut -c1-150)"
    [ "$status" = timeout ] && last="killed after ${secs}s; $last"
    grep -E '^(FAILED|ERROR) ' "$log" | head -n 20 >> "$SCRATCH/failures.txt"
    { echo "===== $f  (exit $rc, ${secs}s) ====="; cat "$log"; echo; } >> "$TESTS_LOG"
    STEPS+=("$f|$status|$rc|$secs|${last//|//}")
    is_fail "$status" && failed=1
    echo "  $f: $status ($last)"
  done
}

run_test_file() {  # file, seconds, log  (in the background)
  local t0=$SECONDS
  timeout -k 10 "$2" "$PY" -m pytest -q -p no:cacheprovider -m "gpu or on_device" --device "$DEVICE" "$1" \
    > "$3" 2>&1
  echo "$? $(( SECONDS - t0 ))" > "$3.rc.tmp" && mv "$3.rc.tmp" "$3.rc"
}

echo "gpu_check: ${#test_files[@]} test files, $JOBS at a time, until +$(( TEST_DEADLINE - START ))s"
i=0
for f in "${test_files[@]}"; do
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; collect_done; done
  collect_done
  left=$(min $(( TEST_DEADLINE - SECONDS )) "$(remaining)")
  if (( left < MIN_STEP_S )); then
    STEPS+=("$f|skipped|-|0|no time left in the test budget (${left}s)")
    echo "  $f: skipped, no time left"
    incomplete=1
    continue
  fi
  i=$(( i + 1 ))
  launched[$f]="$SCRATCH/test$i.log"
  run_test_file "$f" "$left" "$SCRATCH/test$i.log" &
done
wait
collect_done
write_summary

# --- 2. benchmarks, one after the other -----------------------------------------------------------
for b in "${BENCHES[@]}"; do
  IFS='|' read -r name cap cmd <<< "$b"
  if [ -n "${GPU_CHECK_BENCHES:-}" ] && [[ " $GPU_CHECK_BENCHES " != *" $name "* ]]; then
    STEPS+=("bench $name|skipped|-|0|not in GPU_CHECK_BENCHES")
    continue
  fi
  if [ "$DEVICE" != cpu ] && (( ! have_cuda )); then
    STEPS+=("bench $name|skipped|-|0|no CUDA GPU here")
    echo "  bench $name: skipped, no CUDA GPU"
    continue
  fi
  left=$(min "$cap" "$(remaining)")
  if (( left < MIN_STEP_S )); then
    STEPS+=("bench $name|skipped|-|0|no time left (${left}s of the ${BUDGET}s budget)")
    echo "  bench $name: skipped, no time left"
    incomplete=1
    write_summary
    continue
  fi
  echo "===== bench $name (up to ${left}s): $cmd =====" | tee -a "$BENCH_LOG"
  t0=$SECONDS
  timeout -k 10 "$left" bash -c "$cmd" 2>&1 | tee -a "$BENCH_LOG"
  rc=${PIPESTATUS[0]}
  secs=$(( SECONDS - t0 ))
  status="$(status_of "$rc")"
  [ "$status" = no-cuda-tests ] && status=failed  # exit 5 means nothing special for a benchmark
  note="$(grep -v '^\s*$' "$BENCH_LOG" | tail -n 1 | cut -c1-150)"
  [ "$status" = timeout ] && note="killed after ${secs}s (cap ${left}s)"
  echo "----- bench $name: exit $rc, ${secs}s" >> "$BENCH_LOG"
  STEPS+=("bench $name|$status|$rc|$secs|${note//|//}")
  is_fail "$status" && failed=1
  write_summary
done

# --- results.json: what the benchmarks wrote ------------------------------------------------------
"$PY" - "$SCRATCH" "$RESULTS" <<'PY' || echo "gpu_check: could not merge the benchmark JSON" >&2
import json, pathlib, sys
scratch, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {}
for p in sorted(scratch.glob("*.json")):
    try:
        merged[p.stem] = json.loads(p.read_text())
    except ValueError as e:
        merged[p.stem] = {"unreadable": str(e)}
dest.write_text(json.dumps(merged, indent=1))
PY

nfiles=$(find "$OUT" -type f | wc -l)
if (( failed )); then word=FAILED; code=1; elif (( incomplete )); then word="INCOMPLETE (steps skipped for time)"; code=3
else word=ok; code=0; fi
verdict="overall: $word - $(( SECONDS - START ))s of ${BUDGET}s; $nfiles files in $OUT"
(( nfiles > 8 )) && verdict="$verdict (WARNING: more than 8 files, not all will come back)"
write_summary "$verdict"
echo "gpu_check: $verdict"
exit "$code"
