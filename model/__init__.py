"""CDT video tokenizer: pure PyTorch model code (no web, no storage services)."""

from .cache import CacheFormatError, FeatureCache
from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, from_pretrained, record_receptive_field, save_pretrained
from .config import LATENT_CHANNELS, NUM_TIMESTEPS, PRESETS, SPACE_FACTOR, TIME_FACTOR, CDTConfig
from .diffusion import CosineSchedule, frame_noise
from .layers import ResnetBlock
from .receptive_field import ReceptiveField, measure_receptive_field
from .streaming import CacheMismatchError, StreamingDecoder, StreamingEncoder, pad_frames
from .tokenizer import (CDT, SUPPORTED_DTYPES, Tokenizer, TrainingExample, VAEBaseline, bf16_is_fast, build_model,
                        dtype_name, parse_dtype, pixel_frames, validate_video)

__all__ = [
    "CDT",
    "CDTConfig",
    "CacheFormatError",
    "CacheMismatchError",
    "CheckpointError",
    "CosineSchedule",
    "DEFAULT_CHECKPOINT",
    "FeatureCache",
    "LATENT_CHANNELS",
    "NUM_TIMESTEPS",
    "PRESETS",
    "ReceptiveField",
    "ResnetBlock",
    "SPACE_FACTOR",
    "SUPPORTED_DTYPES",
    "StreamingDecoder",
    "StreamingEncoder",
    "TIME_FACTOR",
    "Tokenizer",
    "TrainingExample",
    "VAEBaseline",
    "bf16_is_fast",
    "build_model",
    "dtype_name",
    "frame_noise",
    "from_pretrained",
    "measure_receptive_field",
    "pad_frames",
    "parse_dtype",
    "pixel_frames",
    "validate_video",
    "record_receptive_field",
    "save_pretrained",
]
