"""CDT video tokenizer: pure PyTorch model code (no web, no storage services)."""

from .cache import CacheFormatError, FeatureCache
from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, from_pretrained, record_receptive_field, save_pretrained
from .config import NUM_TIMESTEPS, PRESETS, CDTConfig
from .diffusion import CosineSchedule, frame_noise
from .receptive_field import ReceptiveField, measure_receptive_field
from .streaming import CacheMismatchError, StreamingDecoder, StreamingEncoder, pad_frames
from .tokenizer import (CDT, SUPPORTED_DTYPES, Tokenizer, TrainingExample, VAEBaseline, bf16_is_fast, build_model,
                        dtype_name, parse_dtype, pixel_frames)

__all__ = [
    "CDT",
    "NUM_TIMESTEPS",
    "PRESETS",
    "CDTConfig",
    "CacheFormatError",
    "CacheMismatchError",
    "DEFAULT_CHECKPOINT",
    "CheckpointError",
    "CosineSchedule",
    "FeatureCache",
    "ReceptiveField",
    "SUPPORTED_DTYPES",
    "StreamingDecoder",
    "StreamingEncoder",
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
    "record_receptive_field",
    "save_pretrained",
]
