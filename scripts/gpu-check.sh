#!/usr/bin/env bash
# GPU check (docs/gpu.md): what the CPU-only CI cannot run, on a machine with NVIDIA GPUs, in
# under 8 minutes. Run from a checkout whose .venv has a CUDA build of torch and triton
# (make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128):
#
#   scripts/gpu-check.sh                 # OUT=runs/gpu-check/<UTC time>; exit 0 = every check passed
#
#   1. gpu-tests      the gpu-marked tests: compiled Triton kernels and torch._grouped_mm in fp32/bf16
#                     against the float64 reference, torch.library.opcheck of the custom ops on CUDA
#   2. bench-bf16     sparse-train bench moe-layer --device cuda, bf16: Triton, grouped_mm (where the
#      bench-fp32     GPU supports it) and the dense limit; fp32: Triton and the dense limit. Each
#                     backend's output is checked against the reference loop in the record
#   3. train-bf16     sparse-train train configs/tiny-moe.yaml on one GPU in bf16 with the Triton
#                     kernels (the loss must fall)
#      train-grouped_mm  the same with moe.kernel_backend=grouped_mm (where supported); its first
#                     loss must match train-bf16's
#   4. with >= 2 GPUs: ep2, tp2  2-process NCCL runs (sparse-train launch) against one process in
#                     fp32: the losses of the first CMP_STEPS steps within LOSS_RTOL
#
# Every step runs, a failed one does not stop the others; the summary lists each with its
# status, and the exit status is 1 if any failed. No GPU (no nvidia-smi, or torch sees no CUDA
# device): one line and exit status 2.
#
# Settings (environment): OUT, STEPS (1-GPU training steps, 100), CMP_STEPS (compared steps, 5),
# LOSS_RTOL (1e-3: fp32 layouts vs one process), BUDGET_S (480: a step that would start after
# the budget is spent fails as "not run"), BENCH_ARGS (extra bench arguments, e.g. "--tokens 4096"),
# EXTRA_SETS (extra config overrides for every training run, space-separated KEY=VALUE).
# GPU_CHECK_REHEARSAL=cpu runs every step on the CPU instead (gloo, the Triton interpreter, small
# sizes, the torch kernels for training) to test this script on a machine without a GPU; it
# checks nothing about GPUs and says so.
set -uo pipefail # no -e: every step runs and is reported
cd "$(dirname "$0")/.." || exit 2

PY=${PY:-.venv/bin/python}
ST=${ST:-.venv/bin/sparse-train}
OUT=${OUT:-runs/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)}
STEPS=${STEPS:-100}
CMP_STEPS=${CMP_STEPS:-5}
LOSS_RTOL=${LOSS_RTOL:-1e-3}
BUDGET_S=${BUDGET_S:-480}
BENCH_ARGS=${BENCH_ARGS:-}
EXTRA_SETS=${EXTRA_SETS:-}
REHEARSAL=${GPU_CHECK_REHEARSAL:-}

refuse() {
  echo "gpu-check: $1" >&2
  exit 2
}

# ---- which machine is this -------------------------------------------------------------------
if [ -n "$REHEARSAL" ]; then
  [ "$REHEARSAL" = cpu ] || refuse "GPU_CHECK_REHEARSAL must be 'cpu' or unset, got '$REHEARSAL'"
  DEVICE=cpu
  NGPU=${GPU_CHECK_REHEARSAL_NPROC:-2} # processes standing in for GPUs
  export TRITON_INTERPRET=1            # Triton kernels on CPU tensors
  BENCH_BACKENDS=torch,grouped_mm      # the interpreter is too slow to time layer-sized problems ...
  TRAIN_BACKEND=torch                  # ... or to train
  ALLOWED_SKIPS="needs CUDA"
  MIN_GPU_TESTS=0
  BENCH_ARGS="--tokens 256 --repeats 1 --warmup 0 --shapes mixtral-like $BENCH_ARGS"
  STEPS=${GPU_CHECK_REHEARSAL_STEPS:-15}
  EXTRA_SETS="model.n_layers=2 model.max_seq_len=32 data.seq_len=32 train.batch_size=4 train.eval_batches=1
    optimizer.warmup_steps=2 optimizer.lr=1e-2 $EXTRA_SETS"
else
  command -v nvidia-smi >/dev/null 2>&1 || refuse "no nvidia-smi on this machine: it checks NVIDIA GPUs, and there are none here"
  nvidia-smi -L >/dev/null 2>&1 || refuse "nvidia-smi finds no GPU (or no driver): nothing to check"
  [ -x "$PY" ] || refuse "no $PY: install first (make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128)"
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) ||
    refuse "$PY cannot import torch: install first (make venv TORCH_INDEX=...)"
  [ "$NGPU" -ge 1 ] 2>/dev/null || refuse "nvidia-smi sees GPUs but torch does not (a CPU build of torch?): reinstall with TORCH_INDEX"
  DEVICE=cuda
  unset TRITON_INTERPRET # the compiled kernels are the point; tests/conftest.py turns the
  # interpreter on when it sees neither CUDA_VISIBLE_DEVICES nor /dev/nvidiactl (some containers)
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NGPU - 1)))}
  export CUDA_VISIBLE_DEVICES
  BENCH_BACKENDS=triton,grouped_mm
  TRAIN_BACKEND=triton
  ALLOWED_SKIPS="compute capability" # grouped_mm on a GPU older than sm_80: refused, and that is tested
  MIN_GPU_TESTS=1
fi
mkdir -p "$OUT" || refuse "cannot create $OUT"

# ---- bookkeeping ----------------------------------------------------------------------------
NAMES=() STATUS=() NOTES=()
record() { # record NAME PASS|FAIL|SKIP NOTE
  NAMES+=("$1") STATUS+=("$2") NOTES+=("$3")
  printf '%-18s %-4s %s\n' "$1" "$2" "$3"
}

run() { # run NAME CAP_SECONDS CMD... : output to $OUT/NAME.log, killed after the cap or the budget
  local name=$1 cap=$2 left rc
  shift 2
  left=$((BUDGET_S - SECONDS))
  if ((left <= 0)); then
    echo "not run: the ${BUDGET_S}s budget was spent" >"$OUT/$name.log"
    return 125
  fi
  ((cap > left)) && cap=$left
  echo "== $name: $* (up to ${cap}s)" >&2
  timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  ((rc == 124)) && echo "timed out after ${cap}s" >>"$OUT/$name.log"
  return $rc
}

why() { # the last line of a step's log, for the summary
  echo "exit $2: $(grep -v '^\s*$' "$OUT/$1.log" | tail -n 1 | cut -c1-160) (log: $OUT/$1.log)"
}

sets() { # --set KEY=VALUE for each argument and each EXTRA_SETS entry
  local kv
  # shellcheck disable=SC2086 # EXTRA_SETS is a list of words
  for kv in "$@" $EXTRA_SETS; do printf -- '--set\n%s\n' "$kv"; done
}

train_args() { # train_args RUN_DIR STEPS PRECISION KEY=VALUE... : a tiny-moe run, one loss per step
  local dir=$1 steps=$2 precision=$3
  shift 3
  printf '%s\n' train --config configs/tiny-moe.yaml --run-dir "$dir"
  sets "train.device=$DEVICE" "train.precision=$precision" "train.steps=$steps" train.log_every=1 \
    train.eval_every=0 checkpoint.every=0 checkpoint.save_final=false logging.progress=false \
    logging.tensorboard=false logging.plots=false "$@"
}

# ---- checks (python, reading what the commands wrote) ------------------------------------------
check_junit() { # check_junit XML ALLOWED_SKIP_REGEX MIN_PASSED : every test passed or skipped for that reason
  "$PY" - "$@" <<'PY'
import re, sys, xml.etree.ElementTree as ET
cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
passed, bad, allowed = 0, [], 0
for case in cases:
    name = case.get("name")
    outcome = next(iter(case), None)
    if outcome is None:
        passed += 1
    elif outcome.tag == "skipped" and re.search(sys.argv[2], outcome.get("message", "")):
        allowed += 1
    else:
        bad.append(f"{name}: {outcome.tag} {outcome.get('message', '')[:80]}")
if passed < int(sys.argv[3]):
    bad.append("no gpu test ran")
print(f"{passed} passed, {allowed} skipped as expected" + (f"; {len(bad)} not passed: {bad[0]}" if bad else ""))
sys.exit(1 if bad else 0)
PY
}

check_bench() { # check_bench JSONL MAX_DIFF : every shape timed, first backend and dense present, outputs right
  "$PY" - "$@" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
limit = float(sys.argv[2])
problems, notes = [], []
for r in rows:
    timed = [k[5:-3] for k in r if k.startswith("ours_") and k.endswith("_ms") and k != "ours_ms"]
    backends = [r["kernel_backend"], *timed]
    for b in dict.fromkeys(backends):
        ms, diff = r.get(f"ours_{b}_ms", r["ours_ms"] if b == r["kernel_backend"] else None), r.get(f"{b}_max_abs_diff_vs_reference")
        if ms is None:
            err = r.get(f"ours_{b}_error", "no time")
            (notes if "compute capability" in err else problems).append(f"{r['shape']} {b}: {err[:100]}")
        elif diff is None or diff > limit:
            problems.append(f"{r['shape']} {b}: max |ours - reference| = {diff} > {limit}")
    if not r.get("dense_ms"):
        problems.append(f"{r['shape']}: no dense time")
if not rows:
    problems.append("no result")
summary = "; ".join(
    f"{r['shape']} " + " ".join(f"{k[:-3]}={v}" for k, v in r.items() if k.endswith("_ms") and v is not None) for r in rows
)
print((problems[0] + " | " if problems else "") + summary + ("; unsupported: " + notes[0] if notes else ""))
sys.exit(1 if problems else 0)
PY
}

losses() { # losses RUN_DIR : the per-step losses in metrics.jsonl, as a JSON list
  "$PY" -c 'import json,sys; print(json.dumps([r["loss"] for r in map(json.loads, open(sys.argv[1] + "/metrics.jsonl")) if "loss" in r]))' "$1"
}

check_falls() { # check_falls RUN_DIR : finite losses, the last five's mean below the first by 0.5
  "$PY" - "$(losses "$1")" <<'PY'
import json, math, sys
loss = json.loads(sys.argv[1])
ok = len(loss) >= 6 and all(map(math.isfinite, loss)) and sum(loss[-5:]) / 5 < loss[0] - 0.5
print(f"loss {loss[0]:.4f} -> {sum(loss[-5:]) / 5:.4f} (mean of the last 5) over {len(loss)} steps" if loss else "no losses")
sys.exit(0 if ok else 1)
PY
}

check_close() { # check_close RUN_DIR REFERENCE_DIR STEPS RTOL : the first STEPS losses agree
  "$PY" - "$(losses "$1")" "$(losses "$2")" "$3" "$4" <<'PY'
import json, sys
got, want, n, rtol = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if len(got) < n or len(want) < n:
    print(f"{len(got)} and {len(want)} losses, {n} needed"); sys.exit(1)
rel = [abs(a - b) / abs(b) for a, b in zip(got[:n], want[:n])]
worst = max(range(n), key=rel.__getitem__)
print(f"max relative difference {rel[worst]:.2e} at step {worst + 1} ({got[worst]:.6f} vs {want[worst]:.6f}), tolerance {rtol:g}")
sys.exit(0 if rel[worst] <= rtol else 1)
PY
}

check_grouped_mm_run() { # the loss falls, and step 1's (before any update: the two kernels on the
  local close falls       # same weights and batch) is the train-bf16 run's to bf16 precision
  close=$(check_close "$OUT/train-grouped_mm" "$OUT/train-bf16" 1 2e-2) || {
    echo "first loss vs train-bf16: $close"
    return 1
  }
  falls=$(check_falls "$OUT/train-grouped_mm") || {
    echo "$falls"
    return 1
  }
  echo "$falls; first loss vs train-bf16: $close"
}

step_passes() { # step_passes NAME RC CHECK-CMD... : record PASS/FAIL from the command's status and the check
  local name=$1 rc=$2 note
  shift 2
  if ((rc != 0)); then
    record "$name" FAIL "$(why "$name" "$rc")"
    return 1
  fi
  if note=$("$@" 2>&1); then
    record "$name" PASS "$note"
  else
    record "$name" FAIL "$note"
    return 1
  fi
}

# ---- 1. gpu-marked tests ----------------------------------------------------------------------
echo "gpu-check: $NGPU ${DEVICE} device(s)$([ -n "$REHEARSAL" ] && echo ' (REHEARSAL on CPU)'); output in $OUT" >&2
[ -z "$REHEARSAL" ] && nvidia-smi -L >"$OUT/gpus.txt" 2>&1
"$ST" info >"$OUT/info.json" 2>&1

run gpu-tests 300 "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
rc=$?
if [ -f "$OUT/gpu-tests.xml" ]; then # pytest finished: which tests failed or were skipped is in the XML
  step_passes gpu-tests 0 check_junit "$OUT/gpu-tests.xml" "$ALLOWED_SKIPS" "$MIN_GPU_TESTS"
else
  record gpu-tests FAIL "$(why gpu-tests "$rc")"
fi

# ---- 2. the layer benchmark ---------------------------------------------------------------------
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words
run bench-bf16 150 "$ST" bench moe-layer --device "$DEVICE" --json --peers "" --precision bf16 \
  --backends "$BENCH_BACKENDS" $BENCH_ARGS
rc=$?
grep '^{' "$OUT/bench-bf16.log" >"$OUT/bench-moe-layer-bf16.jsonl"
step_passes bench-bf16 "$rc" check_bench "$OUT/bench-moe-layer-bf16.jsonl" 0.1 # bf16 rounding of unit outputs

# shellcheck disable=SC2086
run bench-fp32 120 "$ST" bench moe-layer --device "$DEVICE" --json --peers "" --precision fp32 \
  --backends "${BENCH_BACKENDS%%,*}" $BENCH_ARGS
rc=$?
grep '^{' "$OUT/bench-fp32.log" >"$OUT/bench-moe-layer-fp32.jsonl"
step_passes bench-fp32 "$rc" check_bench "$OUT/bench-moe-layer-fp32.jsonl" 1e-3

# ---- 3. one-GPU bf16 training -------------------------------------------------------------------
mapfile -t args < <(train_args "$OUT/train-bf16" "$STEPS" bf16 "moe.kernel_backend=$TRAIN_BACKEND")
run train-bf16 120 "$ST" "${args[@]}"
step_passes train-bf16 $? check_falls "$OUT/train-bf16"

gmm_reason=$("$PY" -c '
import sys, torch
from sparse_train.kernels.grouped_gemm import grouped_mm_device_problem
dev = torch.device(sys.argv[1])
cap = torch.cuda.get_device_capability() if dev.type == "cuda" else None
print(grouped_mm_device_problem(dev.type, cap, hasattr(torch, "_grouped_mm")) or "")' "$DEVICE" 2>&1)
if [ -n "$gmm_reason" ]; then
  record train-grouped_mm SKIP "$gmm_reason"
else
  mapfile -t args < <(train_args "$OUT/train-grouped_mm" "$STEPS" bf16 moe.kernel_backend=grouped_mm)
  run train-grouped_mm 120 "$ST" "${args[@]}"
  step_passes train-grouped_mm $? check_grouped_mm_run
fi

# ---- 4. two-process NCCL layouts against one process ----------------------------------------------
if ((NGPU < 2)); then
  record ep2 SKIP "one GPU: the 2-process NCCL runs need two"
  record tp2 SKIP "one GPU: the 2-process NCCL runs need two"
else
  # fp32, global-batch balancing (the same on any number of ranks), AdamW eps 1e-6 (see
  # tests/distributed/test_layouts.py): the layouts then compute the one-process model
  same=(router.balance_scope=global_batch optimizer.eps=1e-6)
  mapfile -t args < <(train_args "$OUT/one-process" "$CMP_STEPS" fp32 "${same[@]}")
  run one-process 120 "$ST" "${args[@]}"
  rc=$?
  if ((rc != 0)); then
    record one-process FAIL "$(why one-process "$rc")"
  fi
  for layout in ep2 tp2; do
    if [ "$layout" = ep2 ]; then extra=(parallel.ep=2); else extra=(parallel.tp=2 parallel.dp_shard=1); fi
    mapfile -t args < <(train_args "$OUT/$layout" "$CMP_STEPS" fp32 "${same[@]}" "${extra[@]}")
    run "$layout" 150 "$ST" launch --nproc-per-node 2 "${args[@]}"
    rc=$?
    if [ ! -f "$OUT/one-process/metrics.jsonl" ]; then
      record "$layout" FAIL "no one-process run to compare with"
    else
      step_passes "$layout" "$rc" check_close "$OUT/$layout" "$OUT/one-process" "$CMP_STEPS" "$LOSS_RTOL"
    fi
  done
fi

# ---- summary ------------------------------------------------------------------------------------
failed=0
echo
echo "gpu-check summary ($SECONDS s; logs and results in $OUT):"
for i in "${!NAMES[@]}"; do
  printf '  %-18s %-4s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${NOTES[$i]}"
  [ "${STATUS[$i]}" = FAIL ] && failed=$((failed + 1))
done
if [ -n "$REHEARSAL" ]; then
  echo "REHEARSAL on CPU: the script's commands and checks ran; nothing about GPUs was checked."
fi
if ((failed)); then
  echo "gpu-check: $failed check(s) FAILED"
  exit 1
fi
echo "gpu-check: all checks passed"
