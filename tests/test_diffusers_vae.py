"""media.diffusers_vae: CDT in diffusers' VAE conventions, checked against diffusers' own output
and distribution classes and against the Tokenizer it wraps."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from media import frames_to_tensor
from media.diffusers_vae import CDTAutoencoder
from model import from_pretrained
from model.encoder import Posterior
from tests.session_helpers import real_frames


STEPS, SEED = 2, 5

# CDTAutoencoder calls the Tokenizer's own encode and decode: equal by construction.


@pytest.fixture(scope="module")
def vae(tiny_checkpoint):
    return CDTAutoencoder.from_pretrained(tiny_checkpoint, steps=STEPS, seed=SEED)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return from_pretrained(tiny_checkpoint).model


@pytest.fixture(scope="module")
def video(shared_videos):
    """5 real frames of 24x24 as (1,3,T,H,W) in [-1,1]."""
    return frames_to_tensor(real_frames(shared_videos, 5, size=24)[:, :24])


def test_config_states_the_latent_conventions(vae):
    config = vae.config
    assert (config.scaling_factor, config.shift_factor, config.latent_channels) == (1.0, 0.0, 16)
    assert (config.spatial_compression_ratio, config.temporal_compression_ratio) == (8, 4)
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"


def test_encode_answers_diffusers_posterior_over_cdts(vae, tokenizer, video):
    output = vae.encode(video)
    assert isinstance(output, AutoencoderKLOutput)
    dist = output.latent_dist
    assert isinstance(dist, DiagonalGaussianDistribution)
    assert torch.equal(dist.mode(), tokenizer.encode(video))
    posterior = tokenizer.posterior(video)
    ours = Posterior(posterior.mean.float(), posterior.logvar.float())
    drawn = dist.sample(torch.Generator().manual_seed(1))
    assert torch.allclose(drawn, ours.sample(torch.Generator().manual_seed(1)), atol=1e-6)
    assert not torch.equal(drawn, dist.mode())
    # diffusers sums the KL over dims 1-3 (channels, time, height); over width too it is ours.
    assert torch.allclose(dist.kl().sum(-1), ours.kl(), rtol=1e-5)
    assert vae.encode(video, return_dict=False)[0].mode().shape == dist.mode().shape


def test_decode_of_the_mode_is_the_tokenizers_reconstruction(vae, tokenizer, video):
    output = vae.decode(vae.encode(video).latent_dist.mode())
    assert isinstance(output, DecoderOutput)
    reconstruction = tokenizer.decode(tokenizer.encode(video), steps=STEPS, seed=SEED)
    assert output.sample.shape == video.shape and torch.equal(output.sample, reconstruction)
    z = tokenizer.encode(video)
    assert torch.equal(vae.decode(z, return_dict=False)[0], reconstruction)
    # A generator draws the noise seed, as diffusers passes one: repeatable, and not the default.
    first = vae.decode(z, generator=torch.Generator().manual_seed(7)).sample
    assert torch.equal(first, vae.decode(z, generator=torch.Generator().manual_seed(7)).sample)
    assert not torch.equal(first, reconstruction)


def test_images_are_one_frame_clips(vae, tokenizer, video):
    image = video[:, :, 0]  # (1,3,H,W)
    z = vae.encode(image).latent_dist.mode()
    assert z.shape == (1, 16, 3, 3) and torch.equal(z, tokenizer.encode(video[:, :, :1])[:, :, 0])
    decoded = vae.decode(z).sample
    assert decoded.shape == image.shape
    assert torch.equal(decoded, tokenizer.decode(z.unsqueeze(2), steps=STEPS, seed=SEED)[:, :, 0])


def test_shapes_off_the_grid_are_refused(vae, video):
    with pytest.raises(ValueError):
        vae.encode(video[:, :, :4])  # 4 frames: not 1+4k
