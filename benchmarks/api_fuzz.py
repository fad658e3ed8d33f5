"""The API fuzz run of tests/test_api_fuzz.py, as a results file: schemathesis against a real
`cdt serve` on Redis with the valid key, a wrong key and no key (`tests/api_fuzz.py`), and the
cases sent, statuses and error codes per operation, server errors and failed checks.

    .venv/bin/python -m benchmarks.api_fuzz [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks import report
from model import DEFAULT_CHECKPOINT
from tests.api_fuzz import fuzz_api

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
# The server's code (what answers) and the fuzzer's (what is asked).
MEASURES = ["model/", "media/", "service/", "cli/", "tests/api_fuzz.py", "tests/fuzz_hooks.py", "tests/api_fuzz.toml",
            "benchmarks/api_fuzz.py"]


def _counts(counts: dict) -> str:
    return " ".join(f"{key}:{n}" for key, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="schemathesis' seed (the test's is 0)")
    parser.add_argument("--videos", type=Path, default=VIDEOS, help="the shared clips")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = fuzz_api(DEFAULT_CHECKPOINT, args.videos, Path(tmp), seed=args.seed)
    rows = [{**row, "statuses": _counts(row["statuses"]), "error_codes": _counts(row["error_codes"])}
            for row in result["rows"]]
    failures = "; ".join(f"{f['auth']}: {f['code']} {f['title']} ({', '.join(f['operations'])})"
                         for f in result["check_failures"]) or "none"
    after = ("the server was up and ready, and encoded a real clip exactly as the local model does"
             if result["alive_after"] and result["encode_after"] else
             f"**up: {result['alive_after']}, encoded a real clip correctly: {result['encode_after']}**")
    notes = (f"**{result['cases']} cases sent, {result['server_errors']} server errors (5xx)**; failed checks: "
             f"{failures}. After the run {after}. "
             "Schemathesis ran every phase (coverage of each parameter's bounds, fuzzing, and with the valid key "
             "stateful chains through the OpenAPI links) and all its checks (server errors, status codes, content "
             "types, response schemas and headers, positive data accepted, negative data rejected, auth not "
             "ignored, use after delete, resources available) plus `error_is_documented` (tests/fuzz_hooks.py). "
             "Server limits: 9 frames, 32 pixels a side, 1 MB bodies; request bodies are real mp4, npy and "
             "safetensors files, valid and damaged. Cases per operation include the unsupported-method probes.")
    command = "python -m benchmarks.api_fuzz " + " ".join(sys.argv[1:])
    path = report.write("api_fuzz", command.strip(),
                        {key: result[key] for key in ("cases", "server_errors", "generated", "check_failures",
                                                      "alive_after", "encode_after")}, rows, notes,
                        measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
