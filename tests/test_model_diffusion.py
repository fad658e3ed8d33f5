import math

import pytest
import torch

from model import CosineSchedule, frame_noise


def test_cosine_schedule_matches_formula():
    schedule = CosineSchedule(8192)
    s, big_t = 0.008, 8192
    f = lambda t: math.cos(((t / big_t) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 1, 100, 2048, 4096, 6000, 8000]:
        # Index t is the level after t+1 forward steps: abar = f(t+1)/f(0).
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9, abs=1e-12)
    assert schedule.betas.max().item() <= 0.999
    assert torch.all(schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1])


def test_training_quantities():
    schedule = CosineSchedule(8192)
    t = torch.tensor([0, 4095, 8191])
    abar = schedule.alpha_bar(t)
    assert torch.allclose(schedule.snr(t), abar / (1 - abar))
    weight = schedule.loss_weight(t, 1.0, 5.0)
    assert weight[0] == 5.0 and weight[2] == 1.0 and torch.all((weight >= 1.0) & (weight <= 5.0))
    x0, noise = torch.randn(3, 3, 1, 4, 4), torch.randn(3, 3, 1, 4, 4)
    xt = schedule.q_sample(x0, t, noise)
    expected = abar.sqrt().view(-1, 1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1, 1) * noise
    assert torch.allclose(xt, expected)


def test_ddim_timesteps_from_the_top():
    schedule = CosineSchedule(8192)
    assert schedule.ddim_timesteps(1) == [8191]
    assert schedule.ddim_timesteps(3) == [8191, 4096, 0]
    with pytest.raises(ValueError):
        schedule.ddim_timesteps(0)


def test_one_step_ddim_is_the_denoiser_x0_estimate(tiny_model):
    torch.manual_seed(1)
    latents = torch.randn(1, 16, 2, 2, 2)
    video = tiny_model.decode(latents, steps=1, seed=11)
    x_t = 0.8 * frame_noise(11, 0, 5, (1, 3, 16, 16))
    with torch.no_grad():
        x0 = tiny_model.denoise(x_t, torch.tensor([8191]), tiny_model.contexts(latents))
    assert torch.equal(video, x0)


def test_noise_is_reproducible_and_independent_of_chunking():
    whole = frame_noise(5, 0, 9, (2, 3, 8, 8))
    parts = torch.cat([frame_noise(5, 0, 1, (2, 3, 8, 8)), frame_noise(5, 1, 3, (2, 3, 8, 8)),
                       frame_noise(5, 4, 5, (2, 3, 8, 8))], dim=2)
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, frame_noise(6, 0, 9, (2, 3, 8, 8)))
    assert not torch.equal(whole[:, :, 0], whole[:, :, 1])


def test_decode_is_reproducible_from_seed(tiny_model):
    latents = torch.randn(1, 16, 2, 2, 2)
    a = tiny_model.decode(latents, steps=2, seed=3)
    assert torch.equal(a, tiny_model.decode(latents, steps=2, seed=3))
    assert not torch.equal(a, tiny_model.decode(latents, steps=2, seed=4))
