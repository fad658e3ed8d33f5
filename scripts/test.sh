#!/usr/bin/env bash
# The test suite as CI runs it: every test on this machine's native kernels, then the tests
# that compare two computations of one result (`-m exactness`, see tests/tolerance.py) again
# on torch's unvectorised kernels with one thread, which round floats as other CPUs and
# thread counts do. That pass runs one single-threaded pytest worker per core (pytest-xdist).
# Arguments go to both pytest runs (e.g. `-x`, `--durations=20`).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@"
ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m exactness -n "$(nproc)" "$@"
