"""The tokenizers: CDT (diffusion decoder) and the deterministic VAE baseline.

Both share the encoder and the public API:
  encode(video) -> latents          video (B,3,1+4k,H,W) in [-1,1], H,W % 8 == 0
  decode(latents, steps, seed)      latents (B,16,1+k,H/8,W/8) -> video (B,3,1+4k,H,W)
and a chunk-level `decode_chunk` that the streaming decoder calls with a cache.

What differs between the kinds is a method each overrides, so no caller tests `kind`:
how many DDIM steps a decode runs (`decode_steps`) and what training compares
(`training_example`).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .config import SPACE_FACTOR, TIME_FACTOR, CDTConfig
from .decoder import ConditionAdapter, TimeEmbedding, UNet, UpStage
from .diffusion import CosineSchedule, frame_noise
from .encoder import Encoder, KLHead, Posterior, ResnetChain
from .layers import Cache, CausalConv3d, ChannelLayerNorm, assign_cache_keys

# Modules that stay in float32 whatever the compute dtype (numerically fragile).
FP32_MODULES = (KLHead, TimeEmbedding)
SUPPORTED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 tensor cores arrived with Ampere (compute capability 8.0); Volta (V100, 7.0) and
# Turing (T4, 7.5) have fp16 tensor cores but none for bf16.
BF16_TENSOR_CORES = (8, 0)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in SUPPORTED_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(SUPPORTED_DTYPES)}")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype_name(dtype)
        return dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[dtype]


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 has hardware arithmetic here: a CUDA device with bf16 tensor cores, or
    a CPU whose oneDNN reports bf16 kernels (AVX512-BF16/AMX). Elsewhere PyTorch falls back
    to a scalar bf16 convolution several times slower than fp32
    (benchmarks/results/precision.md). A CUDA device this machine does not have has none."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and cuda_bf16_is_fast(torch.cuda.get_device_capability(device))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_bf16_is_fast(capability: tuple[int, int]) -> bool:
    """Whether a CUDA device of this compute capability (major, minor) has bf16 tensor cores."""
    return tuple(capability) >= BF16_TENSOR_CORES


def validate_video(video: torch.Tensor) -> None:
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a 5-D tensor (B,3,T,H,W), got {shape}")
    b, c, t, h, w = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 channels (RGB) in dim 1, got {c}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1,1], got {video.dtype}")
    if t < 1 or (t - 1) % TIME_FACTOR:
        raise ValueError(f"video frame count must be 1+4k (1, 5, 9, ...), got {t}")
    if h < SPACE_FACTOR or w < SPACE_FACTOR or h % SPACE_FACTOR or w % SPACE_FACTOR:
        raise ValueError(f"video height and width must be positive multiples of 8, got {h}x{w}")


def validate_latents(latents: torch.Tensor, channels: int, allow_empty: bool = False) -> None:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a 5-D tensor (B,{channels},T,h,w), got {shape}")
    if latents.shape[1] != channels:
        raise ValueError(f"latents must have {channels} channels in dim 1, got {latents.shape[1]}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a float tensor, got {latents.dtype}")
    if latents.shape[2] < (0 if allow_empty else 1) or latents.shape[3] < 1 or latents.shape[4] < 1:
        raise ValueError(f"latents have an empty dimension: {tuple(latents.shape)}")


def pixel_frames(latent_frames: int, first_chunk: bool) -> int:
    """Pixel frames decoded from a chunk of latent frames."""
    if latent_frames == 0:
        return 0
    return 1 + TIME_FACTOR * (latent_frames - 1) if first_chunk else TIME_FACTOR * latent_frames


class TrainingExample(NamedTuple):
    """What the training objective compares (training/losses.py): the network's
    `prediction` of `target`, a per-item loss weight, and a per-item mask of the items
    trained exactly as 1-step decoding runs."""

    prediction: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    terminal: torch.Tensor


class Tokenizer(nn.Module):
    """Shared encoder and precision policy of both tokenizers."""

    kind = ""

    def __init__(self, config: CDTConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)

    def _finish_init(self) -> None:
        assign_cache_keys(self)

    # --- precision -----------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.encoder.stem.conv.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.stem.conv.conv.weight.device

    def set_precision(self, dtype: str | torch.dtype) -> "Tokenizer":
        """Cast to the compute dtype, keeping the fragile modules in float32, in the
        weight layout that is fastest for it.

        bf16 weights go channels-last (NDHWC), the layout of oneDNN's bf16 kernels;
        fp32 weights stay contiguous, the default layout of PyTorch's fp32 CPU
        kernels (`python -m benchmarks.precision` times both layouts in both dtypes
        on the machine at hand).
        Activations are channels-last in both dtypes after the first LayerNorm (a free
        view there), and the layers keep them so."""
        dtype = parse_dtype(dtype)
        layout = torch.channels_last_3d if dtype == torch.bfloat16 else torch.contiguous_format
        self.to(dtype=dtype, memory_format=layout)
        for module in self.modules():
            if isinstance(module, FP32_MODULES):
                module.float()
        return self

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        enc = sum(p.numel() for p in self.encoder.parameters())
        return {"parameters": total, "encoder_parameters": enc, "decoder_parameters": total - enc}

    # --- encode --------------------------------------------------------------------------
    def posterior(self, video: torch.Tensor, cache: Cache = None) -> Posterior:
        """The encoder's posterior of `video`, taken from any device to the model's, in its compute dtype."""
        return self.encoder(video.to(self.device, self.compute_dtype), cache)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Latents of a whole clip on any device, on the model's device: the posterior mean, or
        with `sample` a draw by `generator` (on any device)."""
        validate_video(video)
        post = self.posterior(video)
        return post.sample(generator) if sample else post.mean

    # --- decode --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, steps: int = 1, seed: int = 0) -> torch.Tensor:
        """Pixel frames of whole-clip latents on any device, on the model's device."""
        validate_latents(latents, self.config.latent_channels)
        return self.decode_chunk(latents.to(self.device), steps=steps, seed=seed, start=0, cache=None)

    def decode_chunk(self, latents, steps: int, seed: int | Sequence[int], start: int | Sequence[int],
                     cache: Cache) -> torch.Tensor:
        """Pixel frames of a latent chunk whose first output frame is frame `start` of
        the video, continuing the stream whose state `cache` holds (None: a whole clip)."""
        raise NotImplementedError

    def decode_steps(self, steps: int) -> int:
        """The DDIM steps a decode asked to run `steps` runs (ValueError if it cannot)."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------
    def training_example(self, video: torch.Tensor, latents: torch.Tensor, gen: torch.Generator, *,
                         terminal_fraction: float, snr_min: float, snr_max: float) -> TrainingExample:
        """The decoder's prediction of `video` from its sampled `latents`, with gradients.
        `gen` (on the batch's device) draws whatever the kind samples; the keyword
        arguments are the diffusion loss settings, which a deterministic decoder ignores."""
        raise NotImplementedError


class CDT(Tokenizer):
    """Causal encoder + conditioned pixel-space diffusion decoder."""

    kind = "cdt"

    def __init__(self, config: CDTConfig) -> None:
        super().__init__(config)
        self.adapter = ConditionAdapter(config)
        ctx = [s.width for s in config.adapter_stages][::-1]
        ctx[0] = config.context0_channels
        self.unet = UNet(config, ctx)
        self.schedule = CosineSchedule(config.num_timesteps)
        self._finish_init()

    def contexts(self, latents: torch.Tensor, cache: Cache = None) -> list[torch.Tensor]:
        return self.adapter(latents.to(self.compute_dtype), cache)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor], cache: Cache = None):
        """The network's x0 estimate, in float32."""
        return self.unet(x_t.to(self.compute_dtype), t, contexts, cache).float()

    def decode_steps(self, steps: int) -> int:
        self.schedule.ddim_timesteps(steps)  # validates steps
        return steps

    def decode_chunk(self, latents, steps: int, seed: int | Sequence[int], start: int | Sequence[int],
                     cache: Cache) -> torch.Tensor:
        """DDIM from x_T = 0.8*eps; every step keeps its own U-Net cache namespace. `seed` and
        `start` may be given per batch item (streams decoded together, `push_together`): each
        item's noise is then its own stream's, as if decoded alone."""
        b, _, t_lat, h, w = latents.shape
        if isinstance(seed, int) and isinstance(start, int):
            first = start == 0
            noise = frame_noise(seed, start, pixel_frames(t_lat, first), (b, 3, h * SPACE_FACTOR, w * SPACE_FACTOR))
        else:
            first = start[0] == 0
            if len(seed) != b or len(start) != b or any((s == 0) != first for s in start):
                raise ValueError("per-item seeds and starts need one of each per item, all first chunks or none")
            n = pixel_frames(t_lat, first)
            noise = torch.cat([frame_noise(s, i, n, (1, 3, h * SPACE_FACTOR, w * SPACE_FACTOR))
                               for s, i in zip(seed, start)])
        x = (self.config.noise_scale * noise).to(self.device)
        contexts = self.contexts(latents, cache)
        timesteps = self.schedule.ddim_timesteps(steps)
        for i, t in enumerate(timesteps):
            step_cache = cache.scope(f"step{i}/") if cache is not None else None
            t_batch = torch.full((b,), t, device=self.device, dtype=torch.long)
            x0 = self.denoise(x, t_batch, contexts, step_cache)
            x = x0 if i == len(timesteps) - 1 else self.schedule.ddim_step(x, x0, t, timesteps[i + 1])
        return x

    def training_example(self, video: torch.Tensor, latents: torch.Tensor, gen: torch.Generator, *,
                         terminal_fraction: float, snr_min: float, snr_max: float) -> TrainingExample:
        """The x0 estimate from x_t at a random level t, weighted by clamp(SNR(t), snr_min,
        snr_max); a `terminal_fraction` of the items run t = T-1 on x_T = noise_scale*eps,
        exactly the 1-step decoder's input (q_sample at T-1 gives ~1.0*eps instead)."""
        b, device = video.shape[0], video.device
        last = self.schedule.num_timesteps - 1
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen, device=device)
        terminal = torch.rand(b, generator=gen, device=device) < terminal_fraction
        t = torch.where(terminal, torch.full_like(t, last), t)
        noise = torch.randn(video.shape, generator=gen, device=device)
        x_t = self.schedule.q_sample(video, t, noise)
        x_t = torch.where(terminal.view(-1, 1, 1, 1, 1), self.config.noise_scale * noise, x_t)
        weight = self.schedule.loss_weight(t, snr_min, snr_max)
        prediction = self.denoise(x_t, t, self.contexts(latents))
        return TrainingExample(prediction, video, weight, terminal)


class VAEDecoder(nn.Module):
    """Deterministic decoder: lift, ResnetBlock + upsampling stages, LayerNorm, conv."""

    def __init__(self, config: CDTConfig) -> None:
        super().__init__()
        pad = config.time_pad
        stages = config.vae_decoder_stages
        self.stem = CausalConv3d(config.latent_channels, stages[0].width, (3, 3, 3), pad)
        self.stages = nn.ModuleList()
        cin = stages[0].width
        for stage in stages:
            self.stages.append(UpStage(cin, stage, config.spatial_upsample, pad))
            cin = stage.width
        self.refine = ResnetChain((cin, cin), pad)
        self.out_norm = ChannelLayerNorm(cin)
        self.out_conv = CausalConv3d(cin, 3, (3, 7, 7), pad)

    def forward(self, z: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        h = self.stem(z, cache)
        for stage in self.stages:
            h = stage(h, cache=cache)
        return self.out_conv(self.out_norm(self.refine(h, cache)), cache)


class VAEBaseline(Tokenizer):
    """Same encoder, deterministic decoder of similar size: the paper's comparison point."""

    kind = "vae"

    def __init__(self, config: CDTConfig) -> None:
        super().__init__(config)
        if not config.vae_decoder_stages:
            raise ValueError(f"preset {config.preset!r} defines no VAE decoder")
        self.vae_decoder = VAEDecoder(config)
        self._finish_init()

    def decode_steps(self, steps: int) -> int:
        return 1  # deterministic: one pass, whatever was asked

    def decode_chunk(self, latents, steps: int, seed: int | Sequence[int], start: int | Sequence[int],
                     cache: Cache) -> torch.Tensor:
        del steps, seed, start  # deterministic: no sampling
        return self.vae_decoder(latents.to(self.compute_dtype), cache).float()

    def training_example(self, video: torch.Tensor, latents: torch.Tensor, gen: torch.Generator, *,
                         terminal_fraction: float, snr_min: float, snr_max: float) -> TrainingExample:
        """The decoder's output, weight 1 (it samples nothing)."""
        del gen, terminal_fraction, snr_min, snr_max
        b, device = video.shape[0], video.device
        prediction = self.decode_chunk(latents, steps=1, seed=0, start=0, cache=None)
        return TrainingExample(prediction, video, torch.ones(b, device=device),
                               torch.zeros(b, dtype=torch.bool, device=device))


def hash_state(config: CDTConfig, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the config and every tensor's name, shape and float32 bytes.

    Upcasting is exact from bf16, so a checkpoint stored in bf16 hashes the same
    whether it is loaded to compute in fp32 or in bf16."""
    digest = hashlib.sha256(config.to_json().encode())
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def content_hash(model: Tokenizer) -> str:
    """The hash of a model's config and weights as they are now (`hash_state`), computed
    anew at each call. A loaded checkpoint's is in the loader's `ModelIdentity`, taken of
    the weights as stored: take this one before `set_precision` casts to bf16, which
    rounds them."""
    return hash_state(model.config, model.state_dict())


def build_model(config: CDTConfig, kind: str = "cdt") -> Tokenizer:
    if kind == "cdt":
        return CDT(config)
    if kind == "vae":
        return VAEBaseline(config)
    raise ValueError(f"unknown model kind {kind!r}; use 'cdt' or 'vae'")


__all__ = [
    "CDT",
    "VAEBaseline",
    "Tokenizer",
    "build_model",
    "content_hash",
    "hash_state",
    "validate_video",
    "validate_latents",
    "parse_dtype",
    "dtype_name",
]
