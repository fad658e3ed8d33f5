# What scripts/gpu_smoke.sh and scripts/gpu_check.sh share, sourced by both after they set
# REPO (the repository) and NAME (the prefix of their messages and of their temp directory).

die() { echo "$NAME: error: $*" >&2; exit 1; }

# PYTHON: as given, else the repository's .venv, else python3; it must import the project.
use_python() {
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    "$PYTHON" -c "import cli.main" 2>/dev/null \
        || die "$PYTHON cannot import the project: give PYTHON=..., or run scripts/setup.sh"
}

# require_gpus WHAT_CPU_RUNS: set GPUS to the GPUs torch sees, none being an error.
require_gpus() {
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    [ "$GPUS" -gt 0 ] || die "DEVICE=cuda but torch sees no CUDA device (DEVICE=cpu runs $1 on the CPU)"
}

# open_run_dir: RUN_DIR as given (created), else a temp directory. On exit, also on Ctrl-C or
# SIGTERM, the background process CHILD_PID (when set) is stopped and RUN_DIR removed unless KEEP=1.
open_run_dir() {
    if [ -n "${RUN_DIR:-}" ]; then
        mkdir -p "$RUN_DIR"
    else
        RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/$NAME.XXXXXX")
    fi
    CHILD_PID=
    trap close_run_dir EXIT
    trap 'exit 130' INT TERM  # through the EXIT trap
}

close_run_dir() {
    if [ -n "$CHILD_PID" ] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill "$CHILD_PID" 2>/dev/null || true
        wait "$CHILD_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "$NAME: kept $RUN_DIR"; else rm -rf "$RUN_DIR"; fi
}
