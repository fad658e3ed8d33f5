"""The model paths the service runs, on a device that is not the CPU, without a GPU.

The device is a stand-in (`StandInDevice`): torch's fake tensors on the `meta` device type,
which have a device, a shape and a dtype but no values. An op that touches one runs on fake
tensors, which check devices as CUDA does: a CPU tensor (other than a 0-dim scalar) mixed into
it raises. Ops on CPU tensors alone run for real, so the host side of every path (parsing,
the noise drawn on the CPU, the diffusion tables) computes as it does beside a GPU. Three
more CUDA rules hold: a random op raises when its generator is on another device than its
output (CUDA's message), `.numpy()` of a device tensor raises, and a copy to the host is the
only way out: it gives zeros for the values the stand-in does not have, so what the host does
with them afterwards (answers, exported states) runs for real too.

What the stand-in cannot show: values computed on the device (a path that reads one, such as
`.item()`, raises here; the service's paths read none), a CUDA generator (none can be made
without CUDA: `media/diffusers_vae.py` draws on the generator's device by reading), and the
limits of CUDA's own kernels (nearest upsampling's, which tests/test_model_layers.py checks
the replacement of on the CPU). `cuda` itself cannot be the stand-in's device type: indexing a
tensor takes a device guard, which a CPU build of torch has only for the CPU and meta.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map_only

from model import CDTConfig, StreamingDecoder, StreamingEncoder, build_model

DEVICE = torch.device("meta")
HASH = "0" * 64  # the streams' states name their model by a hash: any, as long as it is the same
HOST_COPIES = (torch.ops.aten._to_copy, torch.ops.aten.to)  # under inference mode `.cpu()` arrives as `to`
VIDEO = torch.rand(1, 3, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # on the host
LATENTS = torch.randn(1, 16, 2, 1, 1, generator=torch.Generator().manual_seed(1))  # on the host


class StandInDevice(FakeTensorMode):
    """A device without values that keeps CUDA's rules (see the module docstring). `threads`
    collects the threads that computed on it."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)  # host tensors come in as CPU tensors
        self.threads: set[threading.Thread] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(isinstance(t, FakeTensor) for t in tensors)
        if kwargs.get("device") is not None:
            target = torch.device(kwargs["device"])
        else:
            target = tensors[0].device if tensors else torch.device("cpu")
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type != target.type:
            raise RuntimeError(f"Expected a '{target.type}' device type for generator but found "
                               f"'{generator.device.type}'")
        if not on_device and target != DEVICE:
            return func(*args, **kwargs)
        self.threads.add(threading.current_thread())
        if func.overloadpacket in HOST_COPIES and target.type == "cpu":
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        args, kwargs = tree_map_only(torch.Tensor, lambda t: t if isinstance(t, FakeTensor) else self.from_tensor(t),
                                     (args, kwargs))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.fixture(scope="module")
def device() -> StandInDevice:
    return StandInDevice()


@pytest.fixture(scope="module")
def models(device):
    """The tiny CDT and VAE baseline, moved onto the stand-in as a checkpoint is loaded onto a GPU."""
    torch.manual_seed(0)
    config = CDTConfig.from_preset("tiny")
    with device:
        return {kind: build_model(config, kind).eval().to(DEVICE) for kind in ("cdt", "vae")}


@contextmanager
def job(device: StandInDevice):
    """What a model job runs in: the worker pool's inference mode, here on the stand-in."""
    with device, torch.inference_mode():
        yield


def on_device(*tensors: torch.Tensor) -> bool:
    return all(t.device == DEVICE for t in tensors)


# --- the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cdt", "vae"])
def test_whole_clip_encode_and_decode_take_host_inputs(models, device, kind):
    with job(device):
        latents = models[kind].encode(VIDEO)
        frames = models[kind].decode(LATENTS, steps=2, seed=3)
    assert on_device(latents, frames)
    assert latents.shape == LATENTS.shape and frames.shape == VIDEO.shape


def test_a_posterior_sample_draws_from_a_host_generator(models, device):
    with job(device):
        sample = models["cdt"].encode(VIDEO, sample=True, generator=torch.Generator().manual_seed(0))
    assert on_device(sample) and sample.shape == LATENTS.shape


def test_streams_compute_on_the_device_and_their_states_follow_the_model(models, device):
    model = models["cdt"]
    with job(device):
        encoder = StreamingEncoder(model, HASH)
        latents = [encoder.push(VIDEO[:, :, :3]), encoder.push(VIDEO[:, :, :0])]
        state = encoder.export_state()  # copied to the host, serialised
        encoder = StreamingEncoder.from_state(model, HASH, state)
        assert on_device(*encoder.cache.tensors.values())
        latents += [encoder.push(VIDEO[:, :, 3:]), encoder.finish()]

        decoder = StreamingDecoder(model, HASH, steps=2, seed=3)
        frames = [decoder.push(LATENTS[:, :, :1]), decoder.push(LATENTS[:, :, :0])]
        decoder = StreamingDecoder.from_state(model, HASH, decoder.export_state())
        assert on_device(*decoder.cache.tensors.values())
        frames.append(decoder.push(LATENTS[:, :, 1:]))
    assert on_device(*latents, *frames)
    assert [z.shape[2] for z in latents] == [1, 0, 1, 0] and [v.shape[2] for v in frames] == [1, 0, 4]
