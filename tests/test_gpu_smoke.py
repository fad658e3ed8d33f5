"""scripts/gpu_smoke.sh end to end on the CPU: the tiny preset, 2 steps at 5x32x32 in one
process and under torchrun (2 gloo ranks), the export served by `cdt serve` and a val clip
round-tripped through its HTTP API. The GPU run differs only in DEVICE, PRESET, STEPS, BF16
and the clip shape; it has not run here. bf16 autocast is off on the CPU: without
AVX512-BF16 or AMX its convolutions are scalar (twice this test's time); tests/test_training.py
trains with it."""

from __future__ import annotations

import re
import socket

import pytest

from tests.scripts import run_script, script_env

pytestmark = pytest.mark.timeout(300)


def run(env: dict):
    return run_script("gpu_smoke.sh", env)


def test_the_smoke_script_trains_serves_and_round_trips_on_the_cpu(tmp_path, smoke_clips, shared_videos):
    env = script_env(tmp_path, DEVICE="cpu", PRESET="tiny", STEPS="2", FRAMES="5", SIZE="32", NPROC="2", BF16="off",
                    THREADS="2", DATA=str(smoke_clips), CLIP=str(shared_videos / "cotracker__bear.mp4"),
                    OVERRIDES="data.short_side=48 data.max_frames=12 data.workers=1")
    result = run(env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for label, world, batch in (("train 1 process", 1, 2), ("train torchrun x 2", 2, 4)):
        assert f"{label}: 2 steps on cpu x world {world}, bf16 off, global batch {batch}" in out
        step = re.search(rf"^{label}: step time ([0-9.]+) s \(median after step 1; step 1 ([0-9.]+) s\), "
                         r"([0-9.]+) samples/s", out, re.M)
        assert step and float(step[1]) > 0 and float(step[2]) > 0 and float(step[3]) > 0, out
        assert f"{label}: peak GPU memory n/a (cpu)" in out
    port = int(re.search(r"on 127\.0\.0\.1:(\d+)$", out, re.M)[1])
    assert re.search(r"^serve: tiny cdt [0-9a-f]{12} on cpu \(fp32\)$", out, re.M), out
    # 5 frames at short side 32 of the 854x480 clip: 32x57, padded to 32x64 in the latents.
    trip = re.search(r"^round trip OK: cotracker__bear\.mp4 5x32x57 -> latents 1x16x2x4x8 -> 5x32x57 frames, "
                     r"PSNR ([0-9.]+) dB", out, re.M)
    assert trip and float(trip[1]) > 0, out
    assert out.rstrip().endswith("gpu_smoke: done")
    # The EXIT trap stopped the server and removed the temp run directory.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not list(tmp_path.glob("gpu_smoke.*"))


def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    result = run(script_env(tmp_path, DEVICE="cuda", CUDA_VISIBLE_DEVICES=""))  # none, also on a GPU machine
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("gpu_smoke: error: DEVICE=cuda but torch sees no CUDA device "
                             "(DEVICE=cpu runs the same steps on the CPU)\n")


def test_a_missing_clip_is_one_clear_error(tmp_path):
    missing = tmp_path / "none.mp4"
    result = run(script_env(tmp_path, DEVICE="cpu", CLIP=str(missing)))
    assert result.returncode == 1
    assert result.stderr == f"gpu_smoke: error: no clip at {missing}: give CLIP=VIDEO for the round trip\n"
