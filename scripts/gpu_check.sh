#!/usr/bin/env bash
# A GPU machine checked in one command, in at most 8 minutes on one GPU, written to one
# results file. Its stages, each its own process, all run even when one fails:
#   training    scripts/gpu_smoke.sh: CDT-S trained in bf16 in one process and under torchrun,
#               the export served and a clip round-tripped through the HTTP API
#   parity      bf16 against fp32, encode and decode of the checkpoint on val clips, on the first
#               GPU (benchmarks/gpu_parity.py; the bounds are tests/tolerance.py's)
#   service     `cdt serve` of the checkpoint on every GPU (CDT_DEVICES=cuda), over HTTP: whole
#               clips, encode and decode sessions, the diffusers routes, an out-of-memory request,
#               jobs on every device (benchmarks/gpu_service.py)
#   throughput  frames/s of encode and decode, tiny and small presets at 256², 512² and 720p, bf16
#               (benchmarks/gpu_throughput.py)
# then benchmarks/gpu_check.py writes RESULTS: each stage's outcome, time and table, with the
# command, commit, date, CPU, GPUs, torch, CUDA and cuDNN. Exit code 1 when a stage failed.
#
# gpu_smoke.sh stays a script of its own, run here as the training stage: it checks another
# path (a checkpoint trained on this machine, exported and served), has its own knobs
# (PRESET, STEPS, FRAMES, SIZE, BATCH, BF16, NPROC, THREADS, DATA, CLIP, OVERRIDES, which pass
# through to it from the environment), and is checked on the CPU by tests/test_gpu_smoke.py.
# The stages here check the served checkpoint on the device, so one command still covers the
# day, and each script stays one concern with one set of knobs.
#
# DEVICE=cpu is the reduced mode CI runs (tests/test_gpu_check.py): the same stages on the CPU,
# smaller: parity on 2 val clips of 9 frames at short side 64; the service on CDT_DEVICES=cpu,cpu
# (two model threads: the several-devices path) without the out-of-memory request, which needs
# device memory to exhaust; throughput of the tiny preset at 64x64, 9 frames, 2 sessions, fp32; no training
# unless TRAIN=1 (tests/test_gpu_smoke.py trains on the CPU).
#
# DEVICE      cuda (default) or cpu (reduced mode)
# TRAIN       1 runs the training stage (default with DEVICE=cuda), 0 skips it (default on cpu)
# STAGES      the stages to run, of "training parity service throughput" (default all); the
#             others are recorded as skipped
# CHECKPOINT  the checkpoint checked (default checkpoints/cdt-tiny, the shipped one)
# MANIFEST    the clips: parity takes its first val rows, the service the first of them
#             (default ../shared/data/videos/MANIFEST.tsv); also the training stage's DATA unless given
# RESULTS     the results file (default benchmarks/results/gpu_check.md)
# PYTHON      interpreter with the project installed (default .venv/bin/python, else python3)
# RUN_DIR     where the stages' logs and tables go (default a temp dir, removed unless KEEP=1)
# SERVE_TIMEOUT  seconds the server may take to become ready, and each request (300)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"  # `-m benchmarks.*` resolves to this tree
NAME=gpu_check
# shellcheck source=scripts/gpu_lib.sh
. scripts/gpu_lib.sh

ALL_STAGES="training parity service throughput"
DEVICE=${DEVICE:-cuda}
case $DEVICE in cuda) TRAIN=${TRAIN:-1} ;; cpu) TRAIN=${TRAIN:-0} ;; *) die "DEVICE must be cuda or cpu, got '$DEVICE'" ;; esac
case $TRAIN in 0|1) ;; *) die "TRAIN must be 0 or 1, got '$TRAIN'" ;; esac
STAGES=${STAGES:-$ALL_STAGES}
for stage in $STAGES; do
    [[ " $ALL_STAGES " == *" $stage "* ]] || die "STAGES: no stage '$stage' (stages: $ALL_STAGES)"
done
CHECKPOINT=${CHECKPOINT:-$REPO/checkpoints/cdt-tiny}
SHARED_MANIFEST=$REPO/../shared/data/videos/MANIFEST.tsv
MANIFEST=${MANIFEST:-$SHARED_MANIFEST}
RESULTS=${RESULTS:-$REPO/benchmarks/results/gpu_check.md}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-300}
[[ $SERVE_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "SERVE_TIMEOUT must be a positive integer, got '$SERVE_TIMEOUT'"
[ -f "$CHECKPOINT/config.json" ] || die "no checkpoint at $CHECKPOINT: give CHECKPOINT=DIR"
[ -f "$MANIFEST" ] || die "no clip manifest at $MANIFEST: give MANIFEST=FILE (rows with a path and a split)"
use_python

if [ "$DEVICE" = cuda ]; then
    require_gpus "the reduced check"
    mode="full, on $GPUS GPU(s): parity on cuda:0, the service on all of them"
    # The stages' own defaults are the GPU run's.
    parity_args=(--device cuda)
    service_args=(--devices cuda)
    throughput_args=(--device cuda)
    budget=(--budget-minutes 8)
else
    mode="reduced, on the CPU (DEVICE=cpu): smaller clips, the tiny preset at one size in fp32, no out-of-memory request"
    parity_args=(--device cpu --clips 2 --frames 9 --size 64)
    service_args=(--devices cpu,cpu --frames 9 --size 64)
    throughput_args=(--device cpu --dtype fp32 --presets tiny --sizes 64x64 --frames 9 --sessions 2 --session-chunks 1)
    budget=()  # the 8 minutes are a GPU run's
fi

open_run_dir  # the running stage (CHILD_PID) is stopped on the way out (SIGTERM: it stops its server)

# run_stage NAME COMMAND...: its output in RUN_DIR/NAME.log; its exit code, start and end in NAME.rc.
run_stage() {
    local name=$1 rc=0 start=$EPOCHREALTIME
    shift
    echo "gpu_check: $name"
    "$@" > "$RUN_DIR/$name.log" 2>&1 &
    CHILD_PID=$!
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=
    echo "$rc $start $EPOCHREALTIME" > "$RUN_DIR/$name.rc"
    [ "$rc" = 0 ] || { tail -n 20 "$RUN_DIR/$name.log" >&2; echo "gpu_check: $name failed (exit code $rc)" >&2; }
}
skip_stage() { echo "$2" > "$RUN_DIR/$1.skipped"; echo "gpu_check: $1 skipped: $2"; }
selected() { [[ " $STAGES " == *" $1 "* ]]; }

echo "gpu_check: DEVICE=$DEVICE, $mode; checkpoint $CHECKPOINT, in $RUN_DIR"
if ! selected training; then
    skip_stage training "not in STAGES"
elif [ "$TRAIN" = 0 ]; then
    skip_stage training "TRAIN=0 (the default on the CPU: tests/test_gpu_smoke.py runs scripts/gpu_smoke.sh there)"
else
    run_stage training env DEVICE="$DEVICE" PYTHON="$PYTHON" RUN_DIR="$RUN_DIR/training" KEEP=1 \
        SERVE_TIMEOUT="$SERVE_TIMEOUT" DATA="${DATA:-$MANIFEST}" bash scripts/gpu_smoke.sh
fi
for stage in parity service throughput; do
    if ! selected "$stage"; then
        skip_stage "$stage" "not in STAGES"
        continue
    fi
    case $stage in
        parity) run_stage parity "$PYTHON" -m benchmarks.gpu_parity "${parity_args[@]}" \
                    --checkpoint "$CHECKPOINT" --manifest "$MANIFEST" --run-dir "$RUN_DIR" ;;
        # The service stands alone: in-process sessions, no keys.
        service) run_stage service env -u CDT_REDIS_URL -u CDT_API_KEYS "$PYTHON" -m benchmarks.gpu_service \
                     "${service_args[@]}" --checkpoint "$CHECKPOINT" --manifest "$MANIFEST" \
                     --timeout "$SERVE_TIMEOUT" --run-dir "$RUN_DIR" ;;
        throughput) run_stage throughput "$PYTHON" -m benchmarks.gpu_throughput "${throughput_args[@]}" \
                        --run-dir "$RUN_DIR" ;;
    esac
done

command="DEVICE=$DEVICE TRAIN=$TRAIN"
[ "$STAGES" = "$ALL_STAGES" ] || command+=" STAGES='$STAGES'"
[ "$MANIFEST" = "$SHARED_MANIFEST" ] || command+=" MANIFEST=$MANIFEST"
command+=" CHECKPOINT=${CHECKPOINT#"$REPO"/} scripts/gpu_check.sh"
status=0
# shellcheck disable=SC2086  # ALL_STAGES is a list of words
"$PYTHON" -m benchmarks.gpu_check --run-dir "$RUN_DIR" --out "$RESULTS" --command "$command" --mode "$mode" \
    "${budget[@]}" $ALL_STAGES || status=$?
exit "$status"
