"""CDT video tokenizer: pure PyTorch model code (no web, no storage services)."""

from .cache import CacheFormatError, FeatureCache
from .checkpoint import (DEFAULT_CHECKPOINT, CheckpointError, ModelIdentity, Pretrained, from_pretrained,
                         read_header, record_receptive_field, save_pretrained)
from .config import LATENT_CHANNELS, NUM_TIMESTEPS, PRESETS, SPACE_FACTOR, TIME_FACTOR, CDTConfig, Level
from .diffusion import CosineSchedule, frame_noise
from .growth import freeze_below, load_below, top_level
from .layers import ResnetBlock
from .streaming import (CacheMismatchError, ReceptiveField, StreamingDecoder, StreamingEncoder, decode_chunk_latents,
                        group_size, inputs_for, measure_receptive_field, outputs_for, pad_frames, push_together,
                        resume_position, settled_inputs)
from .tokenizer import (CDT, SUPPORTED_DTYPES, Tokenizer, TrainingExample, VAEBaseline, bf16_is_fast, build_model,
                        content_hash, dtype_name, parse_dtype, pixel_frames, validate_video)

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
    "Level",
    "ModelIdentity",
    "NUM_TIMESTEPS",
    "PRESETS",
    "Pretrained",
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
    "content_hash",
    "decode_chunk_latents",
    "dtype_name",
    "frame_noise",
    "freeze_below",
    "from_pretrained",
    "group_size",
    "inputs_for",
    "load_below",
    "measure_receptive_field",
    "outputs_for",
    "pad_frames",
    "push_together",
    "read_header",
    "parse_dtype",
    "pixel_frames",
    "validate_video",
    "record_receptive_field",
    "resume_position",
    "save_pretrained",
    "settled_inputs",
    "top_level",
]
