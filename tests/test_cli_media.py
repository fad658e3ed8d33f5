"""`cdt encode / decode / reconstruct / eval` end to end on clips cut from the shared set."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file
from test_media import cut_clip

import cli.media_commands
from cli.main import main
from media import load_frames, load_latents, psnr, read_video
from media.lpips import _ALEX, _features
from model import CDTConfig, build_model, save_pretrained
from tests.tolerance import assert_float_close, assert_uint8_close

CDT = Path(sys.executable).parent / "cdt"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def clip(shared_videos, tmp_path_factory) -> Path:
    """6 frames (not 1+4k) of odd size 27x21 at 20 fps, h264 mp4."""
    return cut_clip(shared_videos, tmp_path_factory.mktemp("clip") / "odd.mp4")


@pytest.fixture(scope="module")
def latents(clip, tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latents") / "odd.safetensors"
    assert main(["encode", str(clip), "-o", str(path), "--checkpoint", str(tiny_checkpoint), "--quiet"]) == 0
    return path


def test_encode_writes_latents_with_metadata(latents, tiny_checkpoint):
    item = load_latents(latents)
    assert item.latents.shape == (1, 16, 3, 4, 3)
    assert (item.frames, item.height, item.width, item.fps) == (6, 27, 21, 20.0)
    assert (item.padding.frames, item.padding.height, item.padding.width) == (3, 5, 3)
    assert (tiny_checkpoint / "model.sha256").read_text().strip() == item.model_hash
    assert item.preset == "tiny" and item.dtype == "fp32"


def test_round_trip_keeps_size_frame_count_and_fps(capsys, clip, latents, tiny_checkpoint, tmp_path):
    source = read_video(clip)
    code, out, _ = run(capsys, "decode", latents, "-o", tmp_path / "out.mp4", "--checkpoint", tiny_checkpoint,
                       "--quiet")
    assert code == 0 and json.loads(out)["frames"] == 6
    decoded = read_video(tmp_path / "out.mp4")
    assert decoded.frames.shape == source.frames.shape == (6, 27, 21, 3)
    assert decoded.fps == source.fps == 20.0
    assert run(capsys, "decode", latents, "-o", tmp_path / "out.npy", "--checkpoint", tiny_checkpoint,
               "--quiet")[0] == 0
    frames, fps = load_frames(tmp_path / "out.npy")
    assert frames.shape == (6, 27, 21, 3) and fps is None


@pytest.mark.exactness
def test_chunked_encode_equals_whole_clip(capsys, clip, latents, tiny_checkpoint, tmp_path):
    code, _, _ = run(capsys, "encode", clip, "-o", tmp_path / "c.safetensors", "--checkpoint", tiny_checkpoint,
                     "--chunk", "4", "--quiet")
    assert code == 0
    whole, chunked = load_latents(latents), load_latents(tmp_path / "c.safetensors")
    assert_float_close(chunked.latents, whole.latents)
    assert chunked.padding == whole.padding


@pytest.mark.exactness
def test_chunked_decode_equals_whole_clip(capsys, latents, tiny_checkpoint, tmp_path):
    outputs = {}
    for name, extra in [("whole", ()), ("chunked", ("--chunk", "1"))]:
        path = tmp_path / f"{name}.safetensors"
        code, _, _ = run(capsys, "decode", latents, "-o", path, "--checkpoint", tiny_checkpoint, "--seed", "5",
                         "--quiet", *extra)
        assert code == 0
        outputs[name] = load_frames(path)[0]
    assert_uint8_close(outputs["chunked"], outputs["whole"])


def test_reconstruct_prints_psnr_ssim_against_the_input(capsys, clip, tiny_checkpoint, tmp_path):
    output = tmp_path / "recon.safetensors"
    code, out, _ = run(capsys, "reconstruct", clip, "-o", output, "--checkpoint", tiny_checkpoint, "--chunk", "4",
                       "--quiet")
    assert code == 0
    reported = float(re.search(r"PSNR (\S+) dB", out).group(1))
    assert re.search(r"SSIM 0\.\d{4}", out)
    frames, fps = load_frames(output)
    assert frames.shape == (6, 27, 21, 3) and fps == 20.0
    assert reported == pytest.approx(psnr(read_video(clip).frames, frames), abs=0.006)


def test_eval_json_reports_clips_mean_and_protocol(capsys, shared_videos, tiny_checkpoint):
    videos = [shared_videos / "cotracker__cat.mp4", shared_videos / "mmaction2__test.avi"]
    code, out, _ = run(capsys, "eval", "--checkpoint", tiny_checkpoint, "--videos", *videos, "--frames", "3",
                       "--size", "16", "--json", "--quiet")
    assert code == 0
    report = json.loads(out)
    assert [c["path"] for c in report["clips"]] == [str(v) for v in videos]
    for c in report["clips"]:
        assert 0 < c["psnr"] < 100 and -1 <= c["ssim"] <= 1 and "lpips" not in c
    assert report["mean"]["psnr"] == pytest.approx(np.mean([c["psnr"] for c in report["clips"]]))
    assert report["mean"]["ssim"] == pytest.approx(np.mean([c["ssim"] for c in report["clips"]]))
    assert report["protocol"]["frames"] == 3 and report["protocol"]["crop"] == [16, 16]
    assert "skipped" in report["protocol"]["lpips"]
    code, out, _ = run(capsys, "eval", "--checkpoint", tiny_checkpoint, "--videos", videos[0], "--frames", "3",
                       "--size", "16", "--quiet")
    assert code == 0 and "LPIPS skipped" in out
    assert f"PSNR {report['clips'][0]['psnr']:.2f} dB" in out


def test_eval_with_local_lpips_weights(capsys, shared_videos, tiny_checkpoint, tmp_path):
    weights = tmp_path / "alexnet.safetensors"
    save_file({f"features.{k}": v for k, v in _features(_ALEX).state_dict().items()}, str(weights))
    code, out, _ = run(capsys, "eval", "--checkpoint", tiny_checkpoint,
                       "--videos", shared_videos / "cotracker__cat.mp4", "--frames", "1", "--size", "32",
                       "--lpips-weights", weights, "--json", "--quiet")
    assert code == 0
    report = json.loads(out)
    assert report["clips"][0]["lpips"] > 0 and report["mean"]["lpips"] == report["clips"][0]["lpips"]
    assert report["protocol"]["lpips"] == "LPIPS alex, unlearned (uniform) channel weights"
    assert "--frames" in subprocess.run([CDT, "eval", "--help"], capture_output=True, text=True).stdout


def test_progress_bar_unless_quiet(capsys, clip, tiny_checkpoint, tmp_path):
    code, _, err = run(capsys, "encode", clip, "-o", tmp_path / "a.safetensors", "--checkpoint", tiny_checkpoint)
    assert code == 0 and "encode" in err and "frame" in err
    code, _, err = run(capsys, "encode", clip, "-o", tmp_path / "b.safetensors", "--checkpoint", tiny_checkpoint,
                       "--quiet")
    assert code == 0 and err == ""


@pytest.fixture(scope="module")
def bad_inputs(shared_videos, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.mp4").write_text("this is a text file\n")
    data = (shared_videos / "cotracker__cat.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    other = root / "other-ckpt"
    save_pretrained(build_model(CDTConfig.from_preset("tiny")), other)  # different random weights
    return {"root": root, "other": other}


@pytest.mark.parametrize("argv, message", [
    (["encode", "{root}/missing.mp4"], "missing.mp4: no such file"),
    (["encode", "{root}/notes.mp4"], "notes.mp4: not a decodable video"),
    (["encode", "{root}/truncated.mp4"], "truncated.mp4: not a decodable video"),
    (["encode", "{clip}", "--frames", "9"], "too few frames: it has 6, --frames asks for 9"),
    (["decode", "{latents}", "--checkpoint", "{other}"], "latents were made by model"),
    (["decode", "{clip}"], "not a safetensors file"),
    (["eval", "--videos", "{clip}", "--frames", "17", "--size", "16"], "too few frames: it has 6"),
])
def test_errors_are_one_line_with_nonzero_exit(capsys, bad_inputs, clip, latents, tiny_checkpoint, argv, message):
    names = {"root": bad_inputs["root"], "other": bad_inputs["other"], "clip": clip, "latents": latents}
    argv = [a.format(**names) for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", str(tiny_checkpoint)]
    if argv[0] in ("encode", "decode"):
        argv += ["-o", str(bad_inputs["root"] / ("out.safetensors" if argv[0] == "encode" else "out.mp4"))]
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith(f"cdt {argv[0]}: error: ")


def test_force_decodes_latents_of_another_model(capsys, latents, bad_inputs, tmp_path):
    code, _, _ = run(capsys, "decode", latents, "-o", tmp_path / "f.npy", "--checkpoint", bad_inputs["other"],
                     "--force", "--quiet")
    assert code == 0 and load_frames(tmp_path / "f.npy")[0].shape == (6, 27, 21, 3)


def test_missing_default_checkpoint_says_how_to_make_one(capsys, clip, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.media_commands, "DEFAULT_CHECKPOINT", tmp_path / "checkpoints" / "cdt-tiny")
    code, _, err = run(capsys, "encode", clip, "-o", tmp_path / "z.safetensors")
    assert code == 2 and err.count("\n") == 1
    assert "pass --checkpoint DIR, or create one with `cdt init --preset tiny -o DIR`" in err


def test_steps_are_bounded_by_the_service_setting(capsys, latents, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CDT_MAX_STEPS", "2")
    argv = ["decode", str(latents), "--checkpoint", str(tiny_checkpoint), "--quiet", "--steps"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "3", "-o", str(tmp_path / "three.npy")])
    assert exit_.value.code == 2 and "must be at most 2 (CDT_MAX_STEPS), got 3" in capsys.readouterr().err
    assert run(capsys, *argv, "2", "-o", tmp_path / "two.npy")[0] == 0
    monkeypatch.setenv("CDT_MAX_STEPS", "9000")  # beyond the model's 8192 levels: the setting itself is refused
    with pytest.raises(SystemExit):
        main([*argv, "1", "-o", str(tmp_path / "one.npy")])
    assert "CDT_MAX_STEPS" in capsys.readouterr().err


def test_console_script_reports_corrupt_input_without_traceback(bad_inputs, tiny_checkpoint):
    root = bad_inputs["root"]
    result = subprocess.run([CDT, "encode", root / "notes.mp4", "-o", root / "x.safetensors",
                             "--checkpoint", tiny_checkpoint], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "not a decodable video" in result.stderr
