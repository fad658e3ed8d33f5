#!/usr/bin/env bash
# Create .venv and install the project with the given extras (default: none).
# torch is pinned to 2.13.0, the CPU build that lies on local disk on our machines.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=${1:+[$1]}
# pip's notes about absent local mirror folders are noise; its errors still fail the script.
.venv/bin/pip install --quiet -e ".${extras}" 2> >(grep -v "^WARNING: Location" >&2)
