"""Training pipeline on real clips: data shapes, exact resume, 2-process gloo DDP, export.

Fixture clips are cut from the shared set with PyAV (12 frames, short side 48) into a
tmp dir; runs use the tiny preset at 5 frames x 32x32, 2 optimizer steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cli.main import main as cdt_main
from media.video import read_video, write_video
from model import CDTConfig, build_model, from_pretrained, save_pretrained
from training.config import load_config
from training.data import ClipBatches, build_cache, list_videos
from training.losses import Objective, build_lpips
from training.trainer import export, prepare_run, train

from tests.conftest import REPO

CLIPS = ("cotracker__cat.mp4", "propainter__tennis.mp4", "cotracker__bear.mp4")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, shared_videos):
    out = tmp_path_factory.mktemp("clips")
    for name in CLIPS:
        clip = read_video(shared_videos / name, num_frames=12, size=48)
        write_video(out / name, clip.frames, clip.fps, crf=10)
    return out


def tiny_config(clip_dir, cache_dir, **extra):
    overrides = {
        "data.videos": [str(clip_dir)], "data.val_videos": [str(clip_dir)], "data.cache_dir": str(cache_dir),
        "data.short_side": 48, "data.max_frames": 12, "data.decode_workers": 1, "data.workers": 0,
        "stages": [{"name": "s1", "steps": 2, "frames": 5, "crop": 32, "batch": 2, "image_ratio": 0.0,
                    "lpips_weight": 0.0}],
        "val.frames": 5, "val.size": 32, "val.max_clips": 1, "val.every": 1000,
        "optim.warmup": 1, "train.log_every": 1, "train.threads": 2, **extra,
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_cache_and_clip_shapes(clip_dir, tmp_path):
    files = build_cache(list_videos([clip_dir]), tmp_path / "cache", short_side=40, max_frames=10, workers=2)
    arrays = [np.load(f) for f in files]
    assert [min(a.shape[1:3]) for a in arrays] == [40, 40, 40]
    assert [a.shape[0] for a in arrays] == [10, 10, 10] and all(a.dtype == np.uint8 for a in arrays)

    stage = {"frames": 9, "crop": 32, "batch": 3, "image_ratio": 0.25}
    data = ClipBatches(files, lambda i: stage, seed=0, rank=0, max_stride=3)
    shapes = [tuple(data[i].shape) for i in range(200)]
    assert set(shapes) == {(3, 3, 9, 32, 32), (3, 3, 1, 32, 32)}
    image_share = shapes.count((3, 3, 1, 32, 32)) / len(shapes)
    assert 0.15 < image_share < 0.35
    batch = data[7]
    assert batch.min() >= -1 and batch.max() <= 1 and batch.std() > 0.05
    assert torch.equal(batch, data[7])  # a batch is a function of its index: resumable
    assert not torch.equal(batch, ClipBatches(files, lambda i: stage, seed=0, rank=1, max_stride=3)[7])


def test_channel_permute_reorders_colours_of_the_same_clip(clip_dir, tmp_path):
    files = build_cache(list_videos([clip_dir]), tmp_path / "cache", short_side=40, max_frames=10, workers=2)
    stage = {"frames": 5, "crop": 32, "batch": 1, "image_ratio": 0.0}
    plain = ClipBatches(files, lambda i: stage, seed=0, max_stride=3)
    permuted = ClipBatches(files, lambda i: stage, seed=0, max_stride=3, channel_permute=1.0)
    orders = set()
    for i in range(20):
        a, b = plain[i][0], permuted[i][0]  # (3,T,H,W); the permutation is drawn after the crop
        order = tuple(next(c for c in range(3) if torch.equal(b[k], a[c])) for k in range(3))
        orders.add(order)
    assert len(orders) > 2  # not always the identity, not one fixed order


def test_resume_continues_exactly(clip_dir, tmp_path):
    config = tiny_config(clip_dir, tmp_path / "cache")
    whole = prepare_run(tmp_path / "whole", config)
    model_whole, _ = train(whole, progress=False)

    parts = prepare_run(tmp_path / "parts", config)
    train(parts, stop_at=1, progress=False)
    state = torch.load(parts / "state.pt", weights_only=True)
    assert state["step"] == 1
    with (parts / "log.jsonl").open("a") as log:  # as if killed after logging step 2, before its checkpoint
        log.write(json.dumps({"kind": "train", "step": 2, "loss": -1.0}) + "\n")
    model_parts, _ = train(parts, progress=False)  # a fresh model, optimizer and loader from state.pt

    assert train_losses(parts) == train_losses(whole)
    for (name, a), b in zip(model_whole.state_dict().items(), model_parts.state_dict().values()):
        assert torch.equal(a, b), name

    served = tmp_path / "served"
    info = export(parts, served)
    loaded = from_pretrained(served)
    ema = torch.load(parts / "state.pt", weights_only=True)["ema"]
    assert info["step"] == 2 and loaded.content_hash() == info["hash"]
    name = "encoder.stem.conv.conv.weight"
    assert torch.equal(loaded.state_dict()[name], ema[name].to(torch.bfloat16).float())
    assert cdt_main(["export", "--run", str(parts), "-o", str(tmp_path / "cli")]) == 0
    assert from_pretrained(tmp_path / "cli").content_hash() == info["hash"]


def test_a_run_written_before_an_option_existed_resumes_with_its_default(clip_dir, tmp_path):
    run = prepare_run(tmp_path / "run", tiny_config(clip_dir, tmp_path / "cache"))
    stored = json.loads((run / "config.json").read_text())
    del stored["data"]["channel_permute"]  # as written before the option was added
    (run / "config.json").write_text(json.dumps(stored))
    train(run, stop_at=1, progress=False)
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 1


def test_cli_resume_may_change_the_thread_count(clip_dir, tmp_path):
    run = prepare_run(tmp_path / "run", tiny_config(clip_dir, tmp_path / "cache"))
    before = torch.get_num_threads()
    try:
        train(run, stop_at=1, progress=False)
        assert torch.get_num_threads() == 2  # the config's train.threads
        assert cdt_main(["train", "--resume", str(run), "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert [step for step, _ in train_losses(run)] == [1, 2]


def test_cli_resume_may_switch_bf16_autocast(clip_dir, tmp_path, capsys):
    """Two copies of one checkpoint resumed for the same step, one with bf16 autocast:
    same batch, different arithmetic, so a close but different loss."""
    run = prepare_run(tmp_path / "run", tiny_config(clip_dir, tmp_path / "cache"))
    train(run, stop_at=1, progress=False)
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    assert cdt_main(["train", "--resume", str(run), "--stop-at", "2", "--quiet"]) == 0
    assert "bf16 autocast off" in capsys.readouterr().out
    assert cdt_main(["train", "--resume", str(twin), "--stop-at", "2", "--bf16", "on", "--quiet"]) == 0
    assert "bf16 autocast on" in capsys.readouterr().out
    (step, fp32), (twin_step, bf16) = train_losses(run)[-1], train_losses(twin)[-1]
    assert step == twin_step == 2
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.05)


def test_sigterm_to_the_process_group_checkpoints_and_exits_cleanly(clip_dir, tmp_path):
    """systemd or `kill -- -PGID` signal the trainer and its data workers together."""
    config = tiny_config(clip_dir, tmp_path / "cache", **{"data.workers": 1, "stages.0.steps": 10_000})
    run = prepare_run(tmp_path / "run", config)
    train(run, stop_at=1, progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "--resume", str(run), "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").exists() or len(train_losses(run)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "killed by signal" not in err
    saved = torch.load(run / "state.pt", weights_only=True)["step"]
    assert saved >= 2 and saved == train_losses(run)[-1][0]


def test_non_finite_gradients_skip_the_update_and_then_stop_the_run(clip_dir, tmp_path):
    config = tiny_config(clip_dir, tmp_path / "cache", **{"loss.kl_weight": float("inf"), "stages.0.steps": 100})
    run = prepare_run(tmp_path / "run", config)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FloatingPointError, match="20 steps in a row"):
        train(run, progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # a failed run gives the caller its handlers back
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(i, 1) for i in range(1, 20)]
    assert not (run / "state.pt").exists()  # nothing was saved from a broken run


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    model, stats = train(run_dir, progress=False)
    torch.save({"params": model.state_dict(), "loss": stats["loss"]}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_stay_in_sync(clip_dir, tmp_path):
    config = tiny_config(clip_dir, tmp_path / "cache", **{"train.threads": 2})
    build_cache(list_videos([clip_dir]), tmp_path / "cache", 48, 12)  # once, before the ranks start
    run_dir = prepare_run(tmp_path / "run", config)
    mp.spawn(_ddp_worker, args=(2, free_port(), str(run_dir), str(tmp_path)), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank trained on its own clips
    saved = torch.load(run_dir / "state.pt", weights_only=True)["model"]  # written by rank 0
    for name, p0 in ranks[0]["params"].items():
        assert torch.equal(p0, ranks[1]["params"][name]), name
        assert torch.equal(p0, saved[name]), name
    torch.manual_seed(config["seed"])
    initial = build_model(CDTConfig.from_preset("tiny"), "cdt").state_dict()
    assert not torch.equal(initial["unet.out_conv.conv.weight"], ranks[0]["params"]["unet.out_conv.conv.weight"])


def test_lpips_term_adds_to_the_loss_and_trains_the_decoder_only(alexnet_weights):
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset("tiny"), "vae")
    lpips = build_lpips(str(alexnet_weights))
    objective = Objective(model, load_config(None, [])["loss"], lpips)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    plain, _ = objective(video, torch.Generator().manual_seed(1), 0.0)
    loss, stats = objective(video, torch.Generator().manual_seed(1), 0.5)
    assert stats["lpips"] > 0 and loss.item() == pytest.approx(plain.item() + 0.5 * stats["lpips"], rel=1e-5)
    (loss - plain).backward()  # the gradient of the LPIPS term alone
    assert model.vae_decoder.out_conv.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.features.parameters())  # the LPIPS network stays frozen


def test_a_run_with_lpips_logs_it(clip_dir, tmp_path, alexnet_weights):
    config = tiny_config(clip_dir, tmp_path / "cache", **{"loss.lpips_weights": str(alexnet_weights)})
    config["stages"][0]["lpips_weight"] = 0.1
    run = prepare_run(tmp_path / "lpips", config)
    train(run, progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["lpips"] > 0 for r in rows if r["kind"] == "train")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key"),
    ("stages.0.frames=8", "1+4k"),
    ("stages.0.crop=40", "multiple of 16"),
    ("stages.0.lpips_weight=0.01", "lpips_weights"),
])
def test_config_rejects_bad_options(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_init_from_starts_a_run_from_a_checkpoint(clip_dir, tmp_path):
    torch.manual_seed(12345)  # not the run's seed: its own init would not match
    checkpoint = tmp_path / "start"
    save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), checkpoint)
    config = tiny_config(clip_dir, tmp_path / "cache", **{"model.init_from": str(checkpoint)})
    run = prepare_run(tmp_path / "warm", config)
    model, _ = train(run, stop_at=0, progress=False)  # no step: the weights are the checkpoint's
    source = from_pretrained(checkpoint)
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    vae = tiny_config(clip_dir, tmp_path / "cache", **{"model.init_from": str(checkpoint), "model.kind": "vae"})
    with pytest.raises(ValueError, match="cannot start"):
        train(prepare_run(tmp_path / "mismatch", vae), stop_at=0, progress=False)

