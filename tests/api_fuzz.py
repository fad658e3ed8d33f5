"""Property-based fuzzing of the HTTP API: schemathesis (`st run`) against a real `cdt serve`
process on Redis, driven by the server's own /openapi.json.

The server runs with API keys on and small limits (frames, sides, upload size), so every valid
generated request stays cheap. Schemathesis runs three times, with the valid key, a wrong key
and no key, through all its phases (coverage of each parameter's bounds, random fuzzing,
stateful chains create -> chunk -> finish -> delete) and all its checks, plus the error-shape
check and the request bodies of `tests/fuzz_hooks.py`. Afterwards the server must still be up,
ready, and encode a real clip exactly as the local model does.

`fuzz_api` is shared by tests/test_api_fuzz.py and `python -m benchmarks.api_fuzz`.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from media import encode_frames, read_video, write_video
from media.latents_file import latents_from_bytes
from model import from_pretrained
from service.memory import MAX_CHUNK_FRAMES
from tests.servers import REPO, Server

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "fuzz-key"
AUTH = {"valid key": KEY, "wrong key": "not-" + KEY, "no key": None}
# Small limits keep a valid request cheap: at most 9 frames of 32x32, 1 MB bodies.
LIMITS = {"max_frames": 9, "max_side": 32, "max_upload_mb": 1, "max_session_log_mb": 1, "session_ttl_s": 600}
CONFIG = Path(__file__).with_name("api_fuzz.toml")
CLIP = "cotracker__cat.mp4"


def real_clip(videos: Path, path: Path) -> Path:
    """9 frames of a real clip at 28x24, as mp4."""
    clip = read_video(videos / CLIP, num_frames=9, size=24, crop=(28, 24))
    write_video(path, clip.frames, clip.fps)
    return path


def run_schemathesis(url: str, key: str | None, seed: int, workdir: Path, model_hash: str,
                     refusals_in_brief: bool) -> dict:
    """One `st run` over every operation; its JSON report, and the answers recorded per operation.
    `refusals_in_brief`: without the valid key, only the examples and 5 fuzzed cases per operation
    (auth refuses them all; the bounds' coverage would only repeat the refusal)."""
    name = "no-key" if key is None else ("valid-key" if key == KEY else "wrong-key")
    record, report = workdir / f"{name}.jsonl", workdir / f"{name}.json"
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
               "--checks", "all", "--seed", str(seed),
               "--report", "json", "--report-json-path", str(report)]
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    if key != KEY:  # stateful chains start from a created session: they need the key
        command += ["--phases", "examples,fuzzing", "--max-examples", "5"] if refusals_in_brief else \
            ["--phases", "examples,coverage,fuzzing"]
    # The hooks import this checkout's packages, its client distribution's (`client/`) included,
    # whichever checkout the environment's editable install points at.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "API_FUZZ_RECORD": str(record),
           "API_FUZZ_MODEL_HASH": model_hash, "PYTHONPATH": f"{REPO / 'client'}:{REPO}"}
    with open(workdir / f"{name}.log", "wb") as log:
        subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    answers = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for answer in answers:
        statuses[answer["operation"]][answer["status"]] += 1
        if answer["code"] is not None:
            codes[answer["operation"]][answer["code"]] += 1
    output = (workdir / f"{name}.log").read_text(errors="replace")
    failed = output[output.find("= FAILURES ="):output.find("= SUMMARY =")] if "= FAILURES =" in output else ""
    return {"report": json.loads(report.read_text()), "statuses": statuses, "codes": codes, "failed": failed}


def check_encode(url: str, clip: Path, checkpoint: Path) -> bool:
    """The server encodes a real mp4 to the latents the local model makes of it, bit for bit:
    the local encode streams the clip in the server's chunks (MAX_CHUNK_FRAMES frames, as a
    clip this small runs there), so both run the same operations in the same order."""
    response = httpx.post(url + "/v1/encode", content=clip.read_bytes(), timeout=120,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "video/mp4"})
    if response.status_code != 200:
        return False
    served = latents_from_bytes(response.content)
    video = read_video(clip)
    chunks = [video.frames[i : i + MAX_CHUNK_FRAMES] for i in range(0, len(video.frames), MAX_CHUNK_FRAMES)]
    model, identity = from_pretrained(checkpoint)
    local = encode_frames(model, identity.content_hash, chunks, video.fps, streamed=True)
    return served.latents.shape == local.latents.shape and bool((served.latents == local.latents).all())


def fuzz_api(checkpoint: Path, videos: Path, workdir: Path, seed: int = 0, redis_url: str = REDIS_URL,
             refusals_in_brief: bool = False) -> dict:
    """Fuzz a fresh server with each of AUTH; what was sent, what came back, what failed."""
    prefix = f"cdt-fuzz-{secrets.token_hex(4)}:"
    clip = real_clip(videos, workdir / "clip.mp4")
    try:
        with Server(checkpoint, workdir / "server.log", api_keys=KEY, redis_url=redis_url,
                    session_key_prefix=prefix, **LIMITS) as server:
            models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
            # The three runs at once: the fuzzers' own generation, not the server, is most of the
            # time, and a replica serves concurrent callers anyway.
            with ThreadPoolExecutor(len(AUTH)) as runners:
                started = {name: runners.submit(run_schemathesis, server.url, key, seed, workdir,
                                                models["models"][0]["hash"], refusals_in_brief)
                           for name, key in AUTH.items()}
                runs = {name: run.result() for name, run in started.items()}
            alive = server.process.poll() is None and all(
                httpx.get(server.url + path).status_code == 200 for path in ("/healthz", "/readyz"))
            encodes = check_encode(server.url, clip, checkpoint)
    finally:
        store = redis.Redis.from_url(redis_url)
        for key in store.scan_iter(f"{prefix}*"):
            store.delete(key)
    return summarise(runs, alive, encodes)


def summarise(runs: dict[str, dict], alive: bool, encodes: bool) -> dict:
    """Cases, statuses and error codes per auth and operation; the checks that failed."""
    rows, failures = [], []
    for name, run in runs.items():
        for operation, statuses in sorted(run["statuses"].items()):
            rows.append({"auth": name, "operation": operation, "cases": sum(statuses.values()),
                         "server_errors": sum(n for s, n in statuses.items() if s >= 500),
                         "statuses": dict(sorted(statuses.items())),
                         "error_codes": dict(sorted(run["codes"][operation].items()))})
        report = run["report"]
        failures += [{"auth": name, "code": f["code"], "title": f["title"], "count": f["count"],
                      "operations": f["operations"]} for f in report["failures"]]
        failures += [{"auth": name, "code": "error", "title": str(e), "count": 1, "operations": []}
                     for e in report["errors"]]
    return {"cases": sum(r["cases"] for r in rows), "server_errors": sum(r["server_errors"] for r in rows),
            "generated": {name: run["report"]["test_cases"]["generated"] for name, run in runs.items()},
            "check_failures": failures, "alive_after": alive, "encode_after": encodes, "rows": rows,
            "failed": "".join(run["failed"] for run in runs.values())}
