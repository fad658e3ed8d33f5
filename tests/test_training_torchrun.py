"""`torchrun --nproc-per-node 2` (gloo on CPU) launches of `cdt train`, as a user runs them.

The launches run once for the module, since each starts three Python processes that
import torch: a run stopped by SIGTERM sent to rank 1 alone; the same command run again
(what torchrun's restarts and a retried pod do) up to step K; and an uninterrupted run to
step K that exports a checkpoint. The data folder holds real clips (cut from the shared
set with PyAV), an image and a file named .mp4 that is not a video."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cdt_client.client import AsyncClient
from media.video import read_video, write_video
from model import from_pretrained
from service import Settings, create_app
from training.export import TRAINING_FILE
from training.trainer import train

from tests.conftest import REPO
from tests.test_training import CLIPS, log_rows, train_losses, write_image

pytestmark = pytest.mark.timeout(600)
BATCH, WORLD = 2, 2


def torchrun(*args: str) -> list[str]:
    # torch.distributed.run is the module behind the `torchrun` command.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
            "-m", "cli.main", "train", *args, "--device", "cpu", "--quiet"]


def rank_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(v.split("=", 1) for v in (proc / "environ").read_bytes().decode().split("\0") if "=" in v)
        except (OSError, ValueError):
            continue
        if ppid == parent and "RANK" in env:
            pids[int(env["RANK"])] = int(proc.name)
    return pids


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def launches(tmp_path_factory, shared_videos) -> dict:
    root = tmp_path_factory.mktemp("torchrun")
    data = root / "data"
    data.mkdir()
    for name in CLIPS:
        clip = read_video(shared_videos / name, num_frames=12, size=48)
        write_video(data / name, clip.frames, clip.fps, crf=10)
    write_image(data / "still.png")
    (data / "corrupt.mp4").write_bytes(b"\x00not a video" * 200)
    config = {"name": "ddp", "data": {"videos": [str(data)], "val_videos": [str(data / CLIPS[0])], "short_side": 48,
                                      "max_frames": 12, "workers": 1},
              "stages": [{"name": "s1", "steps": 1000, "frames": 5, "crop": 32, "batch": BATCH, "image_ratio": 0.3,
                          "lpips_weight": 0.0}],
              "val": {"every": 1000, "frames": 5, "size": 32, "max_clips": 1}, "optim": {"warmup": 1},
              "train": {"log_every": 1, "threads": 2}}
    (root / "config.json").write_text(json.dumps(config))
    start = ("--config", str(root / "config.json"), "--run-dir", str(root / "stopped"))

    proc = subprocess.Popen(torchrun(*start), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (root / "stopped" / "log.jsonl").exists() or not train_losses(root / "stopped"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)  # rank 1 alone
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = torch.load(root / "stopped" / "state.pt", weights_only=True)["step"]
    stopped_log = train_losses(root / "stopped")
    stop_at = str(stopped_at + 1)
    continued = run(torchrun(*start, "--stop-at", stop_at))
    reference = run(torchrun("--config", str(root / "config.json"), "--run-dir", str(root / "reference"),
                             "--stop-at", stop_at, "--export", str(root / "export")))
    return {"root": root, "data": data, "stopped": (proc.returncode, out, err, stopped_at, stopped_log),
            "continued": continued, "reference": reference}


def test_sigterm_on_one_rank_stops_every_rank_after_a_checkpoint(launches):
    returncode, out, err, stopped_at, stopped_log = launches["stopped"]
    assert returncode == 0, out + err
    assert "Traceback" not in err and "killed by signal" not in err
    assert stopped_at >= 1 and stopped_log[-1][0] == stopped_at  # the checkpoint is of the last logged step


def test_rerunning_the_command_continues_exactly(launches):
    root = launches["root"]
    continued, reference = (torch.load(root / run / "state.pt", weights_only=True) for run in ("stopped", "reference"))
    assert continued["step"] == reference["step"] == launches["stopped"][3] + 1
    assert continued["data"]["cursor"] == reference["data"]["cursor"]
    for part in ("model", "ema"):
        for name, tensor in reference[part].items():
            assert torch.equal(continued[part][name], tensor), (part, name)
    moments = zip(continued["optimizer"]["state"].values(), reference["optimizer"]["state"].values())
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in moments)
    assert train_losses(root / "stopped") == train_losses(root / "reference")
    starts = log_rows(root / "stopped", "start")
    assert [row["step"] for row in starts] == [0, launches["stopped"][3]]  # one row per (re)start


def test_rank_0_alone_logs_the_global_batch_and_throughput(launches):
    root = launches["root"]
    (start,) = log_rows(root / "reference", "start")
    assert (start["world"], start["per_rank_batch"], start["accum"], start["global_batch"]) == (2, 2, 1, 4)
    assert f"batch {BATCH} per rank x 2 x accum 1 = global batch 4" in launches["reference"].stdout
    rows = log_rows(root / "reference")
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))  # one writer: no step twice
    assert all(row["global_batch"] == 4 and row["samples_per_s"] > 0 and row["step_seconds"] > 0 for row in rows)
    expected = {"config.json", "state.pt", "log.jsonl", "loss.png"}
    assert {p.name for p in (root / "reference").iterdir()} <= expected
    assert launches["reference"].stdout.count('"export"') == 1


def test_a_corrupt_file_is_skipped_counted_and_recorded(launches):
    root, corrupt = launches["root"], str(launches["data"] / "corrupt.mp4")
    out = launches["reference"].stdout
    assert out.count(f"data: skipping unreadable {corrupt}") == 1
    assert log_rows(root / "reference")[-1]["unreadable_files"] == 1
    record = json.loads((root / "export" / TRAINING_FILE).read_text())["data"]
    assert record["unreadable_files"] == 1 and list(record["unreadable_examples"]) == [corrupt]
    assert record["replaced_samples"] >= 1 and (record["videos"], record["images"]) == (4, 1)


def test_the_export_is_the_checkpoint_the_service_serves(launches, tmp_path):
    export, clip = launches["root"] / "export", launches["data"] / CLIPS[1]
    record = json.loads((export / TRAINING_FILE).read_text())
    app = create_app(Settings(checkpoint=export))

    async def scenario():
        async with app.router.lifespan_context(app):
            async with AsyncClient("http://service", transport=httpx.ASGITransport(app=app)) as client:
                await client.encode_file(clip, tmp_path / "latents.safetensors", frames=5)
                decoded = await client.decode_file(tmp_path / "latents.safetensors", tmp_path / "out.npy")
                return await client.models(), await client.ready(), decoded

    models, ready, _ = asyncio.run(scenario())
    assert ready and models[0]["hash"] == record["model_hash"] == from_pretrained(export).identity.content_hash
    assert np.load(tmp_path / "out.npy").shape == read_video(clip, num_frames=5).frames.shape
    assert record["config"]["name"] == "ddp" and record["world"] == 2 and record["step"] == launches["stopped"][3] + 1
    (start,) = record["starts"]
    assert (start["step"], start["world"], start["device"]) == (0, 2, "cpu") and start["commit"] != "unknown"


def test_another_world_size_continues_the_data_streams(launches, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(launches["root"] / "reference", run_dir)
    before = torch.load(run_dir / "state.pt", weights_only=True)
    train(run_dir, stop_at=before["step"] + 1, progress=False)  # one process: world 1
    after = torch.load(run_dir / "state.pt", weights_only=True)
    assert "resuming a world-2 run with world 1" in capsys.readouterr().out
    advanced = {pool: after["data"]["cursor"][pool] - before["data"]["cursor"][pool] for pool in ("video", "image")}
    assert sorted(advanced.values()) == [0, BATCH]  # one micro-batch of one pool, per-rank batch x 1 rank
    assert after["world"] == 1 and log_rows(run_dir, "start")[-1]["global_batch"] == BATCH
