"""Write a benchmark's results as JSON (for machines) and Markdown (for the docs)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from media import provenance

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(name: str) -> dict | None:
    """results/NAME.json, or None if that benchmark has not written one."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write(name: str, command: str, data: dict, table: list[dict], notes: str = "", *,
          measures: list[str]) -> Path:
    """Write results/NAME.json and .md. `measures`: the repository paths whose code the
    figures describe (the benchmark's own module included), for `run_all --stale`."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, **provenance.record(command, measures), **data, "rows": table}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {name}", "", *header(payload), *table_lines(table)]
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def header(record: dict) -> list[str]:
    """The Markdown lines of a `provenance.record`: command, commit, date, machine, measures."""
    return [f"Command: `{record['command']}`", "", f"Commit: {record['commit']}, date: {record['date']}", "",
            f"Machine: {json.dumps(record['machine'])}", "", f"Measures: {', '.join(record['measures'])}", ""]


def table_lines(table: list[dict]) -> list[str]:
    """A Markdown table of rows sharing the first row's keys (none for no rows)."""
    if not table:
        return []
    keys = list(table[0])
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(_fmt(row[k]) for k in keys) + " |" for row in table)]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
