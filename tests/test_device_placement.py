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

The service tests run the app in process with its model moved onto the stand-in and its model
thread computing there (a torch mode is per thread), and check that only that thread touched
the device: the event loop never waits on it, and the timings of the model jobs include their
copies to the host.

What the stand-in cannot show: values computed on the device (a path that reads one, such as
`.item()`, raises here; the service's paths read none), a CUDA generator (none can be made
without CUDA: `media/diffusers_vae.py` draws on the generator's device by reading), and the
limits of CUDA's own kernels (nearest upsampling's, which tests/test_model_layers.py checks
the replacement of on the CPU). `cuda` itself cannot be the stand-in's device type: indexing a
tensor takes a device guard, which a CPU build of torch has only for the CPU and meta.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map_only

from media.diffusers_vae import CDTAutoencoder
from model import DEFAULT_CHECKPOINT, CDTConfig, StreamingDecoder, StreamingEncoder, build_model
from service import Settings, create_app
from tests.servers import metric_sum
from tests.session_helpers import npy_array, npy_bytes

DEVICE = torch.device("meta")
HASH = "0" * 64  # the streams' states name their model by a hash: any, as long as it is the same
NPY = {"content-type": "application/x-npy"}
SAFETENSORS = {"content-type": "application/x-safetensors"}
TENSOR = {"content-type": "tensor/binary"}
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


def test_the_diffusers_vae_takes_host_inputs_and_a_host_generator(models, device):
    vae = CDTAutoencoder(models["cdt"], steps=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    with job(device):
        posterior = vae.encode(VIDEO).latent_dist
        image = vae.encode(VIDEO[:, :, 0]).latent_dist.mode()
        frames = vae.decode(posterior.sample(generator), generator=generator).sample
        picture = vae.decode(image, generator=generator).sample
    assert on_device(posterior.mode(), image, frames, picture)
    assert frames.shape == VIDEO.shape and picture.shape == VIDEO[:, :, 0].shape


# --- the service ----------------------------------------------------------------------------

def serve_on_stand_in(scenario, **settings):
    """`scenario(app, http)` against the service in process, its model on a stand-in device;
    returns its result once the service has stopped, after checking that only the model
    thread computed on the device."""
    device = StandInDevice()
    app = create_app(Settings(checkpoint=DEFAULT_CHECKPOINT, **settings))

    async def main():
        async with app.router.lifespan_context(app):
            pool = app.state.pool
            with device:
                pool.models.default.reference.to(DEVICE)
            # The model thread enters the stand-in for good (a mode is per thread), outside any job:
            # a job runs in inference mode, whose exit would leave the mode stacked but bypassed.
            enter = pool.workers[0]._executor.submit(lambda: (device.__enter__(), threading.current_thread())[1])
            model_thread = enter.result()
            device.threads.clear()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
                result = await scenario(app, http)
        assert device.threads == {model_thread}, f"the device was used by {device.threads}"
        return result

    return asyncio.run(main())


def ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


def test_whole_clip_and_diffusers_routes_answer_from_host_copies():
    """Every answer builder runs on host tensors that the model jobs copied off the device."""
    frames = np.zeros((9, 8, 8, 3), dtype=np.uint8)
    remote_decode = "/v1/diffusers/decode"
    latents = {"shape": [1, 16, 1, 1, 1], "dtype": "float32"}
    latent_bytes = np.zeros((1, 16, 1, 1, 1), dtype=np.float32).tobytes()

    async def scenario(app, http):
        encoded = ok(await http.post("/v1/encode", content=npy_bytes(frames), headers=NPY))
        decoded = ok(await http.post("/v1/decode", params={"format": "npy"}, content=encoded.content,
                                     headers=SAFETENSORS))
        assert npy_array(decoded.content).shape == frames.shape
        for shape, latent_shape in (([1, 3, 5, 8, 8], [1, 16, 2, 1, 1]), ([1, 3, 8, 8], [1, 16, 1, 1])):
            body = np.zeros(shape, dtype=np.float32).tobytes()
            answer = ok(await http.post("/v1/diffusers/encode", params={"shape": shape, "dtype": "float32"},
                                        content=body, headers=TENSOR))
            assert json.loads(answer.headers["shape"]) == latent_shape
        answers = {}
        for name, params, accept in (("pt", {"output_type": "pt"}, "*/*"),
                                     ("uint8", {"output_type": "pt", "partial_postprocess": True}, "*/*"),
                                     ("pil frames", {"output_type": "pil"}, TENSOR["content-type"]),
                                     ("image", {"output_type": "pil", "image_format": "png"}, "*/*"),
                                     ("mp4", {"output_type": "mp4"}, "*/*")):
            answers[name] = ok(await http.post(remote_decode, params={**latents, **params}, content=latent_bytes,
                                               headers={**TENSOR, "accept": accept}))
        return answers

    answers = serve_on_stand_in(scenario)
    assert json.loads(answers["pt"].headers["shape"]) == [1, 3, 1, 8, 8]
    assert json.loads(answers["uint8"].headers["shape"]) == [1, 8, 8, 3]
    assert json.loads(answers["pil frames"].headers["shape"]) == [1, 3, 8, 8]
    assert answers["image"].headers["content-type"] == "image/png"
    assert answers["mp4"].headers["content-type"] == "video/mp4"


def test_session_chunks_and_rebuilds_from_a_resumed_stream_run_on_the_device():
    """No stream stays hot, so every chunk after the first rebuilds its stream from the log. By
    the last chunk the first has left the receptive field, and so the log: the stream is
    resumed mid-video and replays the log from there."""
    frames = np.zeros((40 + 72 + 4, 8, 8, 3), dtype=np.uint8)
    latents = np.zeros((1, 16, 2 + 60 + 1, 1, 1), dtype=np.float32)

    async def scenario(app, http):
        rebuilds, windows = {}, {}
        for kind, data, sizes in (("encode", frames, (40, 72, 4)), ("decode", latents, (2, 60, 1))):
            sid = (await http.post("/v1/sessions", json={"kind": kind})).json()["id"]
            start, rebuilds[kind] = 0, []
            for seq, size in enumerate(sizes):
                part = data[start : start + size] if kind == "encode" else data[:, :, start : start + size]
                answer = ok(await http.post(f"/v1/sessions/{sid}/chunks/{seq}", params={"format": "npy"},
                                            content=npy_bytes(part), headers=NPY))
                rebuilds[kind].append(answer.headers.get("x-cdt-rebuild", ""))
                start += size
            ok(await http.post(f"/v1/sessions/{sid}/finish", params={"format": "npy"} if kind == "encode" else {}))
            windows[kind] = metric_sum((await http.get("/metrics")).text, "cdt_session_rebuilds_total",
                                       source="window")
        return rebuilds, windows

    rebuilds, windows = serve_on_stand_in(scenario, session_hot_mb=0.001, session_snapshot_mb=0)
    assert rebuilds == {"encode": ["", "evicted", "evicted"], "decode": ["", "evicted", "evicted"]}
    assert windows["encode"] >= 1 and windows["decode"] > windows["encode"]
