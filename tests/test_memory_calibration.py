"""`python -m benchmarks.memory_calibration`: its device check, one CPU measurement, and
the results file's fits per device kind, read from the committed results. The timed
calibration itself is a benchmark and does not run here; its CUDA path has not run at all
(no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import report
from benchmarks.memory_calibration import device_fits, with_device
from benchmarks.memory_estimates import BUDGETS_GB, CASES, estimate_rows
from model import SPACE_FACTOR
from service.domain_errors import TooLarge
from service.memory import COSTS, plan
from tests.conftest import REPO

RESULTS = ("memory_calibration.json", "memory_calibration.md")


def calibration(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.memory_calibration", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cuda_without_cuda_is_a_one_line_error_before_anything_runs():
    assert not torch.cuda.is_available()  # the claim below is about machines without CUDA
    before = {name: (report.RESULTS / name).read_bytes() for name in RESULTS}
    done = calibration("--device", "cuda")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == ("memory_calibration.py: error: --device cuda: CUDA is not available here "
                                            "(this PyTorch build has no CUDA); use --device cpu")
    assert {name: (report.RESULTS / name).read_bytes() for name in RESULTS} == before


def test_a_cpu_measurement_reports_the_peak_rss_over_its_baseline():
    done = calibration("--device", "cpu", "--chunks", "1", "--one", "tiny", "encode", "32", "32", "4", "1")
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["peak"] >= measured["baseline"] > 0


def test_the_fits_are_kept_per_device_kind_and_a_run_replaces_only_its_own():
    results = report.load("memory_calibration")
    held = device_fits(results)
    assert list(held) == ["cpu"] and held["cpu"]["dtype"] == "fp32"  # a CPU run, computed in fp32
    assert held["cpu"]["fits"] == results["fits"] and held["cpu"]["commit"] == results["commit"]

    gpu = {**held["cpu"], "dtype": "bf16", "fits": {"tiny/encode": {"state": 1.0, "frame": 2.0, "fixed": 3}}}
    both = with_device(results, "cuda:NVIDIA A100-SXM4-80GB", gpu)
    assert both == {"cpu": held["cpu"], "cuda:NVIDIA A100-SXM4-80GB": gpu}
    rerun = {**held["cpu"], "commit": "0" * 40}
    after = with_device({**results, "devices": both}, "cpu", rerun)
    assert after == {"cpu": rerun, "cuda:NVIDIA A100-SXM4-80GB": gpu}


def test_the_estimates_table_covers_every_fitted_device_kind_and_admits_what_it_states():
    """`benchmarks.memory_estimates`' rows: one per device kind with a fit, preset and case,
    and each stated largest square is admitted in its budget while the next size up is not."""
    rows = estimate_rows()
    assert len(rows) == sum(len({p for p, _ in costs}) for costs in COSTS.values()) * len(CASES)
    assert {row["device"] for row in rows} == set(COSTS)
    for row in rows:
        cost, steps = COSTS[row["device"]][(row["preset"], row["op"])], row["steps"]
        for gb in BUDGETS_GB:
            side = row[f"largest square in {gb} GiB"]
            plan(cost, gb << 30, side, side, steps)  # admitted: TooLarge would fail the test
            with pytest.raises(TooLarge):
                plan(cost, gb << 30, side + SPACE_FACTOR, side + SPACE_FACTOR, steps)
