"""`cdt encode-dataset` end to end on real clips of the shared set: the shards' latents
against `cdt encode`, bad files skipped and listed, a run killed mid-way and resumed
against an uninterrupted one, the Ray engine on a real local cluster against the local
engine, refused reruns into the same OUTPUT, and the training-side reader over 2 ranks x
2 DataLoader workers.

Both engines and the resumed run push the same frames through the same model at the same
thread count in the same chunk schedule, so their shards are compared byte for byte. The
latents are compared with `cdt encode --chunk 8`, the service's schedule, within FLOAT_ATOL
(the shipped checkpoint's latents reach magnitude ~15, where a one-call encode of the whole
clip differs from a streamed one by up to ~1.5e-5: float rounding at ~1e-6 relative)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from test_media import cut_clip

from cli.dataset_commands import source_files
from cli.main import main
from media import load_latents
from media.latents_file import latents_from_bytes
from media.shards import LatentShards, collate_samples, read_index, read_samples
from model import DEFAULT_CHECKPOINT, from_pretrained, save_pretrained
from tests.tolerance import assert_float_close

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("cotracker__cat.mp4", "mmaction2__test.avi")
OPTIONS = ["--size", "64", "--frames", "9", "--shard-size", "1", "--workers", "1", "--quiet"]
FAILURES = {"corrupt.mp4": "undecodable_video", "empty.mp4": "empty_file", "short.mp4": "too_few_frames"}


@pytest.fixture(scope="module")
def source(shared_videos, tmp_path_factory) -> Path:
    """Two real clips (linked, not copied) beside a truncated one, an empty file and a
    real 5-frame clip, shorter than the 9 frames asked for."""
    folder = tmp_path_factory.mktemp("source")
    for name in CLIPS:
        (folder / name).symlink_to(shared_videos / name)
    (folder / "corrupt.mp4").write_bytes((shared_videos / "cotracker__bear.mp4").read_bytes()[:5000])
    (folder / "empty.mp4").write_bytes(b"")
    cut_clip(shared_videos, folder / "short.mp4", frames=5, height=48, width=64)
    return folder


def encode_dataset(capsys, source: Path, output: Path, *extra: str) -> tuple[int, dict | None, str]:
    code = main(["encode-dataset", str(source), str(output), *OPTIONS, *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def files(folder: Path) -> dict[str, bytes]:
    """Every file a run leaves (the lock file is empty and not part of the data set)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def encoded(source, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("encoded") / "out"
    assert main(["encode-dataset", str(source), str(output), *OPTIONS]) == 0
    return output


def samples(output: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for shard in read_index(output)["shards"] for key, members in read_samples(output / shard["name"])}


def test_every_input_is_a_sample_or_a_listed_failure(encoded, source):
    index = read_index(encoded)
    assert index["complete"] and index["planned_shards"] == len(CLIPS) + len(FAILURES) == len(index["shards"])
    assert {f["source"]: f["code"] for f in index["failed"]} == FAILURES
    assert all(f["reason"] for f in index["failed"])
    found = samples(encoded)
    assert sorted(json.loads(m["json"])["source"] for m in found.values()) == sorted(CLIPS)
    assert index["totals"] == {"shards": 5, "samples": 2, "frames": 18, "failed": 3}
    # A failed input leaves no partial sample: its shard is an empty tar.
    failed_shards = {f["shard"] for f in index["failed"]}
    assert all(s["samples"] == 0 for s in index["shards"] if s["name"] in failed_shards)
    for shard in index["shards"]:
        data = (encoded / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert not [p for p in encoded.iterdir() if p.name.endswith(".tmp")]


def test_latents_equal_cdt_encode(encoded, source, capsys, tmp_path):
    for key, members in samples(encoded).items():
        meta = json.loads(members["json"])
        item = latents_from_bytes(members["latents.safetensors"])
        reference = tmp_path / f"{key}.safetensors"
        assert main(["encode", str(source / meta["source"]), "-o", str(reference), "--frames", "9", "--size", "64",
                     "--chunk", "8", "--quiet"]) == 0
        expected = load_latents(reference)
        assert_float_close(item.latents, expected.latents)
        assert item.info == expected.info
        assert (meta["frames"], meta["height"], meta["width"], meta["fps"]) == \
            (expected.frames, expected.height, expected.width, expected.fps)
        assert meta["model"]["hash"] == expected.model_hash and meta["model"]["name"] == "cdt-tiny"
        assert meta["size"] == 64 and meta["crop"] is None and meta["latent_shape"] == list(expected.latents.shape)
    capsys.readouterr()


def test_shards_are_plain_tar_that_webdataset_reads(encoded):
    name = next(s["name"] for s in read_index(encoded)["shards"] if s["samples"])
    with tarfile.open(encoded / name) as tar:
        members = tar.getmembers()
    assert [m.name.split(".", 1)[1] for m in members] == ["json", "latents.safetensors"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}

    webdataset = pytest.importorskip("webdataset", reason="webdataset is in the dev extra")
    (sample,) = list(webdataset.WebDataset(str(encoded / name), shardshuffle=False))
    assert sample["__key__"] == members[0].name.split(".")[0]
    item = latents_from_bytes(sample["latents.safetensors"])
    assert json.loads(sample["json"])["latent_shape"] == list(item.latents.shape)


def test_a_killed_run_resumes_to_the_same_bytes(encoded, source, tmp_path, capsys):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "cli.main", "encode-dataset", str(source), str(output), *OPTIONS]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    first = output / "shard-000000.tar"
    deadline = time.monotonic() + 60
    # Killed once the index lists a shard (the shard's file is renamed into place a moment before).
    while not (read_index(output) or {}).get("shards") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists(), process.stderr.read().decode()
    assert process.returncode == -signal.SIGKILL
    finished = read_index(output)["shards"]
    assert finished and not read_index(output)["complete"], "the run must be killed before its end"
    kept = {s["name"]: (output / s["name"]).stat().st_mtime_ns for s in finished}

    code, summary, _ = encode_dataset(capsys, source, output)
    assert code == 0 and summary["complete"]
    assert {name: (output / name).stat().st_mtime_ns for name in kept} == kept, "finished shards are kept"
    assert files(output) == files(encoded)


def test_ray_engine_writes_the_same_bytes(encoded, source, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the Ray engine needs the `ray` extra (in dev)")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT / 'client'}:{ROOT}"}})  # this checkout's packages
    try:
        assert len(ray.nodes()) == 1 and ray.cluster_resources()["CPU"] == 2
        code, summary, err = encode_dataset(capsys, source, tmp_path / "ray", "--engine", "ray", "--workers", "2",
                                            "--threads", str(torch.get_num_threads()))
    finally:
        ray.shutdown()
    assert code == 0, err
    assert summary["complete"] and summary["samples"] == len(CLIPS)
    assert files(tmp_path / "ray") == files(encoded)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """The shipped checkpoint with one weight changed: another model, of the same preset."""
    model, identity = from_pretrained(DEFAULT_CHECKPOINT)
    with torch.no_grad():
        next(model.parameters()).flatten()[0] += 1
    directory = tmp_path_factory.mktemp("other") / "cdt-tiny"
    save_pretrained(model, directory, receptive_field=identity.receptive_field)
    return directory


def test_conflicting_reruns_are_refused(encoded, source, capsys, other_checkpoint):
    before = files(encoded)
    code, _, err = encode_dataset(capsys, source, encoded, "--crop", "center")
    assert code == 2 and "output_conflict" in err and "options.crop: 'none' there, 'center' now" in err
    code, _, err = encode_dataset(capsys, source, encoded, "--checkpoint", str(other_checkpoint))
    assert code == 2 and "output_conflict" in err and "model.hash" in err
    (other := source.parent / "fewer").mkdir(exist_ok=True)
    (other / CLIPS[0]).symlink_to(source / CLIPS[0])
    code, _, err = encode_dataset(capsys, other, encoded)
    assert code == 2 and "source.inputs: 5 there, 1 now" in err
    assert files(encoded) == before
    code, summary, _ = encode_dataset(capsys, source, encoded)
    assert code == 0 and summary["encoded_clips"] == 0 and summary["complete"]
    assert files(encoded) == before


def test_reader_yields_every_sample_once_across_2_ranks_x_2_workers(encoded):
    stored = {key: latents_from_bytes(m["latents.safetensors"]).latents[0] for key, m in samples(encoded).items()}
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        dataset = LatentShards(encoded, rank=rank, world_size=2, model_hash=read_index(encoded)["model"]["hash"])
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_samples)
        seen[rank] = []
        for batch in loader:
            (key,) = batch["key"]
            assert torch.equal(batch["latents"][0], stored[key]) and batch["meta"][0]["key"] == key
            seen[rank].append(key)
    assert sorted(seen[0] + seen[1]) == sorted(stored) and not set(seen[0]) & set(seen[1])
    assert seen[0] and seen[1]


def test_a_manifest_source_names_its_rows_relative_to_it(shared_videos, tmp_path):
    manifest = tmp_path / "clips.jsonl"
    rows = [{"path": str(shared_videos / CLIPS[0]), "split": "val"}, {"path": "local/b.mp4", "split": "train"}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert source_files(manifest, "train") == [("local/b.mp4", str(tmp_path / "local/b.mp4"))]
    assert source_files(manifest, None)[0] == (os.path.relpath(shared_videos / CLIPS[0], tmp_path),
                                               str(shared_videos / CLIPS[0]))
    with pytest.raises(ValueError, match="no inputs"):
        source_files(manifest, "test")
