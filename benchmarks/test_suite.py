"""How long the test suite takes as CI runs it (`scripts/test.sh`: the whole suite, then the
exactness tests on unvectorised kernels and one thread), with each pass's summary line and
the slowest tests, so the README can state the suite's time and the machine it was measured on.

    .venv/bin/python -m benchmarks.test_suite

Run it on an otherwise idle machine: every test shares the two cores with nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from benchmarks import report
from media import provenance

SLOWEST = 15
MEASURES = ["tests/", "scripts/test.sh", "model/", "media/", "service/", "cli/", "training/",
            "benchmarks/test_suite.py"]
# Set in the environment, these choose the kernels and threads of the first pass (the second
# pass sets its own).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*) in ([0-9.]+)s", re.M)
DURATION = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+(\S+)$", re.M)


def main() -> None:
    started = time.perf_counter()
    result = subprocess.run(["scripts/test.sh", f"--durations={SLOWEST}", "-p", "no:cacheprovider"],
                            cwd=provenance.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    passes = [{"pass": name, "summary": summary, "seconds": float(seconds)}
              for name, (summary, seconds) in zip(("whole suite", "exactness, default kernels, 1 thread"),
                                                  SUMMARY.findall(result.stdout))]
    slowest = sorted(((float(s), f"{phase} {test}") for s, phase, test in DURATION.findall(result.stdout)),
                     reverse=True)[:SLOWEST]
    chosen = {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ}
    notes = (f"**scripts/test.sh took {wall / 60:.1f} minutes** (exit status {result.returncode}"
             + "".join(f", {name}={value}" for name, value in chosen.items()) + "). "
             "Slowest steps over both passes: "
             + "; ".join(f"{name} {seconds:.1f} s" for seconds, name in slowest) + ".")
    command = " ".join([*(f"{name}={value}" for name, value in chosen.items()), "python -m benchmarks.test_suite"])
    path = report.write("test_suite", command,
                        {"wall_seconds": round(wall, 1), "exit_status": result.returncode, "environment": chosen},
                        passes, notes,
                        measures=MEASURES)
    print(path.read_text())
    if result.returncode:
        print(result.stdout[-5000:])


if __name__ == "__main__":
    main()
