"""CDT in diffusers' VAE conventions, so a diffusers-based pipeline can take it where it
takes an `AutoencoderKL*`:

    vae = CDTAutoencoder.from_pretrained("checkpoints/cdt-tiny", steps=2, seed=0)
    z = vae.encode(video).latent_dist.mode()     # or .sample(generator)
    frames = vae.decode(z).sample                # (B,3,T,H,W) in [-1,1]

`encode(x)` takes (B,3,T,H,W) video with T = 1+tk (t the model's temporal factor,
`config.temporal_compression_ratio`: 4 for a 4x model), or (B,3,H,W) images, in [-1,1], with
sides multiples of 8 (as `Tokenizer.encode`), and answers diffusers' `AutoencoderKLOutput`
whose `latent_dist` is diffusers' `DiagonalGaussianDistribution` over CDT's posterior
(mean and log-variance): `mode()` is `Tokenizer.encode`'s latents, `sample()` draws from
the posterior, `kl()` is diffusers' (summed over dims 1-3). `decode(z)` answers
`DecoderOutput` whose `sample` is `Tokenizer.decode(z, steps, seed)`: CDT's decoder is a
diffusion model, so the output depends on the DDIM `steps` and noise `seed` set here (or per
call, or drawn from a `generator` as diffusers passes one).

`config.scaling_factor` is 1.0 and `config.shift_factor` 0.0: CDT's latents are used as
the encoder makes them (its KL term keeps them near unit scale), so a pipeline's
`latents / scaling_factor + shift_factor` leaves them unchanged.

diffusers is optional: it is imported when an output is made (the `diffusers` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from cdt_client.formats.api import MAX_QUERY_SEED
from torch import nn

from model import SPACE_FACTOR, Tokenizer, from_pretrained, validate_video

DIFFUSERS_EXTRA = "diffusers"


@dataclass(frozen=True)
class CDTVAEConfig:
    """The config attributes diffusers' pipelines read from a VAE."""

    latent_channels: int
    temporal_compression_ratio: int
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    spatial_compression_ratio: int = SPACE_FACTOR


def _diffusers():
    try:
        from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput
    except ImportError:
        raise ImportError(f"CDTAutoencoder's outputs are diffusers' classes: pip install diffusers (the "
                          f"{DIFFUSERS_EXTRA!r} extra)") from None
    return AutoencoderKLOutput, DiagonalGaussianDistribution, DecoderOutput


class CDTAutoencoder(nn.Module):
    """A `Tokenizer` with diffusers' VAE interface (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, steps: int = 1, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.steps, self.seed = steps, seed
        self.config = CDTVAEConfig(latent_channels=tokenizer.config.latent_channels,
                                   temporal_compression_ratio=tokenizer.config.time_factor)

    @classmethod
    def from_pretrained(cls, directory: str | Path, steps: int = 1, seed: int = 0, device: str = "cpu",
                        dtype: str | torch.dtype = "fp32") -> "CDTAutoencoder":
        return cls(from_pretrained(directory, device=device, dtype=dtype).model, steps, seed)

    @property
    def dtype(self) -> torch.dtype:
        return self.tokenizer.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.tokenizer.device

    @torch.no_grad()
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        output_cls, distribution_cls, _ = _diffusers()
        image = x.dim() == 4
        video = x.unsqueeze(2) if image else x
        validate_video(video)
        posterior = self.tokenizer.posterior(video)
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        if image:
            mean, logvar = mean[:, :, 0], logvar[:, :, 0]
        latent_dist = distribution_cls(torch.cat([mean, logvar], dim=1))
        return output_cls(latent_dist=latent_dist) if return_dict else (latent_dist,)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None,
               steps: int | None = None, seed: int | None = None):
        """`generator`, when given and no `seed` is, draws the decoding noise seed (on the
        generator's device: a random op takes only a generator of its output's device)."""
        _, _, output_cls = _diffusers()
        if seed is None and generator is not None:
            seed = int(torch.randint(0, MAX_QUERY_SEED, (1,), generator=generator, device=generator.device))
        image = z.dim() == 4
        video = self.tokenizer.decode(z.unsqueeze(2) if image else z, steps=steps or self.steps,
                                      seed=self.seed if seed is None else seed)
        sample = video[:, :, 0] if image else video
        return output_cls(sample=sample) if return_dict else (sample,)
