"""Shared fixtures: small real models and checkpoints (random init, tiny preset)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# Test processes and the servers they start share the CPU: OpenMP threads that spin while
# waiting burn it for nothing (3x more CPU per training step measured; docs/results.md).
# Set before torch loads its OpenMP runtime; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import redis
import torch

from model import CDTConfig, build_model, from_pretrained, save_pretrained
from model.streaming import measure
from tests.servers import SHARED_REDIS_URL

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "videos"


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return build_model(CDTConfig.from_preset("tiny"), "cdt").eval()


@pytest.fixture(scope="session")
def tiny_field(tiny_model):
    """The tiny CDT's measured receptive field (that of its config: any weights share it),
    measured once for the checkpoints the tests save."""
    return measure(tiny_model)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_field) -> Path:
    """A saved random-init tiny CDT checkpoint directory."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), directory, receptive_field=tiny_field)
    return directory


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """`tiny_checkpoint` loaded as the service's worker pool serves it: the model and its identity."""
    return from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.fail(f"shared clips not found at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def smoke_clips(tmp_path_factory, shared_videos) -> Path:
    """Two shared clips cut to 12 frames at short side 48: training data for the end-to-end runs
    of scripts/gpu_smoke.sh on the CPU (with `data.short_side=48 data.max_frames=12`)."""
    from media.video import read_video, write_video

    out = tmp_path_factory.mktemp("smoke_clips")
    for name in ("cotracker__cat.mp4", "propainter__tennis.mp4"):
        clip = read_video(shared_videos / name, num_frames=12, size=48)
        write_video(out / name, clip.frames, clip.fps, crf=10)
    return out


@pytest.fixture(scope="session")
def alexnet_weights(tmp_path_factory) -> Path:
    """Randomly initialised AlexNet features in torchvision's key layout, plus LPIPS heads
    (the real weights cannot be fetched here; the code path is the same)."""
    from safetensors.torch import save_file

    from media.lpips import _ALEX, _features

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in _features(_ALEX).state_dict().items()}
    state.update({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))})
    path = tmp_path_factory.mktemp("lpips") / "alex.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def redis_prefix():
    """A session key prefix of the module's own on the shared Redis; its keys are deleted after."""
    value = f"cdt-test-{secrets.token_hex(4)}:"
    yield value
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    for key in client.scan_iter(f"{value}*"):
        client.delete(key)
