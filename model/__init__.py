"""CDT video tokenizer: pure PyTorch model code (no web, no storage services)."""

from .cache import CacheFormatError, FeatureCache
from .checkpoint import CheckpointError, from_pretrained, record_receptive_field, save_pretrained
from .config import PRESETS, CDTConfig
from .diffusion import CosineSchedule, frame_noise
from .receptive_field import ReceptiveField, measure_receptive_field
from .streaming import CacheMismatchError, StreamingDecoder, StreamingEncoder, pad_frames
from .tokenizer import CDT, Tokenizer, VAEBaseline, bf16_is_fast, build_model, dtype_name, parse_dtype

__all__ = [
    "CDT",
    "PRESETS",
    "CDTConfig",
    "CacheFormatError",
    "CacheMismatchError",
    "CheckpointError",
    "CosineSchedule",
    "FeatureCache",
    "ReceptiveField",
    "StreamingDecoder",
    "StreamingEncoder",
    "Tokenizer",
    "VAEBaseline",
    "bf16_is_fast",
    "build_model",
    "dtype_name",
    "frame_noise",
    "from_pretrained",
    "measure_receptive_field",
    "pad_frames",
    "parse_dtype",
    "record_receptive_field",
    "save_pretrained",
]
