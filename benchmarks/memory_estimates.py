"""What the service's admission estimates a whole-clip request costs (`service.memory`,
fitted by `benchmarks.memory_calibration`) at common frame sizes, per device kind with a
fit and preset, with the chunk length it would pick, and the largest square frame that fits
some budgets.

    .venv/bin/python -m benchmarks.memory_estimates
"""

from __future__ import annotations

import sys

from benchmarks import report
from service.domain_errors import TooLarge
from service.memory import COSTS, MAX_CHUNK_FRAMES, SAFETY, Cost, estimate_bytes, padded_pixels, plan

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["service/memory.py", "benchmarks/memory_estimates.py"]

SIZES = [(256, 256), (512, 512), (720, 1280), (1080, 1920)]
BUDGETS_GB = [4, 16, 64]
CASES = [("encode", 1), ("decode", 1), ("decode", 3)]


def largest_side(cost: Cost, steps: int, budget: int) -> int:
    try:
        plan(cost, budget, 1 << 15, 1 << 15, steps)
    except TooLarge as exc:
        return exc.details["max_square_side"]
    return 1 << 15


def estimate_rows() -> list[dict]:
    """One row per device kind with a fit, preset and case: the estimates at SIZES and the
    largest square frame admitted in each of BUDGETS_GB."""
    rows = []
    for kind, costs in COSTS.items():
        for preset in sorted({p for p, _ in costs}, key=["tiny", "small", "base"].index):
            for op, steps in CASES:
                cost = costs[(preset, op)]
                row = {"device": kind, "preset": preset, "op": op, "steps": steps}
                for h, w in SIZES:
                    need = estimate_bytes(cost, padded_pixels(h, w), MAX_CHUNK_FRAMES, steps)
                    row[f"{w}x{h} GiB"] = round(need / 2**30, 2)
                for gb in BUDGETS_GB:
                    row[f"largest square in {gb} GiB"] = largest_side(cost, steps, gb << 30)
                rows.append(row)
    return rows


def main() -> None:
    rows = estimate_rows()
    notes = (f"Estimated peak memory of one request at {MAX_CHUNK_FRAMES}-frame chunks (the most the service "
             f"uses), including the {SAFETY}x safety factor; with less budget the service falls back to 4-frame "
             "chunks before refusing; the largest squares are at 4-frame chunks, the most that is admitted. "
             "The length of the clip does not enter: requests stream.")
    command = "python -m benchmarks.memory_estimates " + " ".join(sys.argv[1:])
    path = report.write("memory_estimates", command.strip(), {}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
