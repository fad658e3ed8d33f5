"""Layers that replace a stock PyTorch module for speed must compute the same thing."""

import pytest
import torch
from torch import nn

from model.layers import PointwiseConv3d


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
