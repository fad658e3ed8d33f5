#!/usr/bin/env bash
# The whole path from training to serving, on a GPU machine, in one command:
#   1. `cdt train` of the `small` preset (CDT-S) for STEPS steps in bf16 on one process,
#   2. the same under torchrun on NPROC processes (all visible GPUs), exporting the checkpoint,
#   3. `cdt serve` of that export on a free port, and a clip's round trip through the HTTP
#      API (/v1/encode, then /v1/decode, compared with /v1/frames),
# printing each run's step time and peak GPU memory. Every knob is an environment variable,
# so that the same script runs on a CPU with the tiny preset (tests/test_gpu_smoke.py):
#   DEVICE=cpu PRESET=tiny STEPS=2 FRAMES=5 SIZE=32 scripts/gpu_smoke.sh
#
# DEVICE   cuda (default) or cpu             PRESET  model preset (default small)
# STEPS    optimizer steps per run (20)      FRAMES  frames per training clip and round trip (17)
# SIZE     training crop and the round trip's short side (256)
# BATCH    clips per rank per step (2)       BF16    on (default) or off: bf16 autocast
# NPROC    torchrun processes (default: the visible GPUs on cuda, 2 on cpu; 0 skips torchrun)
# THREADS  CPU threads per machine (default: the config's)
# DATA     a folder of videos/images or a manifest (default: ../shared/data/videos/MANIFEST.tsv)
# CLIP     the round trip's video (default: a val clip of ../shared/data/videos)
# OVERRIDES  more `section.key=value` config overrides for both runs
# PYTHON   interpreter with the project installed (default .venv/bin/python, else python3)
# RUN_DIR  where runs, export and server log go (default a temp dir, removed unless KEEP=1)
# SERVE_TIMEOUT  seconds the server may take to become ready (300)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"  # `-m cli.main` under torchrun resolves to this tree
NAME=gpu_smoke
# shellcheck source=scripts/gpu_lib.sh
. scripts/gpu_lib.sh

DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small}
STEPS=${STEPS:-20}
FRAMES=${FRAMES:-17}
SIZE=${SIZE:-256}
BATCH=${BATCH:-2}
BF16=${BF16:-on}
SHARED=$REPO/../shared/data/videos
DATA=${DATA:-$SHARED/MANIFEST.tsv}
CLIP=${CLIP:-$SHARED/cotracker__bear.mp4}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-300}

case $DEVICE in cuda|cpu) ;; *) die "DEVICE must be cuda or cpu, got '$DEVICE'" ;; esac
case $BF16 in on|off) ;; *) die "BF16 must be on or off, got '$BF16'" ;; esac
for name in STEPS FRAMES SIZE BATCH SERVE_TIMEOUT; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done
[ -e "$DATA" ] || die "no training data at $DATA: give DATA=FOLDER_OF_VIDEOS (or a manifest)"
[ -f "$CLIP" ] || die "no clip at $CLIP: give CLIP=VIDEO for the round trip"
use_python

if [ "$DEVICE" = cuda ]; then
    require_gpus "the same steps"
    NPROC=${NPROC:-$GPUS}
else
    NPROC=${NPROC:-2}
fi
[[ $NPROC =~ ^[0-9]+$ ]] || die "NPROC must be a number of processes, got '$NPROC'"

open_run_dir  # the server (CHILD_PID) is stopped on the way out, also on Ctrl-C

if [ -d "$DATA" ]; then
    data_overrides=("data.videos=[\"$DATA\"]" "data.val_videos=[\"$DATA\"]")
else
    data_overrides=("data.manifest=$DATA")
fi
# cdt_s.json with one stage of STEPS steps shaped as its first (frames, crop and batch
# as given), no validation (val.max_clips=0) and a log row per step.
stage='{"name": "smoke", "image_ratio": 0.1, "lpips_weight": 0.0, '
stage+="\"steps\": $STEPS, \"frames\": $FRAMES, \"crop\": $SIZE, \"batch\": $BATCH}"
# shellcheck disable=SC2206  # OVERRIDES is a list of words
train_args=(train --config training/configs/cdt_s.json "model.preset=$PRESET" "stages=[$stage]"
            val.max_clips=0 train.log_every=1 "${data_overrides[@]}" ${OVERRIDES:-}
            --device "$DEVICE" --bf16 "$BF16" --quiet ${THREADS:+--threads "$THREADS"})

# Step time and peak memory of a run, from its log (rank 0's rows).
report() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, math, statistics, sys
run_dir, label = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{run_dir}/log.jsonl")]
start = next(r for r in rows if r["kind"] == "start")
train = [r for r in rows if r["kind"] == "train"]
steady = train[1:] or train  # the first step builds kernels (and compiles): reported apart
step = statistics.median(r["step_seconds"] for r in steady)
rate = statistics.median(r["samples_per_s"] for r in steady)
data = statistics.median(r["data_seconds"] for r in steady)
memory = f"{train[-1]['max_memory_gb']:.2f} GB (rank 0)" if "max_memory_gb" in train[-1] else \
    f"n/a ({start['device']})"
bf16 = "on" if start["bf16"] else "off"
print(f"{label}: {len(train)} steps on {start['device']} x world {start['world']}, bf16 {bf16}, "
      f"global batch {start['global_batch']}")
print(f"{label}: step time {step:.3f} s (median after step 1; step 1 {train[0]['step_seconds']:.3f} s), "
      f"{rate:.2f} samples/s, waiting for data {data:.3f} s/step")
print(f"{label}: peak GPU memory {memory}")
losses = [r["loss"] for r in train]
if not all(math.isfinite(loss) for loss in losses):
    sys.exit(f"gpu_smoke: error: {label}: non-finite loss in {losses}")
EOF
}

echo "gpu_smoke: $PRESET preset, $STEPS steps, $FRAMES x ${SIZE}² clips, batch $BATCH per rank," \
     "device $DEVICE, bf16 $BF16, in $RUN_DIR"

echo "gpu_smoke: training in one process"
"$PYTHON" -m cli.main "${train_args[@]}" --run-dir "$RUN_DIR/one" --export "$RUN_DIR/one/export" \
    > "$RUN_DIR/one.out" 2>&1 || { tail -n 30 "$RUN_DIR/one.out" >&2; die "the one-process run failed"; }
report "$RUN_DIR/one" "train 1 process"
runs=(one)

if [ "$NPROC" -gt 0 ]; then
    echo "gpu_smoke: training under torchrun, $NPROC processes"
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m cli.main "${train_args[@]}" \
        --run-dir "$RUN_DIR/ddp" --export "$RUN_DIR/ddp/export" > "$RUN_DIR/ddp.out" 2>&1 \
        || { tail -n 30 "$RUN_DIR/ddp.out" >&2; die "the torchrun run failed"; }
    report "$RUN_DIR/ddp" "train torchrun x $NPROC"
    runs+=(ddp)
fi
for run in "${runs[@]}"; do  # each run wrote its export
    [ -f "$RUN_DIR/$run/export/training.json" ] || die "no export in $RUN_DIR/$run/export"
done
export_dir=$RUN_DIR/${runs[-1]}/export  # the torchrun run's, when there is one

port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "gpu_smoke: serving $export_dir on 127.0.0.1:$port"
# The smoke server stands alone: in-process sessions, no keys.
env -u CDT_REDIS_URL -u CDT_API_KEYS -u CDT_DTYPE "$PYTHON" -m cli.main serve --checkpoint "$export_dir" \
    --devices "$DEVICE" --port "$port" --log-level warning > "$RUN_DIR/serve.out" 2>&1 &
CHILD_PID=$!

"$PYTHON" - "http://127.0.0.1:$port" "$CHILD_PID" "$SERVE_TIMEOUT" "$CLIP" "$FRAMES" "$SIZE" "$export_dir" \
    "$RUN_DIR" <<'EOF' || { tail -n 30 "$RUN_DIR/serve.out" >&2; die "the round trip through the server failed"; }
import io, json, sys, time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load

from cdt_client.client import Client, content_type, raise_for_error
from media.metrics import psnr

url, pid, timeout, clip, frames, size, export_dir, run_dir = sys.argv[1:]
client = Client(url, timeout=float(timeout))
deadline = time.monotonic() + float(timeout)
while True:
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
        sys.exit("gpu_smoke: error: the server exited before it was ready")
    try:
        if client.ready():
            break
    except httpx.TransportError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"gpu_smoke: error: the server was not ready after {timeout} s")
    time.sleep(0.5)
(model,) = client.models()
trained = json.loads(Path(export_dir, "training.json").read_text())["model_hash"]
if model["hash"] != trained:
    sys.exit(f"gpu_smoke: error: the server serves {model['hash']}, the run exported {trained}")
latents_path = Path(run_dir, "latents.safetensors")
client.encode_file(clip, latents_path, frames=int(frames), size=int(size))
(latents,) = load(latents_path.read_bytes()).values()
decoded = np.load(io.BytesIO(client.decode_file(latents_path, steps=1, format="npy")))
# The frames the service encoded: the round trip's reference.
response = httpx.post(f"{url}/v1/frames", content=Path(clip).read_bytes(), timeout=float(timeout),
                      headers={"content-type": content_type(Path(clip))},
                      params={"frames": frames, "size": size, "format": "npy"})
raise_for_error(response)
reference = np.load(io.BytesIO(response.content))
if decoded.shape != reference.shape or decoded.dtype != np.uint8:
    sys.exit(f"gpu_smoke: error: decoded {decoded.shape} {decoded.dtype}, encoded frames {reference.shape}")
print(f"serve: {model['preset']} {model['kind']} {model['hash'][:12]} on {model['device']} ({model['dtype']})")
print(f"round trip OK: {Path(clip).name} {'x'.join(map(str, reference.shape[:3]))} -> latents "
      f"{'x'.join(map(str, latents.shape))} -> {'x'.join(map(str, decoded.shape[:3]))} frames, "
      f"PSNR {psnr(reference, decoded):.2f} dB (1 DDIM step)")
EOF
echo "gpu_smoke: done"
