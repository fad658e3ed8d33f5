"""The shipped checkpoints (`checkpoints/cdt-tiny`, the default, and `checkpoints/cdt-tiny-t8`,
its 8x growth): their weights are the ones their committed evaluations measured, and they
still reconstruct as evaluated. A change to the model code or the weights that moves their
quality fails here (then the evaluation is rerun), not in a user's hands."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from model import DEFAULT_CHECKPOINT, from_pretrained
from tests.conftest import REPO

# `cdt eval` of each shipped checkpoint on the val clips at 17x128x128, 1 step (the file
# records its command, commit and machine).
SHIPPED = {
    "cdt-tiny": (DEFAULT_CHECKPOINT, REPO / "docs" / "eval" / "cdt-tiny_17x128_steps1.json"),
    "cdt-tiny-t8": (REPO / "checkpoints" / "cdt-tiny-t8", REPO / "docs" / "eval" / "cdt-tiny-t8_17x128_steps1.json"),
}
# Another CPU's kernels round a few decoded values to the neighbouring uint8 level, which
# moves the PSNR by about 1e-5 dB (measured on AVX2 and unvectorised kernels); any change of
# the model's arithmetic moves it by more, and then the evaluation is rerun.
TOLERANCE_DB = 1e-3


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_the_evaluated_ones(name):
    checkpoint, evaluation = SHIPPED[name]
    evaluation = json.loads(evaluation.read_text())
    identity = from_pretrained(checkpoint).identity  # checks the weights against model.sha256
    recorded = (checkpoint / "model.sha256").read_text().split()[0]
    assert identity.content_hash == recorded == evaluation["checkpoint"]["hash"]


@pytest.mark.exactness
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_reconstructs_a_val_clip_as_evaluated(name, capsys):
    checkpoint, evaluation = SHIPPED[name]
    evaluation = json.loads(evaluation.read_text())
    protocol, clip = evaluation["protocol"], evaluation["clips"][0]
    assert (protocol["frames"], protocol["size"], protocol["steps"]) == (17, 128, 1)
    code = main(["eval", "--checkpoint", str(checkpoint), "--videos", str(REPO / clip["path"]), "--frames", "17",
                 "--size", "128", "--steps", "1", "--seed", str(protocol["seed"]), "--json", "--quiet"])
    assert code == 0
    measured = json.loads(capsys.readouterr().out)["clips"][0]
    assert abs(measured["psnr"] - clip["psnr"]) <= TOLERANCE_DB, (measured, clip)
