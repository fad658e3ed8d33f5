"""Run the whole benchmark suite and write docs/benchmarks.md (plus each benchmark's
JSON and Markdown under benchmarks/results/).

    .venv/bin/pip install -e ".[bench]"      # diffusers, for the model-speed baselines
    .venv/bin/python -m benchmarks.run_all    # everything (about an hour on 2 CPU cores)
    .venv/bin/python -m benchmarks.run_all --only precision session_cost
    .venv/bin/python -m benchmarks.run_all --compose-only   # rebuild the page from results/
    .venv/bin/python -m benchmarks.run_all --stale          # results older than their code

Each benchmark runs in its own process, one after another, so none measures while
another computes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from media import provenance

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# Evaluations the docs quote (`cdt eval --output`), checked by --stale like the results.
EVALS = DOC.parent / "eval"

# name -> arguments of `python -m benchmarks.<name>`
SUITE: dict[str, list[str]] = {
    "model_speed": [],
    "precision": [],
    "stream_memory": [],
    "encode_memory": [],
    "memory_calibration": [],
    "memory_estimates": [],
    "request_memory": [],
    "http_overhead": [],
    "device_pool": [],
    "served_models": [],
    "fairness": [],
    "batching": [],
    "session_cost": [],
    "session_moves": [],
    "load_test": [],
    "train_speed": [],
    "dataset_encoding": [],
    "profile_cdt": [],
    "api_fuzz": [],
    "test_suite": [],
}


def _reconstruct_row(data: dict, model: str, dtype: str) -> dict:
    """A model's reconstruct row at the largest size that was timed; a projection only
    when nothing was."""
    rows = [r for r in data["rows"] if r["op"] == "reconstruct" and model in r["model"] and r["dtype"] == dtype]
    return max(rows, key=lambda r: (not _projected(r), int(r["shape"].split("x")[-1])))


def _projected(row: dict) -> bool:
    return "projected" in str(row["seconds"])


def _speedup(data: dict, baseline: str, dtype: str) -> tuple[float, str]:
    row = _reconstruct_row(data, baseline, dtype)
    return row["CDT speedup (x)"], f"{row['shape']}{' (projected)' if _projected(row) else ''}"


def targets() -> list[dict]:
    """Each target with its measured value, from the results on disk."""
    out = []

    def add(claim: str, goal: str, value, ok, source: str) -> None:
        out.append({"target": claim, "goal": goal, "measured": value,
                    "met": "yes" if ok else ("not measured" if ok is None else "**no**"), "source": source})

    speed = report.load("model_speed")
    dtypes = sorted({r["dtype"] for r in speed["rows"]}, reverse=True) if speed else ["fp32"]  # fp32 first
    for dtype in dtypes:
        for baseline, goal in (("Hunyuan", 3.0), ("Wan", 1.5)):
            claim = f"CDT-S reconstruct vs {baseline} VAE, {dtype}"
            if speed:
                value, where = _speedup(speed, baseline, dtype)
                # A projection (FLOPs / achieved rate) is not a measurement: it meets nothing.
                add(claim, f">= {goal}x", f"{value:.2f}x at {where}", None if "projected" in where else value >= goal,
                    "model_speed")
            else:
                add(claim, f">= {goal}x", "-", None, "model_speed")
    if speed and {"fp32", "bf16"} <= set(dtypes):
        # CDT-S, interleaved with the baselines at the largest timed size: the model the targets are about.
        fp32, bf16 = (_reconstruct_row(speed, "CDT-S", dtype) for dtype in ("fp32", "bf16"))
        if fp32["shape"] == bf16["shape"] and not (_projected(fp32) or _projected(bf16)):
            ratio = fp32["seconds"] / bf16["seconds"]
            add("bf16 vs fp32 speed, CDT-S reconstruct", ">= 1.8x", f"{ratio:.2f}x ({bf16['shape']})", ratio >= 1.8,
                "model_speed")
    precision = report.load("precision")
    bf16_rows = [r for r in precision["rows"] if r["case"].startswith("bf16")] if precision else []
    best = max(bf16_rows, key=lambda r: r["speedup"], default=None)  # the faster bf16 layout
    add("bf16 vs fp32 speed, tiny", ">= 1.8x",
        f"{best['speedup']:.2f}x ({best['case'].split(' (')[0]}, {best['shape']})" if best else "-",
        best["speedup"] >= 1.8 if best else None, "precision")
    memory = report.load("stream_memory")
    if memory:
        rows = memory["rows"]
        add(f"streaming peak RSS, {rows[-1]['frames']} vs {rows[0]['frames']} frames", "<= 1.15",
            f"{memory['ratio']:.3f}", memory["ratio"] <= 1.15, "stream_memory")
    overhead = report.load("http_overhead")
    if overhead:
        add("HTTP overhead (time outside model jobs / compute)", "< 5%", f"{overhead['outside_ratio']:.2%} "
            f"(end-to-end ratio {overhead['ratio']:.3f})", overhead["outside_ratio"] < 0.05, "http_overhead")
    pool = report.load("device_pool")
    if pool:
        add("single-request latency (17 frames, encode and decode) vs the service before the host pool", "<= 1.05x",
            f"{pool['latency_ratio']:.3f}x (worst)", pool["latency_ratio"] <= 1.05, "device_pool")
    fairness = report.load("fairness")
    if fairness:
        add("key B's p99 latency while key A floods / alone", "<= 3x", f"{fairness['fair_p99_ratio']:.2f}x",
            fairness["fair_p99_ratio"] <= 3, "fairness")
    batching = report.load("batching")
    if batching:
        for kind, gain in batching["gains"].items():
            add(f"8 {kind} sessions' chunks: throughput with batching (wait 0 ms) / without", "> 1x (it pays)",
                f"{gain:.2f}x", gain > 1, "batching")
    requests = report.load("request_memory")
    if requests:
        frames = sorted({r["frames"] for r in requests["rows"]})
        for endpoint, ratio in requests["rss_ratios"].items():
            add(f"{endpoint} peak RSS, {frames[-1]} vs {frames[0]} frames (256x256)", "<= 1.2", f"{ratio:.3f}",
                ratio <= 1.2, "request_memory")
        for endpoint, by_length in requests["time_per_frame_vs_whole_clip"].items():
            worst = max(by_length.values())
            add(f"{endpoint} time per frame vs the whole-clip service", "<= 1.10x", f"{worst:.3f}x (worst length)",
                worst <= 1.10, "request_memory")
    cost = report.load("session_cost")
    if cost:
        add("session store time on the response path / chunk compute (hot replica)", "<= 5%",
            f"{cost['worst_store_share']:.2%}", cost["worst_store_share"] <= 0.05, "session_cost")
        add("bytes to and from Redis per chunk / (chunk body + response)", "<= 1.5x",
            f"{cost['worst_redis_bytes_ratio']:.2f}x", cost["worst_redis_bytes_ratio"] <= 1.5, "session_cost")
        for name, scale in cost["scale"].items():
            add(f"Redis memory of a {name} session / its input window", "<= 2x",
                f"{scale['redis_over_window']:.2f}x", scale["redis_over_window"] <= 2, "session_cost")
    moves = report.load("session_moves")
    if moves:  # sessions moving under the default settings, snapshots in a shared directory
        worst, targets = moves["worst"], moves["targets"]
        for key, what in (("drain_stall", "stall of a session's next chunk after its replica drained (SIGTERM), "
                                          "in chunk computes"),
                          ("kill_stall", "stall after its replica was killed at the policy's worst moment, "
                                         "in chunk computes"),
                          ("snapshot_traffic", "snapshot bytes written / the chunks' own bytes (body + response)"),
                          ("redis_over_window", "Redis memory of a tiny 256-512 px session / its input window, "
                                                "snapshots in a directory")):
            add(what, f"<= {targets[key]:g}x", f"{worst[key]:.2f}x", worst[key] <= targets[key], "session_moves")
    fuzz = report.load("api_fuzz")
    if fuzz:
        add("API fuzzing (schemathesis, with and without keys): cases, server errors, failed checks", "0 5xx",
            f"{fuzz['cases']} cases, {fuzz['server_errors']} 5xx, {len(fuzz['check_failures'])} failed checks",
            fuzz["server_errors"] == 0 and not fuzz["check_failures"], "api_fuzz")
    load_test = report.load("load_test")
    if load_test:
        worst = load_test["rows"][-1]
        add("4x overload: 429s, never 5xx", "0 5xx", f"{worst['share_429']:.0%} 429, "
            f"{load_test['errors_5xx']} 5xx, peak RSS {worst['peak_rss_mb_max']:.0f} MB",
            load_test["errors_5xx"] == 0 and worst["rejected_429"] > 0, "load_test")
    return out


def compose() -> Path:
    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.run_all` (each section names the command that produced it; "
             "rerun one with `python -m benchmarks.run_all --only NAME`) and the machine it ran on: our "
             "machines differ between sessions (AMD EPYCs with and without AVX512-BF16, an Intel Xeon with "
             "AVX512-BF16/AMX), so compare numbers within a section. Ratios are measured side by side in one "
             "run; absolute seconds on a shared 2-core machine are noisy.", "", "## Targets", ""]
    rows = targets()
    keys = list(rows[0])
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    for name in SUITE:
        path = report.RESULTS / f"{name}.md"
        if path.is_file():
            lines += ["", "#" + path.read_text().strip()]  # each result's title becomes a section
            if "cpu" not in report.load(name)["machine"]:
                lines += ["", "Machine: not recorded (measured before results named their CPU)."]
        else:
            lines += ["", f"## {name}", "", "Not run yet."]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    return DOC


def stale() -> dict[str, list[str]]:
    """Each result whose measured code (the paths it records) changed in a commit after
    the one it was measured at, with those commits: its figures describe other code."""
    out = {}
    for path in sorted([*report.RESULTS.glob("*.json"), *EVALS.glob("*.json")]):
        data = json.loads(path.read_text())
        changes = provenance.changed_since(data.get("commit", "unknown"), data.get("measures", []))
        if changes:
            out[path.stem] = changes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SUITE), help="run just these")
    parser.add_argument("--compose-only", action="store_true", help="only rebuild docs/benchmarks.md")
    parser.add_argument("--stale", action="store_true",
                        help="list the results measured before the last change to the code they measure; "
                             "print nothing when every result is current")
    args = parser.parse_args()
    if args.stale:
        for name, changes in stale().items():
            print(f"{name}: changed since measured: {'; '.join(changes)}")
        return
    if not args.compose_only:
        for name in args.only or SUITE:
            start = time.monotonic()
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *SUITE[name]], check=True)
            print(f"== {name}: {time.monotonic() - start:.0f} s", flush=True)
    print(f"wrote {compose()}")


if __name__ == "__main__":
    main()
