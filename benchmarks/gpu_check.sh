#!/usr/bin/env bash
# GPU check, in stages sized for a lent GPU machine, run from the repository root:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--list]      results under $OUT (default ./gpu_out)
#
# A lease is about 15 minutes of device time in all (machine start-up included, a minute or
# two), at most 10 minutes per command. Plan: a first command with stages A-D (at most 7
# minutes), a second with E-G (at most 4); H only when time remains. Stages run in the
# order below (their order of value), each under coreutils `timeout`, never stopping at a
# failure; after EVERY step everything so far is packed into $OUT, so a command cut off by
# its timeout or a killed machine keeps every finished step:
#
#   $OUT/results.tar.gz  gpu_check/: summary.json, env.json, info.txt/json, nvidia-smi.txt,
#                        logs/<stage>_<step>.log, junit/<stage>_<step>.xml (pytest --junitxml),
#                        smoke/ (stage C's tiny e2e JSON), results/<device>/ (benchmark JSON/MD:
#                        copy into benchmarks/results/ to commit), plan.tsv, steps.tsv
#   $OUT/summary.json    every stage A-H: status (ok / failed / timeout / skipped; "running" or
#                        "pending" in a summary written before the run ended), rc, seconds,
#                        its steps (junit counts and failed test ids), and the environment
#                        (torch, CUDA, triton, python, GPU, nvcc, driver, date)
#   $OUT/gpu_check.log   this script's log (each step's last lines)
#   $OUT/running.log     only while a step runs (or if the run was cut off): its output so far
#
# Stages (expected times on the H200 are ESTIMATES, not measurements: no GPU has run this
# yet; the build took 71 s on this project's 2-core CPU machine; the dry run takes 50-65 s there):
#
#   stage  what                                                      expected (est.)  timeout
#   A      offline install + build for sm_90 (pip --no-index          40-90 s         300 s
#          --no-build-isolation --no-deps -e ., IPFM_FAST_BUILD_CUDA=1
#          IPFM_FAST_CUDA_ARCHS=90), `python3 -m ipfm_fast info`, a
#          check that _C has CUDA for sm_90 and sees the GPU. Seconds
#          when an up-to-date build of this checkout is installed.
#   B      op correctness, every op and backend: tests/test_perturb,   90-210 s        300 s
#          test_losses, test_field_target, test_launch*, test_gpu_tiles*,
#          test_build (not the wheel test) (globbed: new files are picked
#          up; not test_hopper_compile: a CPU-only sweep CI runs);
#          torch.compile tests excluded (-> H); then the property tests
#          (tests/test_properties.py, CI's example counts) on the CUDA
#          tensors' backends (est. 20-60 s); then tests/test_large.py
#          (`slow`: past 2^31 elements, 9-13 GiB each) on the cuda and
#          triton backends, last (est. 30-60 s)
#   C      training loop on the GPU: -m gpu over the other tests       70-170 s        220 s
#          (sync-debug "error" mode, CUDA graph vs eager, bf16 resume;
#          compile_mode=on variants -> H, but the bf16 distill test
#          compiles its tiny MLP: `ipfm-fast distill`'s CUDA default),
#          then memory flat over 10k op iterations on CUDA (allocated
#          and RSS: tests/test_health.py, est. 10-20 s), then e2e.py
#          smoke runs on a tiny U-Net: eager, --cuda-graph
#   D      op benchmarks (benchmarks/bench_*.py) without the           60-120 s        180 s
#          torch.compile providers -> results/<device>/<op>.json/.md
#          (bench_compat.py: ipfm_fast.compat at the PFGM++ / SiD call
#          sites -> results/<device>/compat_*.json)
#   E      e2e.py at CIFAR-10 size, eager (--compile off): 3x32x32,    40-80 s         150 s
#          U-Net width 128, depth 3, mults 1 2 2 2, batch 256,
#          3 rounds x 8 iterations -> distill_step_eager.json
#   F      the same with --cuda-graph -> distill_step_graph.json       40-80 s         150 s
#   G      profile_step.py at that size (eager) -> distill_profile.*   20-60 s         120 s
#   H      compiled variants (cold Inductor compiles): the -m gpu       4-10 min        540 s
#          compile_mode=on tests; the ops' torch.compile tests; e2e.py
#          --compile on -> distill_step.json; the 2,000-iteration
#          distillation's memory and recompiles (tests/test_health.py); op benchmarks of the
#          torch.compile providers (merged into D's JSON when present);
#          e2e --compile on --cuda-graph -> distill_step_graph_compiled.json
#
# Commands for a session with a GPU (device tool `run`; a fresh machine each time, so
# every command starts with A, which STAGES adds by itself):
#   1. STAGES="A B C D" BUDGET_S=400 bash benchmarks/gpu_check.sh      timeout_s=420
#   2. STAGES="E F G"   BUDGET_S=225 bash benchmarks/gpu_check.sh      timeout_s=240
#   3. (time left)  STAGES="H" BUDGET_S=<left - 20> bash benchmarks/gpu_check.sh
# The estimates of A-D add up to 260-590 s: BUDGET_S keeps command 1 at 400 s whatever they
# turn out to be, cutting the last steps (summary.json marks them timeout or skipped, with
# the reason); put a cut stage first in the next command (e.g. STAGES="D E F G").
# Called again at once (within the 30 s the machine stays warm) stage A finds the build
# in place and takes a few seconds.
#
# Environment:
#   OUT          results folder (default ./gpu_out)
#   STAGES       stages to run (default all: "A B C D E F G H"); any of B-H brings A along
#                (SKIP_A=1: don't)
#   BUDGET_S     seconds this command may take in all: a step is cut to what is left minus
#                RESERVE_S (default 15) and not started with under MIN_START_S (default 20)
#                left, so the script ends, packed, before the device tool's timeout_s
#   TIMEOUT_A .. TIMEOUT_H   one stage's timeout in seconds (defaults in the table)
#   PYTHON       interpreter (default python3)
#   WHEELS       folder of wheels installed first, offline (--no-index --no-deps)
#   FORCE_BUILD=1  rebuild even when an up-to-date build is installed
#   E2E_BATCH (256) E2E_ROUNDS (3) E2E_ITERS (8) E2E_WARMUP (3) PROFILE_ITERS (5)
#   PYTEST_TEST_TIMEOUT (150 s per test, where pytest-timeout is installed; H: PYTEST_TEST_TIMEOUT_H,
#                400 s)  PYTEST_WORKERS (pytest-xdist -n N; default off)
#   GPU_CHECK_RESULTS  where benchmarks write (default benchmarks/results; the dry run: a
#                temporary folder, so the committed CPU results stay untouched)
#
# --dry-run: the same stages and files on a CPU-only machine with tiny sizes: no install
# (stage A checks the current interpreter's build), a handful of quick tests per pytest
# step (CUDA-only tests are skipped by pytest), benchmarks with one round, e2e/profile on
# the CPU with a tiny MLP (F without --cuda-graph, which needs CUDA), H with
# TORCH_COMPILE_DISABLE=1 (the compiled code paths' plumbing without compiling).
set -uo pipefail

STAGE_ORDER="A B C D E F G H"
declare -A TITLE=(
  [A]="offline install, build for sm_90, ipfm-fast info"
  [B]="op correctness tests, every op and backend"
  [C]="training-loop GPU tests (-m gpu), e2e smoke"
  [D]="op benchmarks without torch.compile providers"
  [E]="e2e distillation step, CIFAR-10 size, eager"
  [F]="e2e distillation step, CIFAR-10 size, --cuda-graph"
  [G]="profile of one iteration, CIFAR-10 size"
  [H]="compiled variants (torch.compile / Inductor)"
)
declare -A EXPECTED=([A]="40-90 s" [B]="90-210 s" [C]="70-170 s" [D]="60-120 s" [E]="40-80 s" [F]="40-80 s"
                     [G]="20-60 s" [H]="4-10 min")
declare -A DEFAULT_TIMEOUT=([A]=300 [B]=300 [C]=220 [D]=180 [E]=150 [F]=150 [G]=120 [H]=540)

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --list) for s in $STAGE_ORDER; do printf '%s  %-52s %-9s %4ss\n' "$s" "${TITLE[$s]}" "${EXPECTED[$s]}" \
              "${DEFAULT_TIMEOUT[$s]}"; done; exit 0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
HELPER="$REPO/benchmarks/gpu_check_stage.py"
RESERVE_S=${RESERVE_S:-15}
MIN_START_S=${MIN_START_S:-20}
BUDGET_S=${BUDGET_S:-}

now_us() { local t=${EPOCHREALTIME:-}; if [ -n "$t" ]; then echo "${t/./}"; else echo "$(date +%s)000000"; fi; }
START_US=$(now_us)
DEADLINE_US=""
[ -n "$BUDGET_S" ] && DEADLINE_US=$((START_US + BUDGET_S * 1000000))

# stage selection: canonical order; A comes along with any later stage
REQ=" ${STAGES:-$STAGE_ORDER} "
if [[ "$REQ" != *" A "* && "${SKIP_A:-0}" != 1 ]]; then
  for s in B C D E F G H; do [[ "$REQ" == *" $s "* ]] && { REQ=" A$REQ"; break; }; done
fi
selected() { [[ "$REQ" == *" $1 "* ]]; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PACK="$WORK/gpu_check"
mkdir -p "$PACK/logs" "$PACK/junit" "$PACK/smoke"
LOG="$OUT/gpu_check.log"
: >"$LOG"
rm -f "$OUT/running.log" "$OUT/results.tar.gz.part" "$OUT/summary.json.part"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

declare -A STAGE_TIMEOUT
for s in $STAGE_ORDER; do
  v="TIMEOUT_$s"; STAGE_TIMEOUT[$s]=${!v:-${DEFAULT_TIMEOUT[$s]}}
  printf '%s\t%s\t%s\t%s\t%s\n' "$s" "${TITLE[$s]}" "${EXPECTED[$s]}" "${STAGE_TIMEOUT[$s]}" \
    "$(selected "$s" && echo 1 || echo 0)" >>"$WORK/plan.tsv"
done
: >"$WORK/steps.tsv"
"$PYTHON" - "$WORK/meta.json" "$DRY" "$REQ" "${BUDGET_S:-}" "$OUT" <<'EOF'
import datetime, json, sys
path, dry, req, budget, out = sys.argv[1:]
json.dump({"dry_run": dry == "1", "stages_requested": req.split(), "budget_s": int(budget) if budget else None,
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "out": out},
          open(path, "w"), indent=2)
EOF

# ---------------------------------------------------------------- environment
if [ "$DRY" = 1 ]; then
  RESULTS_ROOT=${GPU_CHECK_RESULTS:-$PACK/results}
else
  RESULTS_ROOT=${GPU_CHECK_RESULTS:-$REPO/benchmarks/results}
fi
mkdir -p "$RESULTS_ROOT"
RESULTS_ROOT=$(cd "$RESULTS_ROOT" && pwd)
SLUG=$("$PYTHON" "$HELPER" env "$PACK/env.json" 2>"$PACK/logs/env.err") || SLUG=unknown-device
SLUG=${SLUG:-unknown-device}
RES="$RESULTS_ROOT/$SLUG"
mkdir -p "$RES"
{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } >"$PACK/nvidia-smi.txt"
log "gpu_check$([ "$DRY" = 1 ] && echo ' --dry-run'): stages${REQ% }, results -> $OUT, device folder $SLUG"
head -1 "$PACK/nvidia-smi.txt" >>"$LOG"

PYTEST_ARGS=(-q -p no:cacheprovider -p gpu_check_stage -ra --tb=short)
TEST_TIMEOUT=(); TEST_TIMEOUT_H=()
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then  # one hung test does not eat the stage
  TEST_TIMEOUT=(--timeout="${PYTEST_TEST_TIMEOUT:-150}"); TEST_TIMEOUT_H=(--timeout="${PYTEST_TEST_TIMEOUT_H:-400}")
fi
if [ -n "${PYTEST_WORKERS:-}" ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
  PYTEST_ARGS+=(-n "$PYTEST_WORKERS")
fi
export PYTHONPATH="$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # -p gpu_check_stage

# ---------------------------------------------------------------- packing
pack() {
  local final=${1:-}
  "$PYTHON" "$HELPER" summary "$WORK" "$OUT/summary.json" $final >>"$LOG" 2>&1
  cp -f "$OUT/summary.json" "$PACK/summary.json" 2>/dev/null
  cp -f "$LOG" "$PACK/gpu_check.log" 2>/dev/null
  cp -f "$WORK/plan.tsv" "$WORK/steps.tsv" "$PACK/" 2>/dev/null
  if [ "$RES" != "$PACK/results/$SLUG" ] && [ -d "$RES" ]; then
    rm -rf "$PACK/results" && mkdir -p "$PACK/results" && cp -r "$RES" "$PACK/results/"
  fi
  tar -czf "$OUT/results.tar.gz.part" -C "$WORK" gpu_check && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

# ---------------------------------------------------------------- steps
STAGE=""
STAGE_DEADLINE_US=0

record() {  # stage step status rc seconds timeout log junit note
  local IFS=$'\t'
  echo "$*" | tr -d '\n' >>"$WORK/steps.tsv"
  echo >>"$WORK/steps.tsv"
}

# note_step STEP STATUS NOTE: a step that runs nothing (skipped, or done already)
note_step() {
  record "$STAGE" "$1" "$2" "$([ "$2" = ok ] && echo 0)" 0 "" "" "" "$3"
  log "$STAGE/$1: $2 ($3)"
  STEP_NOTE=""
  pack
}

# run_step STEP JUNIT_NAME|- cmd...: runs cmd under timeout, records and packs
run_step() {
  local step=$1 junit=$2; shift 2
  local now limit_us why=stage
  now=$(now_us)
  limit_us=$((STAGE_DEADLINE_US - now))
  if [ -n "$DEADLINE_US" ]; then
    local left=$((DEADLINE_US - RESERVE_S * 1000000 - now))
    if [ "$left" -lt "$limit_us" ]; then
      limit_us=$left; why=budget
      if [ "$left" -lt $((MIN_START_S * 1000000)) ]; then
        note_step "$step" skipped "no time left in BUDGET_S=$BUDGET_S"
        return 0
      fi
    fi
  fi
  local limit=$(((limit_us + 999999) / 1000000))
  if [ "$limit_us" -le 0 ]; then
    note_step "$step" skipped "no time left in the stage's timeout (${STAGE_TIMEOUT[$STAGE]} s)"
    return 0
  fi
  local logrel="logs/${STAGE}_${step}.log" junitrel=""
  local cmd=("$@")
  if [ "$junit" != - ]; then junitrel="junit/${STAGE}_${step}.xml"; cmd+=("--junitxml=$PACK/$junitrel"); fi
  printf '%s\t%s\t%s\t%s\n' "$STAGE" "$step" "$(date -u +%FT%TZ)" "$limit" >"$WORK/current"
  pack
  log "$STAGE/$step: start (timeout ${limit} s, by the ${why}): ${cmd[*]}"
  local t0 t1 rc
  t0=$(now_us)
  { echo "\$ ${cmd[*]}"; echo "# timeout ${limit} s; $(date -u +%FT%TZ)"; } >"$OUT/running.log"
  timeout -s TERM -k 20 "$limit" "${cmd[@]}" >>"$OUT/running.log" 2>&1 </dev/null
  rc=$?
  t1=$(now_us)
  local secs elapsed_s status note=${STEP_NOTE:-}
  secs=$(awk "BEGIN{printf \"%.1f\", ($t1 - $t0) / 1e6}")
  elapsed_s=$(((t1 - t0) / 1000000))
  if [ "$rc" = 0 ]; then status=ok
  elif [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ "$elapsed_s" -ge "$limit" ]; }; then
    status=timeout; note="${note:+$note; }killed by its ${limit} s timeout (${why})"
  elif [ "$rc" = 5 ] && [ "$junit" != - ]; then status=ok; note="${note:+$note; }no tests selected"
  else status=failed
  fi
  mv -f "$OUT/running.log" "$PACK/$logrel"
  rm -f "$WORK/current"
  record "$STAGE" "$step" "$status" "$rc" "$secs" "$limit" "$logrel" "$junitrel" "$note"
  log "$STAGE/$step: $status (rc $rc, $secs s)${note:+ [$note]}"
  tail -n "${TAIL_LINES:-12}" "$PACK/$logrel" | sed 's/^/   | /' | tee -a "$LOG"
  STEP_NOTE=""
  pack
  [ "$status" = ok ]
}

begin_stage() {
  STAGE=$1
  STAGE_DEADLINE_US=$(($(now_us) + ${STAGE_TIMEOUT[$STAGE]} * 1000000))
  log "stage $STAGE: ${TITLE[$STAGE]} (expected ${EXPECTED[$STAGE]}, timeout ${STAGE_TIMEOUT[$STAGE]} s)"
}

# ---------------------------------------------------------------- what the stages run
shopt -s nullglob
OP_TESTS=(tests/test_perturb.py tests/test_losses.py tests/test_field_target.py tests/test_launch*.py
          tests/test_gpu_tiles*.py tests/test_build.py)
shopt -u nullglob
IGNORE_OP_TESTS=()
for f in "${OP_TESTS[@]}"; do IGNORE_OP_TESTS+=("--ignore=$f"); done
WHEEL_TEST=tests/test_build.py::test_wheel_contains_kernels_and_extension

if [ "$DRY" = 1 ]; then
  # a handful of quick tests per pytest step; CUDA-only tests are skipped by pytest
  K_OPS=(-k "sigma_r_conversions or philox_known_answers or bad_backend or auto_and_reference_backends or extension_reports or generator_on_another_device")
  K_LOOP=()                                  # -m gpu: all skipped without a GPU
  K_BENCH=(-k "(test_perturb and cifar10) or (test_losses and 256 and fake and forward and off) or (test_field_target and train and off) or (test_compat_sid_losses and inf and cifar10)")
  K_BENCH_COMPILED=(-k "test_perturb and cifar10")
  K_OPS_COMPILED=(--collect-only)
  K_LARGE=(--collect-only)                   # the GPU backends' tests: none without a GPU
  K_PROPS=(--collect-only)
  K_HEALTH_OPS=(--collect-only)
  K_HEALTH_DISTILL=(--collect-only)
  export IPFM_BENCH_ROUNDS=1
  NET=(--device cpu --arch mlp --shape 1 8 8 --width 16 --depth 1 --threads 1)
  SMOKE=("${NET[@]}")
  E2E_ARGS=(--batch 16 --rounds 1 --iters 1 --warmup 1)
  GRAPH_FLAG=()
  PROFILE_ARGS=(--batch 16 --iters 1 --warmup 1)
  COMPILED_ENV=(env TORCH_COMPILE_DISABLE=1)
else
  K_OPS=(); K_LOOP=(); K_BENCH=(); K_BENCH_COMPILED=(); K_OPS_COMPILED=()
  K_LARGE=(-k "cuda-")                       # the cpu backend's 2^31 elements take minutes
  K_PROPS=(-m "not slow" -k "cuda-")         # CI runs the CPU tensors' backends
  K_HEALTH_OPS=(-k "test_memory_flat_over_10k_op_iterations and cuda-")
  K_HEALTH_DISTILL=(-k "test_distill_2000_iterations")
  NET=(--device cuda --arch unet --shape 3 32 32 --width 128 --depth 3 --mults 1 2 2 2)
  SMOKE=(--device cuda --arch unet --shape 3 16 16 --width 16)
  E2E_ARGS=(--batch "${E2E_BATCH:-256}" --rounds "${E2E_ROUNDS:-3}" --iters "${E2E_ITERS:-8}"
            --warmup "${E2E_WARMUP:-3}")
  GRAPH_FLAG=(--cuda-graph)
  PROFILE_ARGS=(--batch "${E2E_BATCH:-256}" --iters "${PROFILE_ITERS:-5}" --warmup "${E2E_WARMUP:-3}")
  COMPILED_ENV=()
fi
PYTEST=("$PYTHON" -m pytest "${PYTEST_ARGS[@]}" "${TEST_TIMEOUT[@]}")
PYTEST_H=("$PYTHON" -m pytest "${PYTEST_ARGS[@]}" "${TEST_TIMEOUT_H[@]}")  # cold Inductor compiles

stage_A() {
  if [ -n "${WHEELS:-}" ] && [ "$DRY" != 1 ]; then
    run_step wheels - "$PYTHON" -m pip install --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
  fi
  if [ "$DRY" = 1 ]; then
    note_step install ok "dry run: skipped install, $PYTHON used as it is"
  elif [ "${FORCE_BUILD:-0}" != 1 ] && why=$("$PYTHON" "$HELPER" built "$REPO" 2>/dev/null); then
    note_step install ok "already installed and built: $why"
  else
    run_step install - env IPFM_FAST_BUILD_CUDA=1 IPFM_FAST_CUDA_ARCHS=90 MAX_JOBS="$(nproc)" \
      "$PYTHON" -m pip install -v --no-index --no-build-isolation --no-deps -e .
  fi
  run_step info - "$PYTHON" -m ipfm_fast info
  cp -f "$PACK/logs/A_info.log" "$PACK/info.txt" 2>/dev/null
  run_step check - "$PYTHON" "$HELPER" check "$PACK/info.json" $([ "$DRY" = 1 ] && echo --dry-run)
}

stage_B() {
  GPU_CHECK_COMPILED=exclude run_step tests junit "${PYTEST[@]}" "${OP_TESTS[@]}" --deselect "$WHEEL_TEST" \
    "${K_OPS[@]}"
  run_step tests_properties junit "${PYTEST[@]}" tests/test_properties.py "${K_PROPS[@]}"
  run_step tests_large junit "${PYTEST[@]}" tests/test_large.py "${K_LARGE[@]}"
}

stage_C() {
  GPU_CHECK_COMPILED=exclude run_step tests junit "${PYTEST[@]}" -m gpu tests "${IGNORE_OP_TESTS[@]}" "${K_LOOP[@]}"
  run_step health_ops junit "${PYTEST[@]}" tests/test_health.py "${K_HEALTH_OPS[@]}"
  run_step e2e_smoke - "$PYTHON" benchmarks/e2e.py "${SMOKE[@]}" --batch 32 --compile off --rounds 1 --iters 2 \
    --warmup 1 --out "$PACK/smoke/distill_step_eager.json"
  if [ "$DRY" = 1 ]; then
    note_step e2e_graph_smoke ok "dry run: --cuda-graph needs CUDA (the eager smoke run covers the plumbing)"
  else
    run_step e2e_graph_smoke - "$PYTHON" benchmarks/e2e.py "${SMOKE[@]}" --batch 32 --compile off --rounds 1 \
      --iters 2 --warmup 4 "${GRAPH_FLAG[@]}" --out "$PACK/smoke/distill_step_graph.json"
  fi
}

stage_D() {
  GPU_CHECK_COMPILED=exclude IPFM_BENCH_RESULTS_DIR="$RESULTS_ROOT" run_step bench junit "${PYTEST[@]}" \
    benchmarks "${K_BENCH[@]}"
}

stage_E() {
  run_step e2e_eager - "$PYTHON" benchmarks/e2e.py "${NET[@]}" "${E2E_ARGS[@]}" --compile off \
    --out "$RES/distill_step_eager.json"
}

stage_F() {
  [ "$DRY" = 1 ] && STEP_NOTE="dry run: --cuda-graph needs CUDA, ran eager"
  run_step e2e_graph - "$PYTHON" benchmarks/e2e.py "${NET[@]}" "${E2E_ARGS[@]}" --compile off "${GRAPH_FLAG[@]}" \
    --warmup "${E2E_GRAPH_WARMUP:-4}" --out "$RES/distill_step_graph.json"
}

stage_G() {
  run_step profile - "$PYTHON" benchmarks/profile_step.py "${NET[@]}" "${PROFILE_ARGS[@]}" --compile off \
    --out "$RES/distill_profile.json"
}

stage_H() {
  GPU_CHECK_COMPILED=only run_step tests_loop junit "${COMPILED_ENV[@]}" "${PYTEST_H[@]}" -m gpu tests \
    "${IGNORE_OP_TESTS[@]}" "${K_LOOP[@]}"
  [ "$DRY" = 1 ] && STEP_NOTE="dry run: collected only (torch.compile tests need a compiler)"
  GPU_CHECK_COMPILED=only run_step tests_ops junit "${PYTEST_H[@]}" "${OP_TESTS[@]}" --deselect "$WHEEL_TEST" \
    "${K_OPS_COMPILED[@]}"
  [ "$DRY" = 1 ] && STEP_NOTE="dry run: TORCH_COMPILE_DISABLE=1"
  run_step e2e_compiled - "${COMPILED_ENV[@]}" "$PYTHON" benchmarks/e2e.py "${NET[@]}" "${E2E_ARGS[@]}" \
    --compile on --out "$RES/distill_step.json"
  run_step health_distill junit "${PYTEST_H[@]}" tests/test_health.py "${K_HEALTH_DISTILL[@]}"
  [ "$DRY" = 1 ] && STEP_NOTE="dry run: TORCH_COMPILE_DISABLE=1"
  GPU_CHECK_COMPILED=only IPFM_BENCH_RESULTS_DIR="$RESULTS_ROOT" run_step bench junit "${COMPILED_ENV[@]}" \
    "${PYTEST_H[@]}" benchmarks "${K_BENCH_COMPILED[@]}"
  if [ "$DRY" = 1 ]; then
    note_step e2e_graph_compiled ok "dry run: --cuda-graph needs CUDA (e2e_compiled covers the plumbing)"
  else
    run_step e2e_graph_compiled - "$PYTHON" benchmarks/e2e.py "${NET[@]}" "${E2E_ARGS[@]}" --compile on \
      "${GRAPH_FLAG[@]}" --warmup "${E2E_GRAPH_WARMUP:-4}" --out "$RES/distill_step_graph_compiled.json"
  fi
}

# ---------------------------------------------------------------- run
on_signal() {  # the command itself was stopped: the step in flight counts as timed out
  trap - INT TERM
  if [ -f "$WORK/current" ]; then
    local stage step
    IFS=$'\t' read -r stage step _ <"$WORK/current"
    [ -f "$OUT/running.log" ] && mv -f "$OUT/running.log" "$PACK/logs/${stage}_${step}.log"
    record "$stage" "$step" timeout 143 0 "" "logs/${stage}_${step}.log" "" "the whole command was stopped by a signal"
    rm -f "$WORK/current"
  fi
  log "stopped by a signal"
  pack --final
  rm -rf "$WORK"
  exit 143
}
trap on_signal INT TERM
pack
for s in $STAGE_ORDER; do
  selected "$s" || continue
  begin_stage "$s"
  "stage_$s"
done
pack --final
"$PYTHON" "$HELPER" table "$OUT/summary.json" | tee -a "$LOG"
cp -f "$LOG" "$PACK/gpu_check.log" && tar -czf "$OUT/results.tar.gz.part" -C "$WORK" gpu_check \
  && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
echo "results: $(ls "$OUT" | tr '\n' ' ')(in $OUT)"
ok=$("$PYTHON" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['ok']))" "$OUT/summary.json")
rm -rf "$WORK"
[ "$ok" = 1 ]
