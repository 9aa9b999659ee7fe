#!/usr/bin/env bash
# GPU smoke test: does the CUDA path work end to end on this host?
#
# When to run it: on the first GPU host this project gets (the GPU path had never run
# before this script), and again after any change to device handling, NCCL, pinning,
# autocast or the sharding kernels. It takes a few minutes on one GPU (plus, the first
# time, building the CUDA stack in .venv/).
#
# What it does: builds .venv/ with the CUDA stack if needed (scripts/install.sh), makes
# a small synthetic dataset once (2 days x 50k rows under $SMOKE_DIR), then runs, each
# under `torchrun --standalone --nproc_per_node $NGPU` with configs/tiny.toml, a time
# limit of 240 s and its output in $SMOKE_DIR/logs/:
#   nccl_train    tiny training on NCCL (train.device=cuda); test AUC, samples/s
#   bf16_fp16     the same with train.autocast=bf16 and fp16 embedding tables
#   uvm_caching   the same with sharding.compute_kernels=["fused_uvm_caching"];
#                 RUN/plan.txt must place the tables on fused_uvm_caching
#   resume        nccl_train's run directory again, with one more epoch: must resume
#                 from its newest checkpoint (a non-null `resumed_from` in the start
#                 event), train past it and finish
#   offline_eval  `dlrm evaluate` of resume's newest checkpoint: its test AUC must equal
#                 the one training logged for that checkpoint to 1e-4
# Every check prints one line on stdout, `gpu_smoke: CHECK: pass FIGURES`,
# `gpu_smoke: CHECK: FAIL REASON` (the reason ends with the last line of the command's
# stderr) or `gpu_smoke: CHECK: skip WHY`; a check that fails does not stop the others.
# Then `gpu_smoke: N passed, M failed, K skipped`. Progress goes to stderr. Exit status:
# 0 when nothing failed, 1 when a check failed, 2 when there is nothing to test (no GPU)
# or the setup (install, dataset) failed.
#
# Environment:
#   NGPU=N               ranks (GPUs) to use; default: every GPU `nvidia-smi -L` lists
#                        (2 in the dry run)
#   SMOKE_DIR=DIR        where the dataset, runs and logs go; default runs/gpu_smoke
#                        (the dataset is kept between runs, the check runs are not)
#   DLRM_STACK=auto|cuda|cpu
#                        passed to scripts/install.sh; auto (default) picks cuda where
#                        nvidia-smi works
#   DLRM_SMOKE_DEVICE=cpu
#                        dry run of this script's plumbing on a CPU host: gloo ranks,
#                        train.device=cpu; the GPU-only checks print skip (uvm_caching
#                        still checks that `dlrm plan --device cuda` honours the kernel).
#                        The dry run uses the .venv/ already there and runs install.sh
#                        only when there is none.
#
# Examples:
#   bash scripts/gpu_smoke.sh
#   NGPU=1 SMOKE_DIR=/tmp/smoke bash scripts/gpu_smoke.sh
#   DLRM_SMOKE_DEVICE=cpu NGPU=2 SMOKE_DIR=/tmp/smoke bash scripts/gpu_smoke.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2

W=${SMOKE_DIR:-runs/gpu_smoke}
LIMIT=240            # seconds per check
MIN_AUC=0.55         # a trained model must beat chance by this much on the synthetic data
PY=.venv/bin/python
LOGS=$W/logs

say() { echo "gpu_smoke: $*" >&2; }
die() { say "$*"; exit 2; }

case "${DLRM_SMOKE_DEVICE:-cuda}" in
    cpu) DEVICE=cpu ;;
    cuda | "") DEVICE=cuda ;;
    *) die "DLRM_SMOKE_DEVICE must be cpu (dry run) or unset, got '${DLRM_SMOKE_DEVICE}'" ;;
esac

# ------------------------------------------------------------------ GPUs and stack
if [ -n "${NGPU:-}" ]; then
    ngpu=$NGPU
elif [ "$DEVICE" = cpu ]; then
    ngpu=2
elif command -v nvidia-smi >/dev/null 2>&1; then
    # `nvidia-smi -L` prints one "GPU i: ..." line per GPU (MIG devices as indented lines).
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
else
    ngpu=0
fi
case "$ngpu" in
    '' | *[!0-9]*) die "NGPU must be a whole number, got '$ngpu'" ;;
esac
if [ "$DEVICE" = cuda ] && [ "$ngpu" -lt 1 ]; then
    die "no GPU on this host (nvidia-smi -L lists none, or NGPU=0): this test is for GPU" \
        "hosts; DLRM_SMOKE_DEVICE=cpu runs its plumbing on CPU"
fi
if [ "$DEVICE" = cpu ] && [ "$ngpu" -lt 1 ]; then
    die "NGPU must be at least 1, got $ngpu"
fi

if [ "$DEVICE" = cpu ] && [ -x .venv/bin/dlrm ]; then
    say "dry run: using the .venv/ already built (install.sh not run)"
else
    say "install: DLRM_STACK=${DLRM_STACK:-auto} bash scripts/install.sh"
    DLRM_STACK=${DLRM_STACK:-auto} bash scripts/install.sh >&2 || die "scripts/install.sh failed"
fi

stack=$($PY -c '
import sys
import fbgemm_gpu, torch, torchrec
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
fbgemm = getattr(fbgemm_gpu, "__version__", "?")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchrec {torchrec.__version__},"
      f" fbgemm_gpu {fbgemm}; {n} GPU(s) {names}")
sys.exit(0 if sys.argv[1] == "cpu" or n >= int(sys.argv[2]) else 3)
' "$DEVICE" "$ngpu" 2>&1)
rc=$?
say "stack: $(echo "$stack" | tail -n 1)"
if [ "$rc" -eq 3 ]; then
    die "torch in .venv/ sees fewer GPUs than the $ngpu wanted; if it has no CUDA it is the" \
        "CPU build: rebuild with DLRM_STACK=cuda bash scripts/install.sh"
elif [ "$rc" -ne 0 ]; then
    die "the stack in .venv/ does not import"
fi

# ------------------------------------------------------------------ dataset (made once)
# The check runs start afresh (a run directory left over would be resumed); the data stays.
rm -rf "$W/nccl_train" "$W/bf16_fp16" "$W/uvm_caching" "$W/eval.json" "${LOGS:?}"
mkdir -p "$LOGS" || die "cannot create $LOGS"
say "dataset: $W/raw -> $W/data"
.venv/bin/dlrm synth --out "$W/raw" --days 2 --rows-per-day 50000 --seed 0 \
    >"$LOGS/synth.out" 2>"$LOGS/synth.err" \
    || die "dlrm synth failed: $(tail -n 1 "$LOGS/synth.err")"
if [ ! -f "$W/data/manifest.json" ]; then
    .venv/bin/dlrm preprocess --input "$W/raw/day_0" "$W/raw/day_1" --out "$W/data" \
        >"$LOGS/preprocess.out" 2>"$LOGS/preprocess.err" \
        || die "dlrm preprocess failed: $(tail -n 1 "$LOGS/preprocess.err")"
fi

# ------------------------------------------------------------------ helpers
passed=0 failed=0 skipped=0
pass() { echo "gpu_smoke: $1: pass $2"; passed=$((passed + 1)); }
fail() { echo "gpu_smoke: $1: FAIL $2"; failed=$((failed + 1)); }
skip() { echo "gpu_smoke: $1: skip $2"; skipped=$((skipped + 1)); }

# launch LOG SUBCOMMAND ARGS...: one dlrm command on $ngpu ranks, time-limited, its
# stdout / stderr in $LOGS/LOG.out / .err; returns its exit status (124: timed out).
launch() {
    local log=$1
    shift
    say "running $log: torchrun --nproc_per_node $ngpu -m dlrm $*"
    timeout --kill-after=30 "$LIMIT" .venv/bin/torchrun --standalone --nproc_per_node "$ngpu" \
        -m dlrm "$@" >"$LOGS/$log.out" 2>"$LOGS/$log.err"
}

# train LOG RUN_DIR OVERRIDES...
train() {
    local log=$1 run=$2
    shift 2
    launch "$log" train --config configs/tiny.toml --data.path="$W/data" --run-dir "$run" \
        --train.device="$DEVICE" "$@"
}

# What a failed command said, from its stderr (torchrun's own ChildFailedError report and
# traceback at the end are passed over): the first error line of a rank ("dlrm train:
# error: ...", "[rank1]: AttributeError: ...") that is not the echo of another rank's
# death (a closed connection, an aborted communicator), else the last error line, else
# the last line that is not blank, a rule, log chatter or a warning.
last_error() {
    awk '
        { line[NR] = $0 }
        /ChildFailedError/ && !cut { cut = NR }
        END {
            n = NR
            if (cut) {
                n = cut - 1
                for (i = cut; i >= 1; i--)
                    if (line[i] ~ /^Traceback \(most recent call last\)/) { n = i - 1; break }
            }
            first = last = plain = ""
            for (i = 1; i <= n; i++) {
                l = line[i]
                if (l ~ /^[[:space:]]*$/ || l ~ /^[=-]+$/ || l ~ /^[WIE][0-9][0-9][0-9][0-9] / \
                    || l ~ /Warning: / || l ~ /^[[:space:]]*warnings\.warn/) continue
                plain = l
                if (l ~ /^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception|Interrupt)(: |$)/ \
                    || l ~ /^dlrm [a-z]+: error: /) {
                    last = l
                    if (first == "" && l !~ /Connection closed by peer|Connection reset|remote worker|[Aa]bort/)
                        first = l
                }
            }
            r = first != "" ? first : (last != "" ? last : plain)
            print substr(r, 1, 300)
        }' "$1"
}

# why LOG STATUS: the reason of a failed command.
why() {
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then
        echo "timed out after ${LIMIT}s (see $LOGS/$1.err): $(last_error "$LOGS/$1.err")"
    else
        echo "exit $2: $(last_error "$LOGS/$1.err")"
    fi
}

# event LOG NAME FIELD: FIELD of the last NAME event rank 0 printed, as JSON (null when
# absent); exit status 1 when there is no such event.
event() {
    $PY -c '
import json, sys
path, name, field = sys.argv[1:4]
found = None
for line in open(path, errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == name:
            found = e
if found is None:
    sys.exit(1)
print(json.dumps(found.get(field)))
' "$LOGS/$1.out" "$2" "$3"
}

# figures RUN_DIR [MIN]: "test_auc=A samples_per_sec=S" from RUN/metrics.jsonl (the last
# of each), or exit status 1 with the reason on stdout (missing, not finite, AUC not above
# MIN, default MIN_AUC; the resumed run's second epoch on 50k rows overfits, so it is
# held to finiteness only).
figures() {
    $PY -c '
import json, math, sys
auc = sps = None
try:
    for line in open(sys.argv[1] + "/metrics.jsonl"):
        r = json.loads(line)
        auc = r.get("eval/test/auc", auc)
        sps = r.get("train/samples_per_sec", sps)
except (OSError, ValueError) as e:
    auc = sps = None
    problem = f"metrics.jsonl: {e}"
else:
    problem = "metrics.jsonl has no eval/test/auc or no train/samples_per_sec"
if auc is None or sps is None:
    print(problem)
    sys.exit(1)
figure = f"test_auc={auc:.4f} samples_per_sec={sps:.0f}"
if not (math.isfinite(auc) and math.isfinite(sps) and sps > 0):
    print(f"not finite: {figure}")
    sys.exit(1)
if auc <= float(sys.argv[2]):
    print(f"no better than chance: {figure} (want test_auc > {sys.argv[2]})")
    sys.exit(1)
print(figure)
' "$1" "${2:-$MIN_AUC}"
}

# train_check NAME OVERRIDES...: one training run in $W/NAME; passes with its figures.
# Returns 0 when it passed, so that a caller can add conditions.
train_check() {
    local name=$1 run=$W/$1 rc fig dev
    shift
    train "$name" "$run" --train.limit_train_batches=200 --train.checkpoint_every=100 "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then fail "$name" "$(why "$name" "$rc")"; return 1; fi
    dev=$(event "$name" start device) || { fail "$name" "no start event in $LOGS/$name.out"; return 1; }
    case "$dev" in
        *"$DEVICE"*) ;;
        *) fail "$name" "ran on $dev, not $DEVICE"; return 1 ;;
    esac
    event "$name" "done" steps >/dev/null || { fail "$name" "no done event in $LOGS/$name.out"; return 1; }
    fig=$(figures "$run") || { fail "$name" "$fig"; return 1; }
    FIGURE=$fig
}

# ------------------------------------------------------------------ the checks
# (no `set -e`: a failing check must not stop the others)

# 1. NCCL (gloo in the dry run) training.
FIGURE=""
nccl_ok=0
if train_check nccl_train; then
    pass nccl_train "$FIGURE"
    nccl_ok=1
fi

# 2. bf16 autocast on the dense part, fp16 tables.
if [ "$DEVICE" = cpu ]; then
    skip bf16_fp16 "bf16 autocast is GPU-only (refused on CPU by design)"
else
    train_check bf16_fp16 --train.autocast=bf16 --model.embedding_dtype=fp16 \
        && pass bf16_fp16 "$FIGURE"
fi

# 3. Tables in host memory with an HBM cache.
if [ "$DEVICE" = cpu ]; then
    # No UVM on CPU; still check that the key reaches the planner of a CUDA cluster.
    .venv/bin/dlrm plan --config configs/tiny.toml --data.path="$W/data" --world-size "$ngpu" \
        --device cuda --hbm-gib 80 '--sharding.compute_kernels=["fused_uvm_caching"]' \
        >"$LOGS/uvm_caching_plan.out" 2>"$LOGS/uvm_caching_plan.err"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        fail uvm_caching "dlrm plan --device cuda: $(why uvm_caching_plan "$rc")"
    elif ! grep -q fused_uvm_caching "$LOGS/uvm_caching_plan.out"; then
        fail uvm_caching "dlrm plan --device cuda placed no table on fused_uvm_caching" \
            "($LOGS/uvm_caching_plan.out)"
    else
        skip uvm_caching "UVM is GPU-only (dry run: dlrm plan --device cuda plans fused_uvm_caching)"
    fi
elif train_check uvm_caching '--sharding.compute_kernels=["fused_uvm_caching"]'; then
    if grep -q fused_uvm_caching "$W/uvm_caching/plan.txt" 2>/dev/null; then
        pass uvm_caching "$FIGURE"
    else
        fail uvm_caching "$W/uvm_caching/plan.txt does not mention fused_uvm_caching"
    fi
fi

# 4. Resume nccl_train's run from its newest checkpoint. Its one epoch (fewer than 200
# steps on this data) is complete, so the rerun asks for a second one to have something
# to train after the restore.
resume_ok=0
if [ "$nccl_ok" -ne 1 ]; then
    skip resume "nccl_train did not pass"
else
    train resume "$W/nccl_train" --train.limit_train_batches=300 --train.epochs=2 \
        --train.checkpoint_every=100
    rc=$?
    from=$(event resume start resumed_from 2>/dev/null)
    at=$(event resume start step 2>/dev/null)
    steps=$(event resume "done" steps 2>/dev/null)
    if [ "$rc" -ne 0 ]; then
        fail resume "$(why resume "$rc")"
    elif [ -z "$from" ] || [ "$from" = null ]; then
        fail resume "the start event has no resumed_from: it did not resume ($LOGS/resume.out)"
    elif [ -z "$steps" ]; then
        fail resume "no done event in $LOGS/resume.out"
    elif [ "$steps" -le "$at" ]; then
        fail resume "resumed at step $at but trained no further (done at step $steps)"
    elif fig=$(figures "$W/nccl_train" 0); then
        pass resume "from ${from//\"/} (step $at) to step $steps, $fig"
        resume_ok=1
    else
        fail resume "$fig"
    fi
fi

# 5. Offline evaluation of the newest checkpoint against training's own final test AUC.
if [ "$resume_ok" -ne 1 ]; then
    skip offline_eval "resume did not pass (its final checkpoint and AUC are the reference)"
else
    ck=""
    for d in "$W"/nccl_train/checkpoints/step-*; do
        case $d in *.partial) ;; *) [ -d "$d" ] && ck=$d ;; esac
    done
    if [ -z "$ck" ]; then
        fail offline_eval "no checkpoint in $W/nccl_train/checkpoints"
    else
        launch offline_eval evaluate --checkpoint "$ck" --data "$W/data" --out "$W/eval.json"
        rc=$?
        if [ "$rc" -ne 0 ]; then
            fail offline_eval "$(why offline_eval "$rc")"
        elif out=$($PY -c '
import json, sys
ev = json.load(open(sys.argv[1]))
auc, step = ev["metrics"]["auc"], ev["step"]
train_auc = None
for line in open(sys.argv[2]):
    r = json.loads(line)
    if "eval/test/auc" in r:
        train_auc, train_step = r["eval/test/auc"], r["step"]
msg = (f"auc={auc:.6f} of {sys.argv[3]}; training logged {train_auc:.6f} at step {train_step}"
       if train_auc is not None else f"auc={auc:.6f}; training logged no test AUC")
ok = train_auc is not None and step == train_step and abs(auc - train_auc) <= 1e-4
print(msg if ok else f"{msg} (want equal to 1e-4, same step)")
sys.exit(0 if ok else 1)
' "$W/eval.json" "$W/nccl_train/metrics.jsonl" "$(basename "$ck")" 2>&1); then
            pass offline_eval "$out"
        else
            fail offline_eval "$(echo "$out" | tail -n 1)"
        fi
    fi
fi

echo "gpu_smoke: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
