"""The results file of `scripts/gpu_check.sh`, assembled from its stages.

The script runs each stage as a process and records in its run directory, per stage NAME:
`NAME.log` (its output), `NAME.rc` (exit code, start and end times) or `NAME.skipped` (the
reason). A stage's Python module adds `NAME.json`, its table (`write_stage`). Then

    python -m benchmarks.gpu_check --run-dir DIR --out FILE --command CMD --mode TEXT STAGE...

joins them, with the run's provenance (command, commit, date, CPU, torch, CUDA, cuDNN and
GPUs), into one Markdown file, and exits 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import report
from media import provenance

# The code a gpu_check result describes (`python -m benchmarks.run_all --stale` reads it).
MEASURES = ["model/", "media/", "service/", "benchmarks/gpu_check.py", "benchmarks/gpu_parity.py",
            "benchmarks/gpu_service.py", "benchmarks/gpu_throughput.py", "scripts/gpu_check.sh",
            "scripts/gpu_smoke.sh"]
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
LOG_TAIL_LINES = 40


def one_device(name: str) -> torch.device:
    """The device `name` names, a GPU with its index (`cuda`: the current one, cuda:0 unless set)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def write_stage(run_dir: str | Path, name: str, rows: list[dict], notes: str = "") -> int:
    """Write stage `name`'s table to the run directory; the stage's exit status: 1 when a row's
    `outcome` is `failed`, else 0."""
    failed = any(row.get("outcome") == FAILED for row in rows)
    record = {"stage": name, "outcome": FAILED if failed else PASSED, "rows": rows, "notes": notes}
    Path(run_dir, f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return int(failed)


def check(rows: list[dict], name: str, fn, *args) -> object:
    """Run one check of a stage, `fn(*args)` giving (outcome, detail, value); its row, with its
    time, is added to `rows` (an exception is a failed row naming it). Returns the check's
    value (None when it raised)."""
    start = time.perf_counter()
    try:
        outcome, detail, value = fn(*args)
    except Exception as exc:  # any failure of a check is its result, and the next checks still run
        outcome, detail, value = FAILED, f"{type(exc).__name__}: {exc}", None
    # One line of a Markdown table cell, whatever the detail quotes (a server log, a response body).
    detail = " ".join(str(detail).split()).replace("|", "\\|")
    rows.append({"check": name, "outcome": outcome, "seconds": round(time.perf_counter() - start, 1),
                 "detail": detail})
    print(f"{name}: {outcome}: {detail}", flush=True)
    return value


def verdict(ok: bool) -> str:
    return PASSED if ok else FAILED


class Stage:
    """What the run directory says of one stage."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        skipped, rc, table = (run_dir / f"{name}.{suffix}" for suffix in ("skipped", "rc", "json"))
        log = run_dir / f"{name}.log"
        self.log = log.read_text(errors="replace").splitlines() if log.is_file() else []
        self.table = json.loads(table.read_text()) if table.is_file() else None
        self.seconds: float | None = None
        if skipped.is_file():
            self.outcome, self.reason = SKIPPED, skipped.read_text().strip()
            return
        if not rc.is_file():
            self.outcome, self.reason = FAILED, "did not run to its end"
            return
        code, start, end = rc.read_text().split()
        self.seconds = float(end) - float(start)
        if self.table is not None and self.table["outcome"] == FAILED:
            self.outcome, self.reason = FAILED, "a row of its table failed"
        elif int(code) != 0:
            self.outcome, self.reason = FAILED, f"exit code {code}"
        else:
            self.outcome, self.reason = PASSED, ""

    def row(self) -> dict:
        outcome = f"{self.outcome}: {self.reason}" if self.reason else self.outcome
        return {"stage": self.name, "outcome": outcome,
                "seconds": round(self.seconds, 1) if self.seconds is not None else ""}

    def section(self) -> list[str]:
        lines = [f"## {self.name}", ""]
        if self.outcome == SKIPPED:
            return lines + [f"Skipped: {self.reason}.", ""]
        if self.table is not None:
            lines += report.table_lines(self.table["rows"])
            if self.table["notes"]:
                lines += ["", self.table["notes"]]
            lines.append("")
        if self.table is None or self.outcome == FAILED:
            # A stage without a table reports in its output (scripts/gpu_smoke.sh); a failed one
            # shows where it stopped.
            shown = f", its last {LOG_TAIL_LINES} lines" if len(self.log) > LOG_TAIL_LINES else ""
            lines += [f"Output{shown}:", "", "```", *self.log[-LOG_TAIL_LINES:], "```", ""]
        return lines


def write_report(run_dir: Path, out: Path, command: str, mode: str, names: list[str],
                 budget_minutes: float | None = None) -> bool:
    """Write the results file, the total time set against `budget_minutes` if given; whether
    every stage that ran passed."""
    stages = [Stage(run_dir, name) for name in names]
    failed = [stage.name for stage in stages if stage.outcome == FAILED]
    ran = sum(stage.outcome != SKIPPED for stage in stages)
    total = sum(stage.seconds or 0.0 for stage in stages)
    outcome = f"**failed**: {', '.join(failed)}" if failed else "**passed**"
    budget = "" if budget_minutes is None else \
        f", {'within' if total <= 60 * budget_minutes else '**over**'} the budget of {budget_minutes:g} minutes"
    lines = ["# gpu_check", "", *report.header(provenance.record(command, MEASURES)),
             f"Devices: {json.dumps(provenance.accelerators())}", "", f"Mode: {mode}", "",
             f"Outcome: {outcome} ({ran} of {len(stages)} stages ran), {total:.0f} s in all{budget}.", "",
             *report.table_lines([stage.row() for stage in stages]), ""]
    for stage in stages:
        lines += stage.section()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return not failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the results file (Markdown)")
    parser.add_argument("--command", required=True, help="the command that ran, as the results file records it")
    parser.add_argument("--mode", required=True, help="what this run covers (full on a GPU, or reduced)")
    parser.add_argument("--budget-minutes", type=float, help="the time the stages should take in all")
    parser.add_argument("stages", nargs="+")
    args = parser.parse_args()
    passed = write_report(args.run_dir, args.out, args.command, args.mode, args.stages, args.budget_minutes)
    print(f"gpu_check: {'passed' if passed else 'FAILED'}; results in {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
