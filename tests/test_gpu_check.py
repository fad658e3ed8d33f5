"""scripts/gpu_check.sh on the CPU in its reduced mode, end to end: bf16-vs-fp32 parity of
the shipped checkpoint on val clips, a real `cdt serve` on two CPU model threads exercised
over HTTP, the throughput stage, and the one results file they write. Also its training
stage (scripts/gpu_smoke.sh) and a failing stage, each alone, and the sizing of the
out-of-memory request a GPU run sends.

What the GPU run adds (CUDA devices, bf16 serving, the out-of-memory answer, the small
preset and the larger sizes) has not run here."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from benchmarks.gpu_service import CACHE_PROBE_SIDE, cache_bytes_per_pixel_step
from model import DEFAULT_CHECKPOINT, StreamingDecoder, from_pretrained
from tests.scripts import run_script, script_env
from tests.tolerance import BF16_FRAMES_PSNR_DB, BF16_PSNR_DROP_DB, BF16_TOLERANCE

# The reduced check's parity stage computes in bf16, which a CPU without bf16 arithmetic (AVX2
# only) runs several times slower: its whole run took 200 s on such a CPU, 2 cores, idle.
RUN_TIMEOUT_S = 480
pytestmark = pytest.mark.timeout(RUN_TIMEOUT_S + 60)


def check_env(tmp_path, **values) -> dict:
    return script_env(tmp_path, RESULTS=str(tmp_path / "results" / "gpu_check.md"), **values)


def run(env: dict):
    return run_script("gpu_check.sh", env, RUN_TIMEOUT_S)


def section(text: str, name: str) -> str:
    return text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def row(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    match = re.search(rf"^\| {re.escape(first)} \|(.*)\|$", text, re.M)
    assert match, f"no row {first!r} in:\n{text}"
    return [first, *(cell.strip() for cell in match[1].split("|"))]


def test_the_reduced_check_runs_every_stage_on_the_cpu_and_writes_one_results_file(tmp_path):
    result = run(check_env(tmp_path, DEVICE="cpu"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = (tmp_path / "results" / "gpu_check.md").read_text()
    assert result.stdout.rstrip().endswith(f"gpu_check: passed; results in {tmp_path / 'results' / 'gpu_check.md'}")

    # Provenance: command, commit, date, CPU, torch, and the (absent) GPUs with the CUDA build.
    assert "Command: `DEVICE=cpu TRAIN=0 CHECKPOINT=checkpoints/cdt-tiny scripts/gpu_check.sh`" in out
    assert re.search(r"^Commit: [0-9a-f]{40}(-dirty)?, date: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", out, re.M)
    assert re.search(r'^Machine: \{.*"torch": ".+".*"cpu": ".+"', out, re.M)
    assert '"cuda": null' in out and '"gpus": []' in out
    assert "Mode: reduced, on the CPU (DEVICE=cpu)" in out
    assert re.search(r"^Outcome: \*\*passed\*\* \(3 of 4 stages ran\), \d+ s in all\.$", out, re.M)

    # Each stage reported: training skipped on the CPU, the others passed with their time.
    assert row(out, "training")[1].startswith("skipped: TRAIN=0")
    for stage in ("parity", "service", "throughput"):
        cells = row(out, stage)
        assert cells[1] == "passed" and float(cells[2]) > 0, cells

    parity = section(out, "parity")
    for clip, shape in (("cotracker__bear.mp4", "9x64x114"), ("askanything__hitting_baseball.mp4", "9x64x85")):
        cells = row(parity, clip)  # the first two val clips of the shared manifest
        error, psnr32, psnr16, drop, agree = map(float, cells[2:7])
        assert cells[1] == shape and cells[7] == "passed"
        assert 0 < error <= BF16_TOLERANCE["rtol"] and drop <= BF16_PSNR_DROP_DB and agree >= BF16_FRAMES_PSNR_DB
        assert psnr32 > 15 and psnr16 > 15  # a reconstruction, not noise

    service = section(out, "service")
    assert re.search(r"^\| ready \| passed \| [0-9.]+ \| tiny cdt [0-9a-f]{12} on cpu/0, cpu/1 in fp32", service, re.M)
    for name in ("whole clip", "encode session", "decode session", "diffusers encode", "diffusers decode",
                 "devices", "ready at the end"):
        assert row(service, name)[1] == "passed", row(service, name)
    assert "3 chunks of 4 frames, a finish" in row(service, "encode session")[3]
    assert "3 chunks of 1 latent frame" in row(service, "decode session")[3]
    oom = row(service, "out of memory")
    assert oom[1] == "skipped" and oom[3].startswith("no GPU (CPU reduced mode)")
    assert oom[3].endswith(f"the same request at 5x{CACHE_PROBE_SIDE}x{CACHE_PROBE_SIDE} in 2 steps: 200")
    jobs = re.search(r"model jobs per device: cpu/0 (\d+), cpu/1 (\d+)", row(service, "devices")[3])
    assert jobs and int(jobs[1]) > 0 and int(jobs[2]) > 0
    assert "2 of 2 devices healthy, device errors: 0 fatal, 0 out of memory" in row(service, "ready at the end")[3]

    throughput = section(out, "throughput")
    for op in ("encode", "decode"):
        cells = re.search(rf"^\| tiny \| 64x64 \| {op} \| fp32 \| 9 \| 8 \| ([0-9.]+) \| ([0-9.]+) \| n/a \| "
                          r"passed \|$", throughput, re.M)
        assert cells and float(cells[1]) > 0 and float(cells[2]) > 0, throughput
    for how in ("one at a time", "batched"):
        cells = re.search(rf"^\| tiny \| 64x64 \| 2 decode sessions, {how} \| fp32 \| 8 \| 4 \| ([0-9.]+) \| "
                          r"([0-9.]+) \| n/a \| passed \|$", throughput, re.M)
        assert cells and float(cells[1]) > 0 and float(cells[2]) > 0, throughput

    assert not list(tmp_path.glob("gpu_check.*"))  # the temp run directory is removed


def test_the_training_stage_is_the_smoke_script(tmp_path, smoke_clips, shared_videos):
    env = check_env(tmp_path, DEVICE="cpu", TRAIN="1", STAGES="training", PRESET="tiny", STEPS="1", FRAMES="5",
                    SIZE="32", NPROC="0", BF16="off", THREADS="2", DATA=str(smoke_clips),
                    CLIP=str(shared_videos / "cotracker__bear.mp4"),
                    OVERRIDES="data.short_side=48 data.max_frames=12 data.workers=1")
    result = run(env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = (tmp_path / "results" / "gpu_check.md").read_text()
    assert "Command: `DEVICE=cpu TRAIN=1 STAGES='training' CHECKPOINT=checkpoints/cdt-tiny scripts/gpu_check.sh`" in out
    assert row(out, "training")[1] == "passed"
    for stage in ("parity", "service", "throughput"):
        assert row(out, stage)[1] == "skipped: not in STAGES"
    training = section(out, "training")  # gpu_smoke.sh's own report, as it printed it
    assert "train 1 process: 1 steps on cpu x world 1, bf16 off, global batch 2" in training
    assert re.search(r"^round trip OK: cotracker__bear\.mp4 5x32x57 -> ", training, re.M)
    assert "gpu_smoke: done" in training


def test_a_failing_stage_fails_the_run_and_shows_its_output(tmp_path):
    checkpoint = tmp_path / "tampered"
    shutil.copytree(DEFAULT_CHECKPOINT, checkpoint)
    (checkpoint / "model.sha256").write_text("0" * 64 + "\n")
    result = run(check_env(tmp_path, DEVICE="cpu", STAGES="parity", CHECKPOINT=str(checkpoint)))
    assert result.returncode == 1
    assert "gpu_check: parity failed (exit code 1)" in result.stderr
    out = (tmp_path / "results" / "gpu_check.md").read_text()
    assert re.search(r"^Outcome: \*\*failed\*\*: parity \(1 of 4 stages ran\)", out, re.M)
    assert row(out, "parity")[1] == "failed: exit code 1"
    assert "content hash mismatch" in section(out, "parity")


@pytest.mark.parametrize("values, message", [
    ({"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""},  # no GPU, also on a GPU machine
     "DEVICE=cuda but torch sees no CUDA device (DEVICE=cpu runs the reduced check on the CPU)"),
    ({"DEVICE": "gpu"}, "DEVICE must be cuda or cpu, got 'gpu'"),
    ({"DEVICE": "cpu", "STAGES": "parity speed"},
     "STAGES: no stage 'speed' (stages: training parity service throughput)"),
    ({"DEVICE": "cpu", "CHECKPOINT": "/nonexistent"}, "no checkpoint at /nonexistent: give CHECKPOINT=DIR"),
])
def test_a_setting_it_cannot_run_with_is_one_clear_error(tmp_path, values, message):
    result = run(check_env(tmp_path, **values))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"gpu_check: error: {message}\n"
    assert not (tmp_path / "results").exists() and not list(tmp_path.glob("gpu_check.*"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_out_of_memory_request_is_sized_by_a_cache_that_grows_with_pixels_and_steps(dtype):
    """A GPU run sizes its out-of-memory decode from the feature cache per pixel and DDIM step
    measured at a small frame: at another frame and step count the cache is what that predicts,
    to the byte."""
    model, identity = from_pretrained(DEFAULT_CHECKPOINT, dtype=dtype)
    per_step = cache_bytes_per_pixel_step(model, identity.content_hash)

    def cache_bytes(steps: int, side: int) -> int:
        stream = StreamingDecoder(model, identity.content_hash, steps=steps)
        with torch.inference_mode():
            stream.push(torch.zeros(1, 16, 1, side // 8, side // 8))
        return stream.cache.nbytes()

    assert per_step > 0
    assert cache_bytes(3, 2 * CACHE_PROBE_SIDE) - cache_bytes(1, 2 * CACHE_PROBE_SIDE) == \
        2 * per_step * (2 * CACHE_PROBE_SIDE) ** 2
