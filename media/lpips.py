"""LPIPS (Zhang et al. 2018) over a local AlexNet or VGG16 backbone; never downloads.

torchvision cannot be installed beside this torch build, so the backbones are rebuilt
here with torchvision's module indices: its state dicts (`features.N.weight`) load as
they are. The learned per-channel heads of the LPIPS release (`lin0.model.1.weight` ...
`lin4`, from its alex.pth / vgg.pth) are optional; without them every channel weighs
the same (the paper's unlearned baseline), and the description says which was used.
Weights load with `torch.load(weights_only=True)` or from safetensors, never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

LPIPS_SKIPPED = "LPIPS skipped (no --lpips-weights given)"

# torchvision `features` layouts: (out_channels, kernel, stride, padding) convs, "M" max-pools.
_ALEX = [(64, 11, 4, 2), "M3", (192, 5, 1, 2), "M3", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
_VGG16 = [(64, 3, 1, 1), (64, 3, 1, 1), "M2", (128, 3, 1, 1), (128, 3, 1, 1), "M2",
          (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M2",
          (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), "M2", (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1)]
# ReLU outputs LPIPS compares (torchvision indices): alex relu1-5, vgg relu1_2 .. relu5_3.
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg16": (3, 8, 15, 22, 29)}
_LAYOUTS = {"alex": _ALEX, "vgg16": _VGG16}
# LPIPS input scaling (its ScalingLayer), applied to images in [-1, 1].
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
_FRAMES_PER_BATCH = 4
MIN_SIDE = 32  # AlexNet's stride-4 stem and pools leave no pixels below this


def _features(layout: list) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for item in layout:
        if isinstance(item, str):
            layers.append(nn.MaxPool2d(kernel_size=int(item[1:]), stride=2))
        else:
            cout, kernel, stride, pad = item
            layers += [nn.Conv2d(cin, cout, kernel, stride, pad), nn.ReLU(inplace=False)]
            cin = cout
    return nn.Sequential(*layers)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path}: no such LPIPS weights file")
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many types for bad files
        raise ValueError(f"{path}: unreadable LPIPS weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: LPIPS weights must be a state dict")
    return state


class LPIPS:
    """Perceptual distance (lower is closer): `score` between uint8 (T,H,W,3) clips, mean
    over frames, for evaluation; `distance` between float images with gradients, for the
    training loss. The network itself is frozen."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.arch = "vgg16" if "features.28.weight" in state else "alex"
        self.features = _features(_LAYOUTS[self.arch]).eval().requires_grad_(False)
        backbone = {k: v.float() for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items()})
        except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
            reason = str(exc).splitlines()[-1].strip()
            raise ValueError(f"LPIPS weights do not fit the {self.arch} backbone ({reason})") from None
        heads = {int(m.group(1)): v.float() for k, v in state.items()
                 if (m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", k))}
        self.learned = bool(heads)
        self.heads = [heads[i].flatten() for i in range(len(_TAPS[self.arch]))] if heads else None
        kind = "learned LPIPS v0.1 heads" if self.learned else "unlearned (uniform) channel weights"
        self.description = f"LPIPS {self.arch}, {kind}"

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, taps = (x - _SHIFT.to(x.device)) / _SCALE.to(x.device), []
        for index, layer in enumerate(self.features):
            out = layer(out)
            if index in _TAPS[self.arch]:
                taps.append(out / (out.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            if index == _TAPS[self.arch][-1]:
                break
        return taps

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance between (N,3,H,W) float images in [-1,1]; differentiable."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two (N,3,H,W) batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[2:]) < MIN_SIDE:
            raise ValueError(f"LPIPS needs frames of at least {MIN_SIDE}x{MIN_SIDE}, got {tuple(x.shape[2:])}")
        x, y = x.float(), y.float()
        self.features.to(x.device)  # the training loss runs wherever the decoder does
        total = torch.zeros(x.shape[0], device=x.device)
        for i, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            diff = (fx - fy) ** 2
            weighted = ((diff * self.heads[i].to(x.device).view(1, -1, 1, 1)).sum(dim=1) if self.learned
                        else diff.sum(dim=1))
            total += weighted.mean(dim=(1, 2))
        return total

    def score(self, reference: np.ndarray, test: np.ndarray) -> float:
        if reference.shape != test.shape:
            raise ValueError(f"clips differ in shape: {reference.shape} vs {test.shape}")
        distances = []
        for i in range(0, len(reference), _FRAMES_PER_BATCH):
            x, y = (_to_input(a[i : i + _FRAMES_PER_BATCH]) for a in (reference, test))
            with torch.no_grad():
                distances.append(self.distance(x, y))
        return float(torch.cat(distances).mean())


def _to_input(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_lpips(*paths: str | Path) -> LPIPS:
    """LPIPS from one or more local state-dict files (backbone, optionally the heads), merged."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(_read_state(Path(path)))
    return LPIPS(state)
