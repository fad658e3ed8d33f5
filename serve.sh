#!/usr/bin/env bash
# One command from a fresh clone to a running service: install, then `cdt serve` on the
# shipped checkpoint, on the CPU, with the in-process session store (set CDT_REDIS_URL
# for Redis). Arguments go to `cdt serve` (e.g. --host 0.0.0.0 --port 8000).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/cdt serve "$@"
