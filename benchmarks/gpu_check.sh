#!/usr/bin/env bash
# The GPU checks of issue 12 in one script, in at most 8 minutes on one GPU. The headline
# parts come first, so that they run even if a later part is slow:
#
#   1. environment: nvidia-smi, hardware, date, versions
#   2. optimizer-step table: ResNet-50 and the 12-block transformer
#      (benchmarks/optimizer_step.py --quick --layers 12)
#   3. Shampoo comparison (benchmarks/shampoo_step.py --quick; Meta's DistributedShampoo
#      when importable)
#   4. training loop: overhead against a bare PyTorch loop (benchmarks/train_loop.py)
#   5. training loop: no host synchronisation between evaluations (tests/train/test_host_syncs.py)
#   6. one short `largebatch run --bf16` on the GPU
#   7. one two-cell `largebatch sweep` on the GPU
#   8. start-up of `largebatch run` (imports, data, CUDA initialisation, first step)
#
# Each part has its own time limit (LIMITS below; with the grace a stopped part gets to
# exit, they sum to at most the default budget), and the whole run a budget
# (GPU_CHECK_BUDGET seconds, default 480): a part runs within what is left of it, grace
# included. A part that fails or times out is recorded and the next one runs. The
# ratios are printed next to their targets. Everything goes to $GPU_CHECK_OUT/gpu_check.log,
# the tables and the status of every part to $GPU_CHECK_OUT/summary.md (two files only).
#
# Python: $GPU_CHECK_PYTHON; else .venv/bin/python if its torch can use the device; else
# python3 if its torch can (the machine's CUDA torch), with this repository and the wheels
# carried in .whl/ on its path, installed without network (docs/performance.md says which
# wheels a GPU image may lack); else a new .venv (`make .venv/.installed`, needs an index).
#
# Settings (environment):
#   GPU_CHECK_DEVICE  cuda (default), cuda:N, or cpu: a dry run with small settings
#   GPU_CHECK_OUT     output folder (default runs/gpu-check-<date>-<time>)
#   GPU_CHECK_BUDGET  seconds for everything (default 480)
#   GPU_CHECK_PARTS   the parts to run, by name (default: all), e.g. "env optimizer shampoo"
#
# Usage: benchmarks/gpu_check.sh            (from anywhere; it works in the repository)
#        GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh
#        benchmarks/gpu_check.sh --limits  (prints each part's limit, the grace and the
#                                           default budget, and exits)

set -u -o pipefail

# seconds per part, in the order they run; each may take GRACE more to exit once stopped
PARTS_IN_ORDER=(env optimizer shampoo loop syncs run sweep startup)
declare -A LIMITS=([env]=15 [optimizer]=160 [shampoo]=90 [loop]=40 [syncs]=40 [run]=30
    [sweep]=40 [startup]=25)
GRACE=5
DEFAULT_BUDGET=480
if [[ ${1:-} == --limits ]]; then
    for name in "${PARTS_IN_ORDER[@]}"; do
        echo "$name ${LIMITS[$name]}"
    done
    echo "grace $GRACE"
    echo "budget $DEFAULT_BUDGET"
    exit 0
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}
PARTS=${GPU_CHECK_PARTS:-${PARTS_IN_ORDER[*]}}
OUT_DIR=${GPU_CHECK_OUT:-$REPO/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR" || exit 1
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.md
: >"$LOG"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1
export DEVICE SCRATCH # for the functions that run as parts (bash -c)
START=$SECONDS

case $DEVICE in
cpu)
    LOOP_ARGS=(--steps 30 --repeats 1)
    STARTUP_ARGS=(--steps 200 --repeats 1)
    OPTIMIZER_ARGS=(--quick --rounds 1 --layers 1 --only lamb)
    RUN_ARGS=(--batch-size 256 --epochs 1)
    SWEEP_EPOCHS=1
    ;;
cuda | cuda:[0-9]*)
    LOOP_ARGS=()
    STARTUP_ARGS=(--steps 2000 --repeats 2)
    OPTIMIZER_ARGS=(--quick --layers 12) # the issue's targets: ResNet-50 and 12 blocks
    RUN_ARGS=(--batch-size 4096 --epochs 30)
    SWEEP_EPOCHS=10
    ;;
*)
    echo "GPU_CHECK_DEVICE=$DEVICE: expected cuda, cuda:N or cpu" >&2
    exit 2
    ;;
esac

log() { echo "$*" | tee -a "$LOG"; }

# --- results: one row per part, tables collected for the summary ---------------------------
declare -a ROWS=()
declare -a TABLES=()

record() { # record NAME STATUS SECONDS [OUTPUT_FILE]
    ROWS+=("| $1 | $2 | $3 s |")
    [[ -n ${4:-} && -s $4 ]] || return 0
    local lines
    if (($(wc -l <"$4") <= 40)); then
        lines=$(cat "$4")
    else # tables, targets and the end (where a failure says why)
        lines=$(grep -E '^\||target' "$4" | head -n 60)$'\n...\n'$(tail -n 12 "$4")
    fi
    TABLES+=("### $1"$'\n\n```\n'"$lines"$'\n```')
}

write_summary() {
    {
        echo "# GPU check, $(date '+%Y-%m-%d %H:%M %Z')"
        echo
        echo "Device: $DEVICE. Hardware: ${HARDWARE:-unknown}. Software: ${SOFTWARE:-unknown}."
        echo "Total: $((SECONDS - START)) s (budget $BUDGET s). Full output: gpu_check.log."
        echo
        echo "| part | status | time |"
        echo "| --- | --- | --- |"
        printf '%s\n' "${ROWS[@]}"
        echo
        for table in "${TABLES[@]}"; do
            printf '%s\n\n' "$table"
        done
    } >"$SUMMARY"
}

wanted() { [[ " $PARTS " == *" $1 "* ]]; }

part() { # part NAME COMMAND...: within min(its limit, what the budget leaves after GRACE)
    local name=$1 limit=${LIMITS[$1]}
    shift
    wanted "$name" || return 0
    local left=$((BUDGET - (SECONDS - START) - GRACE))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        log "=== $name: skipped, the budget of $BUDGET s is spent"
        record "$name" "skipped (budget spent)" 0
        return 0
    fi
    log ""
    log "=== $name (limit ${limit} s): $*"
    local output=$SCRATCH/$name.out began=$SECONDS status
    if declare -F "$1" >/dev/null; then # a function of this script: run it in a shell of its own
        set -- bash -c '"$@"' "$1" "$@"
    fi
    timeout --signal=INT --kill-after="$GRACE" "$limit" "$@" 2>&1 | tee "$output" >>"$LOG"
    status=${PIPESTATUS[0]}
    local took=$((SECONDS - began)) verdict="ok"
    if ((status == 124 || status == 137)); then
        verdict="TIMED OUT after $limit s"
    elif ((status != 0)); then
        verdict="FAILED (exit $status)"
    fi
    log "=== $name: $verdict in $took s"
    record "$name" "$verdict" "$took" "$output"
    write_summary
}

# --- 1. environment ---------------------------------------------------------------------------
log "GPU check of largebatch ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')) on $(hostname), $(date '+%Y-%m-%d %H:%M:%S %Z')"
log "device $DEVICE, budget $BUDGET s, parts: $PARTS, output $OUT_DIR"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi 2>&1 | tee -a "$LOG"
    HARDWARE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | paste -sd ';')
else
    log "nvidia-smi: not found"
fi
HARDWARE="${HARDWARE:-no GPU}; $(nproc) CPU cores"
log "hardware: $HARDWARE"

usable() { # usable PYTHON: its torch can run on $DEVICE
    "$1" - "$DEVICE" >/dev/null 2>&1 <<'EOF'
import sys, torch
device = torch.device(sys.argv[1])
assert device.type == "cpu" or torch.cuda.is_available()
EOF
}

choose_python() {
    if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
        PY=$GPU_CHECK_PYTHON
    elif [[ -x .venv/bin/python ]] && usable .venv/bin/python; then
        PY=.venv/bin/python
    elif command -v python3 >/dev/null && usable python3; then
        # the machine's own torch (on GPU images often in a venv of its own, which a new
        # venv could not see): this repository and any carried wheels go on its path
        PY=python3
        if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
            log "installing the wheels in .whl/ into $SCRATCH/site"
            python3 -m pip install --quiet --no-index --no-deps --no-compile \
                --target "$SCRATCH/site" "$REPO"/.whl/*.whl 2>&1 | tee -a "$LOG"
            export PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
        fi
        export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    else
        log "no Python whose torch can use $DEVICE: make .venv/.installed (needs a package index)"
        make .venv/.installed 2>&1 | tee -a "$LOG"
        PY=.venv/bin/python
    fi
}

choose_python
log "python: $PY"
export PY

cat >"$SCRATCH/env.py" <<'EOF'
import importlib.util, platform, sys, torch, largebatch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
print(f"largebatch {largebatch.__version__} from {largebatch.__path__[0]}")
if torch.cuda.is_available():
    print(f"GPU {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
needed = ["numpy", "scipy", "click", "tqdm", "sklearn", "matplotlib", "mnist1d", "largebatch"]
optional = ["tensorboard", "pytest", "triton", "pytorch_optimizer", "distributed_shampoo"]
for names, kind in ((needed, "missing (needed)"), (optional, "missing (optional)")):
    absent = [n for n in names if importlib.util.find_spec(n) is None]
    if absent:
        print(f"{kind}: {', '.join(absent)}")
if sys.argv[1] != "cpu" and not torch.cuda.is_available():
    sys.exit(f"{sys.argv[1]} asked for, but this torch cannot use CUDA")
EOF
part env "$PY" "$SCRATCH/env.py" "$DEVICE"
[[ -s $SCRATCH/env.out ]] && SOFTWARE=$(head -n 1 "$SCRATCH/env.out") && write_summary

# --- 2-8: the headline tables first -----------------------------------------------------------
part optimizer "$PY" benchmarks/optimizer_step.py --device "$DEVICE" "${OPTIMIZER_ARGS[@]}"

shampoo() { # only where the benchmark can run on the device asked for
    if [[ $DEVICE != cpu ]] && ! "$PY" benchmarks/shampoo_step.py --help | grep -q -- --device; then
        echo "benchmarks/shampoo_step.py has no --device option: it cannot measure the GPU"
        return 3
    fi
    local device_args=()
    "$PY" benchmarks/shampoo_step.py --help | grep -q -- --device && device_args=(--device "$DEVICE")
    "$PY" benchmarks/shampoo_step.py --quick "${device_args[@]}"
}
export -f shampoo
part shampoo shampoo

part loop "$PY" benchmarks/train_loop.py --device "$DEVICE" --quick "${LOOP_ARGS[@]}"

part syncs "$PY" -m pytest -q -p no:cacheprovider tests/train/test_host_syncs.py

part run "$PY" -m largebatch run --task mnist1d-cnn --optimizer lamb "${RUN_ARGS[@]}" \
    --device "$DEVICE" --bf16 --no-progress --out "$SCRATCH/run"

cat >"$SCRATCH/sweep.toml" <<EOF
task = "mnist1d-cnn"
batch_sizes = [256, 4096]
optimizers = ["lamb"]
epochs = $SWEEP_EPOCHS
evals_per_run = 5
device = "$DEVICE"
bf16 = true
EOF
sweep_and_results() {
    "$PY" -m largebatch sweep "$SCRATCH/sweep" --file "$SCRATCH/sweep.toml" --no-report \
        --no-progress && "$PY" -m largebatch results "$SCRATCH/sweep"
}
export -f sweep_and_results
part sweep sweep_and_results

part startup "$PY" benchmarks/train_loop.py --device "$DEVICE" --skip-overhead --skip-noise \
    --skip-ddp --startup "${STARTUP_ARGS[@]}"

write_summary
log ""
log "summary: $SUMMARY"
cat "$SUMMARY"
