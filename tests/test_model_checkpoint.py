import json

import pytest
import torch

from model import (CDTConfig, CheckpointError, ModelIdentity, ReceptiveField, VAEBaseline, bf16_is_fast, build_model,
                   content_hash, from_pretrained, save_pretrained)
from model.tokenizer import cuda_bf16_is_fast


# A saved and reloaded model runs the same operations on the same weights as the original:
# equal by construction.


def sample_video():
    return torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_round_trip_is_bit_identical(tiny_model, tiny_field, tmp_path):
    saved = save_pretrained(tiny_model, tmp_path / "ck", receptive_field=tiny_field)
    loaded, identity = from_pretrained(tmp_path / "ck")
    assert identity == saved and saved.content_hash == content_hash(tiny_model) == content_hash(loaded)
    video = sample_video()
    z = tiny_model.encode(video)
    assert torch.equal(loaded.encode(video), z)
    assert torch.equal(loaded.decode(z, steps=2, seed=5), tiny_model.decode(z, steps=2, seed=5))


def test_vae_baseline_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_model(CDTConfig.from_preset("tiny"), "vae").eval()
    saved = save_pretrained(vae, tmp_path / "vae")  # no field given: measured
    loaded, identity = from_pretrained(tmp_path / "vae")
    assert isinstance(loaded, VAEBaseline) and identity == saved
    assert saved.receptive_field.decode_per_step == 0  # a deterministic decoder: one pass whatever the steps
    z = vae.encode(sample_video())
    out = loaded.decode(z)
    assert out.shape == (1, 3, 5, 16, 16) and torch.equal(out, vae.decode(z))


def test_receptive_field_is_recorded_beside_the_config(tiny_model, tiny_field, tmp_path, monkeypatch):
    digest = save_pretrained(tiny_model, tmp_path / "ck", receptive_field=tiny_field).content_hash
    record = json.loads((tmp_path / "ck" / "receptive_field.json").read_text())
    assert record["model_hash"] == digest and record["measured_by"] == "model.streaming.receptive_field.measure"
    assert (record["encode"], record["decode_base"], record["decode_per_step"]) == (
        tiny_field.encode, tiny_field.decode_base, tiny_field.decode_per_step)
    assert "receptive" not in (tmp_path / "ck" / "config.json").read_text()  # the hash does not cover it

    def measure(model):
        raise AssertionError("a checkpoint with a record must not be measured")

    monkeypatch.setattr("model.checkpoint.measure", measure)
    assert from_pretrained(tmp_path / "ck").identity == ModelIdentity(digest, tiny_field)


def test_a_record_of_other_weights_is_measured_again(tiny_model, tiny_field, tmp_path, monkeypatch):
    save_pretrained(tiny_model, tmp_path / "ck", receptive_field=tiny_field)
    path = tmp_path / "ck" / "receptive_field.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "model_hash": "0" * 64}))
    monkeypatch.setattr("model.checkpoint.measure", lambda model: ReceptiveField(4, 2, 1))
    identity = from_pretrained(tmp_path / "ck").identity
    assert identity == ModelIdentity(record["model_hash"], ReceptiveField(4, 2, 1))


def test_tampered_weights_are_detected(tiny_model, tiny_field, tmp_path):
    ck = tmp_path / "ck"
    save_pretrained(tiny_model, ck, receptive_field=tiny_field)
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # flip one bit of the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        from_pretrained(ck)


def test_tampered_config_is_detected(tiny_model, tiny_field, tmp_path):
    ck = tmp_path / "ck"
    save_pretrained(tiny_model, ck, receptive_field=tiny_field)
    header = json.loads((ck / "config.json").read_text())
    header["config"]["noise_scale"] = 1.0
    (ck / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        from_pretrained(ck)


def test_missing_or_foreign_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a cdt-checkpoint"):
        from_pretrained(tmp_path)


def test_bf16_storage_hash_is_stable_across_compute_dtypes(tiny_model, tiny_field, tmp_path):
    digest = save_pretrained(tiny_model, tmp_path / "ck", dtype="bf16", receptive_field=tiny_field).content_hash
    assert (tmp_path / "ck" / "model.safetensors").stat().st_size < 0.6 * 4 * sum(
        p.numel() for p in tiny_model.parameters())
    assert from_pretrained(tmp_path / "ck", dtype="fp32").identity.content_hash == digest
    assert from_pretrained(tmp_path / "ck", dtype="bf16").identity.content_hash == digest


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in [0,1] RGB of two [-1,1] videos."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse))


@pytest.mark.exactness
def test_bf16_matches_fp32(tiny_checkpoint):
    # bf16 convolutions are very slow on CPUs without AVX512-BF16: keep the input tiny.
    fp32 = from_pretrained(tiny_checkpoint, dtype="fp32").model
    bf16 = from_pretrained(tiny_checkpoint, dtype="bf16").model
    video = sample_video()
    z32, z16 = fp32.encode(video), bf16.encode(video)
    assert z16.dtype == torch.float32  # the KL head runs in fp32
    v32, v16 = fp32.decode(z32, seed=1), bf16.decode(z16, seed=1)
    measured = psnr(v16, v32)
    print(f"bf16 vs fp32 PSNR: {measured:.1f} dB")
    assert measured >= 35.0
    assert bf16.unet.time_embed.net[0].weight.dtype == torch.float32
    assert bf16.encoder.head.direct.weight.dtype == torch.float32
    assert bf16.unet.down[0]["blocks"][0].block1.conv.conv.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("capability, fast", [
    ((6, 1), False), ((7, 0), False), ((7, 5), False),  # Pascal; V100; T4
    ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((12, 0), True),  # A100; A10/3090; L4; H100
])
def test_bf16_is_fast_on_cuda_devices_of_compute_capability_8_and_above(capability, fast):
    assert cuda_bf16_is_fast(capability) is fast


def test_bf16_is_fast_on_a_cpu_with_onednn_bf16_kernels_and_not_on_an_absent_gpu():
    assert bf16_is_fast("cpu") is bf16_is_fast() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not torch.cuda.is_available()  # the claim below is about machines without CUDA
    assert bf16_is_fast("cuda") is False and bf16_is_fast("cuda:1") is False
