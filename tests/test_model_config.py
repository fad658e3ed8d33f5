import json

import pytest
import torch

from cli.main import main as cdt_main
from model import PRESETS, CDTConfig, build_model, from_pretrained

REFERENCE = {"small": 120.7e6, "base": 192.6e6}


@pytest.mark.parametrize("preset", ["small", "base"])
def test_reference_parameter_counts_within_3_percent(preset):
    count = build_model(CDTConfig.from_preset(preset), "cdt").parameter_counts()["parameters"]
    assert abs(count / REFERENCE[preset] - 1) < 0.03, count


def test_tiny_is_a_few_million_parameters():
    count = build_model(CDTConfig.from_preset("tiny"), "cdt").parameter_counts()["parameters"]
    assert 2e6 < count < 10e6


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_vae_baseline_shares_encoder_and_matches_decoder_size(preset):
    config = CDTConfig.from_preset(preset)
    cdt, vae = build_model(config, "cdt").parameter_counts(), build_model(config, "vae").parameter_counts()
    assert cdt["encoder_parameters"] == vae["encoder_parameters"]
    assert abs(vae["decoder_parameters"] / cdt["decoder_parameters"] - 1) < 0.10


def test_config_json_round_trip_and_validation():
    config = CDTConfig.from_preset("small")
    assert CDTConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown preset"):
        CDTConfig.from_preset("huge")
    with pytest.raises(ValueError, match="time_pad"):
        CDTConfig.from_preset("tiny", time_pad="reflect")
    with pytest.raises(ValueError, match="unknown config fields"):
        CDTConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_time_pad_is_per_model_not_shared_state():
    """Two models with different padding in one process keep their own behaviour."""
    torch.manual_seed(0)
    zeros = build_model(CDTConfig.from_preset("tiny"), "cdt").eval()
    replicate = build_model(CDTConfig.from_preset("tiny", time_pad="replicate"), "cdt").eval()
    replicate.load_state_dict(zeros.state_dict())
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    a1 = zeros.encode(video)
    b = replicate.encode(video)
    a2 = zeros.encode(video)
    assert torch.equal(a1, a2)
    assert not torch.allclose(a1, b)


def test_cli_info_json(capsys):
    assert cdt_main(["info", "--preset", "small", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"] == "small"
    assert report["parameters"] == report["encoder_parameters"] + report["decoder_parameters"]
    assert abs(report["parameters"] / REFERENCE["small"] - 1) < 0.03


def test_cli_init_writes_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cdt_main(["init", "--preset", "tiny", "-o", str(out), "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert from_pretrained(out).identity.content_hash == printed["hash"]
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "model.sha256",
                                               "receptive_field.json"}
    # The seed decides the weights.
    assert cdt_main(["init", "--preset", "tiny", "-o", str(tmp_path / "again"), "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == printed["hash"]
