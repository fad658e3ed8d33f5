"""Causal 3D building blocks. Every layer maps a frame sequence to a frame sequence and
never looks at a later frame than its chunk holds, so chunked processing equals
whole-clip processing.

Layers that carry state between chunks subclass `Stateful`; the model assigns each
a unique `cache_key` once at construction. The state itself lives in a FeatureCache
passed to `forward` (None = process a standalone clip).

A layer without a cache entry pads the missing past (zeros or copies of the chunk's
first frame, per `time_pad`) with as many frames as its position in the stream calls
for: at a stream's start (or for a standalone clip) the first-frame padding, in a
started cache (a stream resumed mid-way) the number of frames it keeps in steady state.
No layer keeps any other history, so a stream's state depends only on a bounded window
of recent inputs (model/streaming/receptive_field.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheScope, FeatureCache

Cache = FeatureCache | CacheScope | None


class Stateful(nn.Module):
    cache_key: str = ""  # set per instance by `assign_cache_keys`


def assign_cache_keys(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if isinstance(module, Stateful):
            module.cache_key = name


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device`, for the modules that compute in float32 whatever the caller
    autocasts. A device type without autocast (meta) has none to turn off, and
    `torch.autocast` raises for it."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _with_past(x: torch.Tensor, past: torch.Tensor | None, frames: int, time_pad: str) -> torch.Tensor:
    """x with earlier frames prepended along time: the cached `past`, or without one
    `frames` frames of padding (copies of the first frame, or zeros).

    The past takes x's dtype and memory layout: activations are channels-last after the
    first LayerNorm, and a cat of mixed layouts measured 4x slower than a same-layout one."""
    if past is None:
        first = x[:, :, :1]
        past = (first if time_pad == "replicate" else torch.zeros_like(first)).expand(-1, -1, frames, -1, -1)
    return torch.cat([past.to(x.dtype).contiguous(memory_format=_memory_format(x)), x], dim=2)


class PointwiseConv3d(nn.Conv3d):
    """1x1x1 Conv3d computed as one matrix product over the channels.

    Same parameters and state-dict keys as nn.Conv3d(cin, cout, 1). On the CPU oneDNN's
    1x1x1 convolution measured 1.4-2x slower than a GEMM at 2 threads (it reorders the
    activations into its blocked layout first), and a float32 channels-last input fell
    back to PyTorch's reference convolution. Both layouts have a copy-free GEMM view:
    (B, C, THW) for contiguous input, (B*THW, C) for float32 channels-last. bf16
    channels-last keeps oneDNN's convolution: it is fast there, and unlike the GEMM its
    result does not depend on the chunk length, so streaming stays bit-identical."""

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.out_channels, self.in_channels)
        if x.dtype == torch.float32 and _memory_format(x) == torch.channels_last_3d:
            return F.linear(x.permute(0, 2, 3, 4, 1), weight, self.bias).permute(0, 4, 1, 2, 3)
        if not x.is_contiguous():
            return super().forward(x)
        b = x.shape[0]
        flat = x.view(b, self.in_channels, -1)
        weight = weight.expand(b, -1, -1)
        y = torch.bmm(weight, flat) if self.bias is None else torch.baddbmm(self.bias.view(1, -1, 1), weight, flat)
        return y.view(b, self.out_channels, *x.shape[2:])


class CausalConv3d(Stateful):
    """Conv3d padded on the left in time only; the cache holds the last kt-1 input frames.

    A missing past is kt-1 frames at a stream's start and in steady state alike."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        time_pad: str = "zeros",
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel
        self.context = kt - 1
        self.time_pad = time_pad
        self.conv = nn.Conv3d(cin, cout, kernel, padding=(0, kh // 2, kw // 2), bias=bias)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        if self.context == 0:
            return self.conv(x)
        x = _with_past(x, cache.get(self.cache_key) if cache is not None else None, self.context, self.time_pad)
        if cache is not None:
            cache.set(self.cache_key, x[:, :, -self.context :])
        return self.conv(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every (t, h, w): no statistics across time or space."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B,C,T,H,W) -> channels last is a free view when x is channels_last_3d.
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), time_pad: str = "zeros") -> None:
        super().__init__()
        self.conv = CausalConv3d(cin, cout, kernel, time_pad)
        self.norm = ChannelLayerNorm(cout)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x, cache)))


class ResnetBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        temb_dim: int = 0,
        time_pad: str = "zeros",
        first_kernel=(3, 3, 3),
    ) -> None:
        super().__init__()
        self.block1 = Block(cin, cout, first_kernel, time_pad)
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.block2 = Block(cout, cout, (3, 3, 3), time_pad)
        self.skip = PointwiseConv3d(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, cache: Cache = None) -> torch.Tensor:
        h = self.block1(x, cache)
        if self.temb is not None:
            if temb is None:
                raise ValueError("this ResnetBlock needs a time embedding")
            h = h + self.temb(F.leaky_relu(temb, 0.2).to(h.dtype))[:, :, None, None, None]
        h = self.block2(h, cache)
        return h + self.skip(x)


class Downsample(nn.Module):
    """Spatial x2 down: conv (1,3,3) stride (1,2,2). Odd sizes round up."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def nearest_up2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, T, 2H, 2W), each pixel copied into a 2x2 block: the values of
    `F.interpolate(mode="nearest", scale_factor=2)` on the frames, as one broadcast copy.
    CUDA's nearest-interpolation kernels fail on outputs of 2^31 elements or more (PyTorch
    issues 141831 and 144855), which the U-Net's upsampling of an 8-frame chunk reaches above
    ~2 megapixels a frame in CDT-S and at 1080p in CDT-B; an elementwise copy has no such limit."""
    b, c, t, h, w = x.shape
    return x[:, :, :, :, None, :, None].expand(b, c, t, h, 2, w, 2).reshape(b, c, t, 2 * h, 2 * w)


class Upsample(nn.Module):
    """Spatial x2 up, by a transposed conv (1,5,5) or nearest x2 + conv (1,k,k)."""

    def __init__(self, cin: int, cout: int, mode: str, kernel: int = 5) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transposed":
            self.conv = nn.ConvTranspose3d(
                cin, cout, (1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), output_padding=(0, 1, 1)
            )
        else:
            self.conv = nn.Conv3d(cin, cout, (1, kernel, kernel), padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.mode == "nearest":
            x = nearest_up2(x)
        x = self.conv(x)
        if size is not None:
            x = x[..., : size[0], : size[1]]
        return x


class TimeDownsample(Stateful):
    """Per pixel, a causal 1D conv along time, kernel 3, stride 2, left pad 2.

    Lengths 1+2k -> 1+k. The cache holds the input frames not yet consumed by an
    output (1 frame after each aligned chunk).
    """

    START_PAD = 2  # so that a stream's first frame makes its first output
    STEADY_PAD = 1  # the frame left over by an aligned chunk

    def __init__(self, channels: int, time_pad: str = "zeros") -> None:
        super().__init__()
        self.time_pad = time_pad
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))
        with torch.no_grad():  # identity-like: start by passing the newest frame through
            self.conv.weight[:, :, 2, 0, 0] += torch.eye(channels)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        past = cache.get(self.cache_key) if cache is not None else None
        # Mid-stream, padding the start's 2 frames would shift the stride phase by one.
        missing = self.STEADY_PAD if cache is not None and cache.started else self.START_PAD
        x = _with_past(x, past, missing, self.time_pad)
        n_out = (x.shape[2] - 3) // 2 + 1 if x.shape[2] >= 3 else 0
        if cache is not None:
            cache.set(self.cache_key, x[:, :, 2 * n_out :])
        if n_out == 0:
            return x[:, :, :0]
        return self.conv(x[:, :, : 2 * n_out + 1])


class TimeUpsample(nn.Module):
    """Per pixel, 1x1 conv to 2C channels, interleaved into 2T frames. The first output
    frame of a stream (a cache not yet started, or a standalone clip) is dropped, so
    1+k frames become 1+2k. It keeps no state."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = PointwiseConv3d(channels, 2 * channels)
        with torch.no_grad():  # identity-like: both new frames start as copies
            eye = torch.eye(channels)[:, :, None, None, None]
            self.conv.weight.mul_(0.1).add_(torch.cat([eye, eye], 0))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.conv(x).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        first = cache is None or not cache.started
        return y[:, :, 1:] if first and t > 0 else y


class LinearAttention(nn.Module):
    """Residual pre-norm linear attention, per frame over space, one head.

    softmax(q) over channels, softmax(k) over positions, out = (k v^T)^T q.
    The attention core runs in float32: the softmax over all positions of a frame
    is a long reduction.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.qkv = PointwiseConv3d(channels, 3 * channels, bias=False)
        self.out = PointwiseConv3d(channels, channels)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, T, H, W), channels-last in memory
        # (BT, N, 3C) is a free view of channels-last activations.
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, 3 * c).float()
        q, k, v = qkv.split(c, dim=2)
        q = q.softmax(dim=2) * self.scale
        k = k.softmax(dim=1)
        context = torch.bmm(k.transpose(1, 2), v)  # (BT, C, C)
        out = torch.bmm(q, context)  # (BT, N, C)
        out = out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3).to(x.dtype)
        return x + self.out(out)
