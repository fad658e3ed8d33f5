"""Layers that replace a stock PyTorch module or function (for speed, or past a CUDA kernel's
limit) must compute the same thing, and stateful layers resumed mid-stream keep the stream's
frame phase."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import FeatureCache
from model.layers import PointwiseConv3d, TimeDownsample, TimeUpsample, Upsample, nearest_up2

pytestmark = pytest.mark.exactness


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_pointwise_conv_equals_a_1x1x1_conv3d(bias, layout):
    torch.manual_seed(0)
    fast, stock = PointwiseConv3d(6, 10, bias=bias), nn.Conv3d(6, 10, 1, bias=bias)
    stock.load_state_dict(fast.state_dict())  # same parameters and keys
    x = torch.randn(2, 6, 3, 5, 7).contiguous(memory_format=layout).requires_grad_(True)
    y_fast, y_stock = fast(x), stock(x)
    assert y_fast.shape == (2, 10, 3, 5, 7)
    torch.testing.assert_close(y_fast, y_stock, rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(y_fast.square().sum(), [x, fast.weight])
    g_stock = torch.autograd.grad(y_stock.square().sum(), [x, stock.weight])
    for a, b in zip(g_fast, g_stock):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def started_cache() -> FeatureCache:
    cache = FeatureCache()
    cache.started = True
    return cache


@pytest.mark.parametrize("time_pad", ["zeros", "replicate"])
def test_time_downsample_resumed_mid_stream_keeps_the_stride_phase(time_pad):
    """Without its entry, a started cache pads the 1 frame of steady state: as if the
    stream's previous frame were the padding (zeros, or a copy of the chunk's first)."""
    torch.manual_seed(0)
    layer = TimeDownsample(4, time_pad)
    layer.cache_key = "down"
    chunk = torch.randn(1, 4, 4, 3, 3)
    previous = chunk[:, :, :1] if time_pad == "replicate" else torch.zeros_like(chunk[:, :, :1])
    uninterrupted = FeatureCache()
    layer(previous, uninterrupted)
    uninterrupted.started = True
    resumed = started_cache()
    with torch.no_grad():
        assert torch.equal(layer(chunk, resumed), layer(chunk, uninterrupted))
    assert torch.equal(resumed.get("down"), uninterrupted.get("down"))


def test_time_upsample_drops_the_first_frame_only_at_a_stream_start():
    layer = TimeUpsample(4)
    x = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        assert layer(x).shape[2] == layer(x, FeatureCache()).shape[2] == 5
        assert layer(x, started_cache()).shape[2] == 6
        assert layer(x, started_cache().scope("step1/")).shape[2] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1, 1), (1, 4, 3, 5, 7), (2, 6, 2, 8, 3)])
def test_nearest_upsampling_copies_what_interpolate_computes(shape, layout, dtype):
    torch.manual_seed(0)
    b, c, t, h, w = shape
    x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    stock = F.interpolate(x.reshape(b, c * t, h, w), scale_factor=2.0, mode="nearest").reshape(b, c, t, 2 * h, 2 * w)
    assert torch.equal(nearest_up2(x), stock)
    layer = Upsample(c, 5, "nearest", kernel=3).to(dtype)  # the U-Net's: nearest x2, then a conv
    assert torch.equal(layer(x), layer.conv(stock.contiguous()))
