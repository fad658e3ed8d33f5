"""Training pipeline on real clips: inputs, sharding, clip cutting (streamed and cached),
exact resume, 2-process gloo DDP and its collective timeout, export, devices and step options
(TF32's flags among them).

Fixture clips are cut from the shared set with PyAV (12 frames, short side 48) into a
tmp dir; runs use the tiny preset at 5 frames x 32x32, 2 optimizer steps. torchrun
launches are in tests/test_training_torchrun.py."""

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
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cli.main import main as cdt_main
from media.video import read_video, write_video
from model import CDTConfig, build_model, from_pretrained, save_pretrained
from training.acceleration import allow_tf32
from training.config import ConfigError, DataSection, LossSection, Stage, TrainingConfig, load_config
from training.data import CachedFrames, ClipDataset, StreamedFrames, build_cache
from training.distributed import COLLECTIVE_TIMEOUT_ENV, barrier, collective_timeout, init_distributed, \
    shutdown_distributed
from training.export import TRAINING_FILE, export
from training.losses import Objective, build_lpips
from training.sampling import BatchPlan, BatchSpec, fresh_cursor
from training.sources import read_manifest, scan, split_inputs
from training.trainer import prepare_run, train

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


def log_rows(run_dir, kind="train"):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in log_rows(run_dir)]


def write_image(path, height=40, width=56):
    """A real PNG (PyAV's image2 muxer), RGB noise."""
    frame = av.VideoFrame.from_ndarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8),
                                       format="rgb24")
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


@pytest.fixture(scope="module")
def mixed_dir(clip_dir, tmp_path_factory):
    """The clips in a nested folder, an image, and a file named .mp4 that is not one."""
    out = tmp_path_factory.mktemp("mixed")
    shutil.copytree(clip_dir, out / "videos")
    write_image(out / "videos" / "still.png")
    (out / "broken.mp4").write_bytes(b"\x00not a video" * 200)
    return out


def shape(frames, crop, batch, image_ratio) -> Stage:
    """A stage of this clip shape, batch and image share (what micro-batch specs read)."""
    return Stage(name="s", steps=1, frames=frames, crop=crop, batch=batch, image_ratio=image_ratio, lpips_weight=0.0)


def specs(stage, count, world=1, rank=0, pools=None, seed=0, cursor=None):
    """The first `count` micro-batch specs of a one-stage run."""
    pools = pools or {"video": 3, "image": 0}
    return list(BatchPlan(seed, lambda i: stage, pools, rank, world, 0, count, cursor or fresh_cursor()))


def test_manifests_in_tsv_csv_and_jsonl_and_folders_of_videos_and_images(mixed_dir, tmp_path):
    (tmp_path / "m.csv").write_text("path,caption,split\nvideos/a.mp4,a cat,train\nb.png,,val\nc.webm,,\n")
    (tmp_path / "m.jsonl").write_text('{"path": "videos/a.mp4", "caption": "a cat"}\n\n{"path": "/abs/b.jpg"}\n')
    (tmp_path / "m.tsv").write_text("file\tsplit\nx.mp4\ttrain\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert [r["path"] for r in rows] == [str(tmp_path / p) for p in ("videos/a.mp4", "b.png", "c.webm")]
    data = DataSection(manifest=str(tmp_path / "m.csv"))
    train_split, val_split = split_inputs(data, "train"), split_inputs(data, "val")
    assert train_split.videos == (str(tmp_path / "videos/a.mp4"), str(tmp_path / "c.webm"))  # no split: train
    assert train_split.captions == 1 and val_split.images == (str(tmp_path / "b.png"),) and not val_split.videos
    jsonl = DataSection(manifest=str(tmp_path / "m.jsonl"))
    assert split_inputs(jsonl, "train").images == ("/abs/b.jpg",) and split_inputs(jsonl, "train").captions == 1
    assert split_inputs(jsonl, "val").videos == ()
    assert read_manifest(tmp_path / "m.tsv")[0]["path"] == str(tmp_path / "x.mp4")  # the shared MANIFEST's `file`
    (tmp_path / "bad.csv").write_text("name\nx.mp4\n")
    with pytest.raises(ValueError, match="row 1 has no path or file"):
        read_manifest(tmp_path / "bad.csv")

    folder = split_inputs(DataSection(videos=[str(mixed_dir)]), "train")  # recursive, by suffix
    assert [os.path.basename(p) for p in folder.videos] == ["broken.mp4", *sorted(CLIPS)]
    assert [os.path.basename(p) for p in folder.images] == ["still.png"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        scan([tmp_path / "missing"])


def test_batches_are_sharded_like_distributed_sampler_and_survive_a_world_change():
    stage = shape(frames=5, crop=32, batch=2, image_ratio=0.25)
    pools = {"video": 10, "image": 4}
    world2 = [specs(stage, 30, world=2, rank=r, pools=pools) for r in range(2)]
    for a, b in zip(*world2):  # the ranks agree on the pool and clip length, not on the samples
        assert (a.pool, a.frames, a.cursor) == (b.pool, b.frames, b.cursor) and not set(a.slots) & set(b.slots)
    assert {s.pool for s in world2[0]} == {"video", "image"}
    video_slots = sorted(slot for rank in world2 for s in rank if s.pool == "video" for slot in s.slots)
    assert video_slots == list(range(len(video_slots)))  # consecutive slots: nothing skipped or repeated

    from training.sampling import slot_item
    epochs = [[slot_item(0, "video", g, 10) for g in range(e * 10, e * 10 + 10)] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)  # every file once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch

    # Resumed with 3 ranks after 30 micro-batches of 2: the streams continue at the cursor.
    cursor = world2[0][-1].cursor
    world3 = [specs(stage, 10, world=3, rank=r, pools=pools, cursor=cursor) for r in range(3)]
    later = sorted(slot for rank in world3 for s in rank if s.pool == "video" for slot in s.slots)
    assert later == list(range(cursor["video"], cursor["video"] + len(later)))


def test_streamed_and_cached_clips_are_the_same_and_unusable_files_are_skipped(mixed_dir, tmp_path):
    inputs = split_inputs(DataSection(videos=[str(mixed_dir)]), "train")
    targets, failed = build_cache(inputs.videos + inputs.images, tmp_path / "cache", 40, 10, workers=2)
    n = len(inputs.videos)
    arrays = [np.load(t) for t in targets if t is not None]
    assert [min(a.shape[1:3]) for a in arrays] == [40] * 4 and [len(a) for a in arrays] == [10, 10, 10, 1]
    assert list(failed) == [str(mixed_dir / "broken.mp4")] and "not a decodable video" in failed[str(mixed_dir /
                                                                                                      "broken.mp4")]
    readers = {
        "stream": {"video": StreamedFrames(inputs.videos, 40, 10), "image": StreamedFrames(inputs.images, 40, 10)},
        "cache": {"video": CachedFrames(inputs.videos, targets[:n]), "image": CachedFrames(inputs.images, targets[n:])},
    }
    stage = shape(frames=9, crop=32, batch=3, image_ratio=0.3)
    plan = specs(stage, 12, pools={"video": n, "image": 1})
    out = {}
    for mode, pools in readers.items():
        data = ClipDataset(pools, seed=0, max_stride=3)
        out[mode] = [data[spec] for spec in plan]
    for (a, report_a), (b, report_b) in zip(out["stream"], out["cache"]):
        assert torch.equal(a, b) and report_a["replaced"] == report_b["replaced"]
    shapes = {tuple(batch.shape) for batch, _ in out["stream"]}
    assert shapes == {(3, 3, 9, 32, 32), (3, 3, 1, 32, 32)}
    reports = [report for _, report in out["stream"]]
    assert sum(r["replaced"] for r in reports) >= 1  # the broken file was drawn, and replaced
    assert {path for r in reports for path in r["broken"]} == {str(mixed_dir / "broken.mp4")}
    batch = out["stream"][0][0]
    assert batch.min() >= -1 and batch.max() <= 1 and batch.std() > 0.05
    data = ClipDataset(readers["stream"], seed=0, max_stride=3)
    assert torch.equal(data[plan[5]][0], out["stream"][5][0])  # a batch is a function of its spec: resumable

    # A clip longer than any file is skipped per sample, and a set with nothing usable fails clearly.
    long = BatchSpec(0, "video", 17, 32, (0,), fresh_cursor())
    with pytest.raises(ValueError, match="no usable video sample in 16 draws"):
        ClipDataset(readers["stream"], seed=0)[long]


def test_channel_permute_reorders_colours_of_the_same_clip(clip_dir):
    videos = tuple(str(clip_dir / name) for name in CLIPS)
    pools = {"video": StreamedFrames(videos, 40, 10), "image": StreamedFrames((), 40, 10)}
    plain = ClipDataset(pools, seed=0, max_stride=3)
    permuted = ClipDataset(pools, seed=0, max_stride=3, channel_permute=1.0)
    orders = set()
    for spec in specs(shape(frames=5, crop=32, batch=1, image_ratio=0.0), 20):
        a, b = plain[spec][0][0], permuted[spec][0][0]  # (3,T,H,W); the permutation is drawn after the crop
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
    loaded, identity = from_pretrained(served)
    ema = torch.load(parts / "state.pt", weights_only=True)["ema"]
    assert info["step"] == 2 and identity.content_hash == info["hash"]
    name = "encoder.stem.conv.conv.weight"
    assert torch.equal(loaded.state_dict()[name], ema[name].to(torch.bfloat16).float())
    record = json.loads((served / TRAINING_FILE).read_text())
    assert record["model_hash"] == info["hash"] and record["config"] == config.to_data() and record["step"] == 2
    assert record["data"]["videos"] == 3 and record["data"]["samples_drawn"]["video"] == 4  # 2 steps of batch 2
    assert cdt_main(["export", "--run", str(parts), "-o", str(tmp_path / "cli")]) == 0
    assert from_pretrained(tmp_path / "cli").identity.content_hash == info["hash"]


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
    """systemd or `kill -- -PGID` signal the trainer and its data workers together. The
    run is profiled, so the trace of its steps 3-5 (as far as it got) is written too."""
    config = tiny_config(clip_dir, tmp_path / "cache", **{"data.workers": 1, "stages.0.steps": 10_000})
    run = prepare_run(tmp_path / "run", config)
    train(run, stop_at=1, progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "--resume", str(run), "--quiet", "--profile"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").exists() or len(train_losses(run)) < 4:
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
    assert saved >= 4 and saved == train_losses(run)[-1][0]
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert any(e.get("name") == "ProfilerStep#3" for e in trace["traceEvents"])  # steps count from the resume
    assert "Self CPU" in (run / "profile" / "operators.txt").read_text()


def test_non_finite_gradients_skip_the_update_and_then_stop_the_run(clip_dir, tmp_path):
    config = tiny_config(clip_dir, tmp_path / "cache", **{"loss.kl_weight": float("inf"), "stages.0.steps": 100})
    run = prepare_run(tmp_path / "run", config)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FloatingPointError, match="20 steps in a row"):
        train(run, progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # a failed run gives the caller its handlers back
    assert [(r["step"], r["skipped"]) for r in log_rows(run)] == [(i, 1) for i in range(1, 20)]
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
    run_dir = prepare_run(tmp_path / "run", config)
    mp.spawn(_ddp_worker, args=(2, free_port(), str(run_dir), str(tmp_path)), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank trained on its own clips
    saved = torch.load(run_dir / "state.pt", weights_only=True)["model"]  # written by rank 0
    for name, p0 in ranks[0]["params"].items():
        assert torch.equal(p0, ranks[1]["params"][name]), name
        assert torch.equal(p0, saved[name]), name
    torch.manual_seed(config.seed)
    initial = build_model(CDTConfig.from_preset("tiny"), "cdt").state_dict()
    assert not torch.equal(initial["unet.out_conv.conv.weight"], ranks[0]["params"]["unet.out_conv.conv.weight"])


def _straggler_worker(rank: int, port: int, timeout_s: float, late_s: float, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      **{COLLECTIVE_TIMEOUT_ENV: str(timeout_s)})
    init_distributed(torch.device("cpu"))
    if rank == 1:
        time.sleep(late_s)  # reaches no collective before rank 0's wait has run out
    else:
        start = time.monotonic()
        try:
            barrier()
            outcome = "arrived"
        except RuntimeError as exc:
            outcome = str(exc)
        (Path(out_dir) / "rank0.json").write_text(json.dumps({"outcome": outcome, "waited": time.monotonic() - start}))
    shutdown_distributed()


def test_a_collective_waits_for_the_other_ranks_as_long_as_the_timeout_setting_says(tmp_path):
    """The timeout reaches the process group: a barrier that a rank reaches too late fails
    after CDT_COLLECTIVE_TIMEOUT_S, not after gloo's default 30 minutes."""
    timeout_s, late_s = 2.0, 6.0
    mp.spawn(_straggler_worker, args=(free_port(), timeout_s, late_s, str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert "Timed out" in rank0["outcome"]
    assert timeout_s <= rank0["waited"] < late_s


def test_the_collective_timeout_defaults_to_two_hours_and_rejects_bad_settings(monkeypatch):
    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 7200
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "90.5")
    assert collective_timeout().total_seconds() == 90.5
    for bad in ("0", "-5", "soon", "nan", "inf"):
        monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=re.escape(f"{COLLECTIVE_TIMEOUT_ENV}={bad!r}: must be a positive")):
            collective_timeout()


# The getters that torch's own code reads the TF32 setting through (inductor's autotuning cache
# keys and kernels, dynamo's guards), and what each reads with TF32 on.
TF32_READERS = {
    "torch.get_float32_matmul_precision()": (torch.get_float32_matmul_precision, "high"),
    "torch.backends.cuda.matmul.allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32, True),
    "torch._C._get_cublas_allow_tf32()": (torch._C._get_cublas_allow_tf32, True),
    "torch.backends.cuda.matmul.fp32_precision": (lambda: torch.backends.cuda.matmul.fp32_precision, "tf32"),
    "torch._C._get_fp32_precision_getter('cuda', 'matmul')":
        (lambda: torch._C._get_fp32_precision_getter("cuda", "matmul"), "tf32"),
    "torch.backends.cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32, True),
    "torch.backends.cudnn.conv.fp32_precision": (lambda: torch.backends.cudnn.conv.fp32_precision, "tf32"),
}


@pytest.fixture
def tf32_flags():
    """The process-wide TF32 flags, put back after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_on_for_every_reader_torch_has_and_none_raises(tf32_flags):
    """The flags can be set and read without a GPU; only their effect on kernels needs one."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    expected = {name: on for name, (_, on) in TF32_READERS.items()}
    assert all(read() != expected[name] for name, (read, _) in TF32_READERS.items())
    allow_tf32()
    assert {name: read() for name, (read, _) in TF32_READERS.items()} == expected


def test_lpips_term_adds_to_the_loss_and_trains_the_decoder_only(alexnet_weights):
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset("tiny"), "vae")
    lpips = build_lpips(str(alexnet_weights))
    objective = Objective(model, LossSection(), lpips)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    plain, _ = objective(video, torch.Generator().manual_seed(1), 0.0)
    loss, stats = objective(video, torch.Generator().manual_seed(1), 0.5)
    assert stats["lpips"] > 0 and loss.item() == pytest.approx(plain.item() + 0.5 * stats["lpips"], rel=1e-5)
    (loss - plain).backward()  # the gradient of the LPIPS term alone
    assert model.vae_decoder.out_conv.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.features.parameters())  # the LPIPS network stays frozen


def test_a_run_with_lpips_logs_it(clip_dir, tmp_path, alexnet_weights):
    config = tiny_config(clip_dir, tmp_path / "cache", **{"loss.lpips_weights": str(alexnet_weights),
                                                           "stages.0.lpips_weight": 0.1})
    run = prepare_run(tmp_path / "lpips", config)
    train(run, progress=False)
    assert all(r["lpips"] > 0 for r in log_rows(run))


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown config key (optim takes lr, min_lr, warmup, weight_decay, betas, "
                    "grad_clip, ema_decay, accum)"),
    ("optimm.lr=1", "optimm: unknown config key (the config takes name, seed, model, data, loss, optim, stages, "
                    "val, train)"),
    ("stages.0.frames=8", "stages.0.frames: must be 1+4k frames (1, 5, 9, ...), got 8"),
    ("stages.0.crop=40", "stages.0.crop: must be a positive multiple of 16, got 40"),
    ("stages.0.crop=256", "stages.0.crop (256) exceeds data.short_side (192)"),
    ("stages.0.lpips_weight=0.01", "stages.0.lpips_weight > 0 needs loss.lpips_weights"),
    ('stages=[{"name": "a", "steps": 5}]', "stages.0: missing frames, crop, batch, image_ratio, lpips_weight"),
    ("stages=[]", "stages: needs at least 1 item, got []"),
    ("stages.1.crop=96", "stages.1: no such item (there are 1)"),
    ("data.decode=lazy", 'data.decode: must be "stream" or "cache", got "lazy"'),
    ("train.bf16=maybe", 'train.bf16: must be true, false or "auto", got "maybe"'),
    ("train.bf16=1", 'train.bf16: must be true, false or "auto", got 1'),
    ('seed="3"', 'seed: must be an integer, got "3"'),
    ("optim.warmup=2.5", "optim.warmup: must be an integer, got 2.5"),
    ("optim.accum=0", "optim.accum: must be greater than or equal to 1, got 0"),
    ("optim.betas=[0.9]", "optim.betas: must be a list of 2 numbers, got [0.9]"),
    ("data.videos=clips/", 'data.videos: must be a list of strings or null, got "clips/"'),
    ("model.preset=huge", 'model.preset: must be one of "base", "small", "tiny", got "huge"'),
    ("loss.snr_min=6", "loss.snr_min (6.0) must be at most loss.snr_max (5.0)"),
    ("optim.lr.max=1", "optim.lr holds a value, not keys"),
])
def test_config_rejects_bad_options_naming_the_key_and_what_it_takes(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_every_bad_key_of_a_config_file_is_reported(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "optim": {"lr": "fast", "acum": 2}, "val": {"frames": 4}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).split(": ", 1)[1].split("; ") == [
        'optim.lr: must be a number, got "fast"',
        "optim.acum: unknown config key (optim takes lr, min_lr, warmup, weight_decay, betas, grad_clip, ema_decay, "
        "accum)",
        "val.frames: must be 1+4k frames (1, 5, 9, ...), got 4"]
    assert str(caught.value).startswith(f"training config {path}: ")


@pytest.mark.parametrize("path", sorted((REPO / "training" / "configs").glob("*.json")), ids=lambda p: p.name)
def test_the_shipped_configs_load_as_written(path):
    written = json.loads(path.read_text())
    config = load_config(path)
    data = config.to_data()
    for section, values in written.items():  # what the file sets is what the config holds
        assert (data[section] if not isinstance(values, dict) else {k: data[section][k] for k in values}) == values
    assert TrainingConfig.from_data(data) == config  # and the run directory's copy reads back the same
    assert config.total_steps == sum(stage["steps"] for stage in written["stages"])
    assert config.stage_at(config.total_steps) == config.stages[-1]


def test_init_from_starts_a_run_from_a_checkpoint(clip_dir, tmp_path):
    torch.manual_seed(12345)  # not the run's seed: its own init would not match
    checkpoint = tmp_path / "start"
    save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), checkpoint)
    config = tiny_config(clip_dir, tmp_path / "cache", **{"model.init_from": str(checkpoint)})
    run = prepare_run(tmp_path / "warm", config)
    model, _ = train(run, stop_at=0, progress=False)  # no step: the weights are the checkpoint's
    source = from_pretrained(checkpoint).model
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    vae = tiny_config(clip_dir, tmp_path / "cache", **{"model.init_from": str(checkpoint), "model.kind": "vae"})
    with pytest.raises(ValueError, match="cannot start"):
        train(prepare_run(tmp_path / "mismatch", vae), stop_at=0, progress=False)



GROWN = {"model.levels": [{"width": 96, "blocks": 1}], "stages.0.frames": 9, "val.frames": 9}


def test_a_grown_run_starts_from_the_model_below_and_trains_its_top_level_alone(clip_dir, tmp_path, tiny_field):
    """Stage 1 of growing 8x on a 4x checkpoint: the 4x weights stay as they were, the top
    level learns; the export is an 8x checkpoint that starts stage 2 (same config)."""
    torch.manual_seed(12345)
    below = tmp_path / "below"
    save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), below, receptive_field=tiny_field)
    config = tiny_config(clip_dir, tmp_path / "cache", **GROWN, **{"model.init_from": str(below),
                                                                  "model.train": "top_level"})
    model, _ = train(prepare_run(tmp_path / "grow", config), stop_at=1, progress=False)
    source = from_pretrained(below).model.state_dict()
    torch.manual_seed(config.seed)
    start = build_model(model.config).state_dict()  # the run's own init of the top level
    for name, value in model.state_dict().items():
        if name in source:
            assert torch.equal(value, source[name]) == (not name.startswith("encoder.head.")), name
        else:
            assert not torch.equal(value, start[name]), name
    exported = export(tmp_path / "grow", tmp_path / "t8", dtype="fp32")
    assert from_pretrained(exported["checkpoint"]).model.config.time_factor == 8
    joint = tiny_config(clip_dir, tmp_path / "cache", **GROWN, **{"model.init_from": exported["checkpoint"]})
    model, _ = train(prepare_run(tmp_path / "joint", joint), stop_at=0, progress=False)
    for name, value in from_pretrained(exported["checkpoint"]).model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_grown_config_takes_its_frames_rule(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"stages.0.frames \(5\) must be 1\+8k"):
        tiny_config(clip_dir, tmp_path, **{**GROWN, "stages.0.frames": 5})
    with pytest.raises(ConfigError, match="needs model.levels"):
        tiny_config(clip_dir, tmp_path, **{"model.train": "top_level"})
    config = tiny_config(clip_dir, tmp_path / "cache", **{
        "model.levels": [{"width": 96, "blocks": 1}] * 2, "stages.0.frames": 17, "val.frames": 17,
        "model.init_from": str(REPO / "checkpoints" / "cdt-tiny")})
    with pytest.raises(ValueError, match="a tiny 4x cdt checkpoint cannot start a tiny 16x cdt run"):
        train(prepare_run(tmp_path / "skip", config), stop_at=0, progress=False)


def test_activation_checkpointing_gives_the_same_step(clip_dir, tmp_path):
    """Recomputed activations give the same gradients: one step lands on the same weights."""
    config = tiny_config(clip_dir, tmp_path / "cache")
    plain, _ = train(prepare_run(tmp_path / "plain", config), stop_at=1, progress=False)
    recomputed, _ = train(prepare_run(tmp_path / "recomputed", config), stop_at=1, progress=False,
                          activation_checkpointing=True)
    assert train_losses(tmp_path / "plain") == train_losses(tmp_path / "recomputed")
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cuda_without_cuda_is_a_one_line_error(clip_dir, tmp_path, capsys):
    assert not torch.cuda.is_available()  # the claim below is about machines without CUDA
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"name": "gpu"}))
    run_dir = tmp_path / "run"
    assert cdt_main(["train", "--config", str(config), "--run-dir", str(run_dir), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["cdt train: error: --device cuda: CUDA is not available here (this PyTorch build has "
                                "no CUDA); use --device cpu"]
    assert not run_dir.exists()  # refused before anything was written
    assert cdt_main(["train", "--config", str(config), "--run-dir", str(run_dir), "--device", "tpu"]) == 2
    assert "--device tpu" in capsys.readouterr().err
