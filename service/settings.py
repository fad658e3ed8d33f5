"""Service settings: one object, read once from the environment, injected everywhere.

Plain pydantic (no pydantic-settings dependency): `Settings.from_env()` maps each
`CDT_*` variable to a field and pydantic validates the values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from media import DEFAULT_CHECKPOINT
from model.tokenizer import SUPPORTED_DTYPES

ENV_PREFIX = "CDT_"


class SettingsError(ValueError):
    """An environment variable with an invalid value."""


def mib(megabytes: float) -> int:
    """A size setting in MiB, as bytes."""
    return int(megabytes * 1024 * 1024)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint directory served")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    # None = bf16 on CUDA, fp32 on CPU, whatever the CPU: sessions are pinned to a dtype, so
    # a per-node default would break failover between unlike nodes. bf16 is ~2x faster on
    # CPUs with AVX512-BF16/AMX and ~5x slower without (benchmarks/results/precision.md).
    dtype: str | None = Field(None, description="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    redis_url: str | None = Field(None, description="session store; in-process store when unset")
    api_keys: tuple[str, ...] = Field((), description="accepted Bearer keys; auth is off when empty")
    max_upload_mb: float = Field(256.0, gt=0, description="largest request body")
    max_frames: int = Field(1024, ge=1, description="longest clip (frames) a request may encode or decode")
    max_side: int = Field(2048, ge=8, description="largest height or width a request may encode or decode")
    queue_size: int = Field(8, ge=1, description="jobs waiting for the model beyond the running one")
    request_timeout_s: float = Field(300.0, gt=0, description="queue wait + compute limit per request")
    session_ttl_s: int = Field(3600, ge=1, description="idle lifetime of a streaming session (and the most a "
                               "session may ask for)")
    max_sessions: int = Field(1000, ge=1, description="live streaming sessions in the store (all replicas)")
    max_session_state_mb: float = Field(512.0, gt=0, description="largest feature-cache state of one session")
    session_local_cache_mb: float = Field(512.0, ge=0, description="with Redis: this replica's copy of the "
                                          "session states it wrote last, reused while the store holds that "
                                          "version (skips reading the state back); 0 turns it off")
    session_key_prefix: str = Field("cdt:", min_length=1, description="Redis key prefix (several deployments "
                                    "may share one Redis)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {value!r}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        return tuple(key.strip() for key in value if key.strip())

    @field_validator("redis_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return value or None

    @property
    def compute_dtype(self) -> str:
        return self.dtype or ("bf16" if self.device.startswith("cuda") else "fp32")

    @property
    def max_state_bytes(self) -> int:
        return mib(self.max_session_state_mb)

    @property
    def session_local_cache_bytes(self) -> int:
        return mib(self.session_local_cache_mb)

    @property
    def max_upload_bytes(self) -> int:
        return mib(self.max_upload_mb)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: ENV_PREFIX + name.upper() for name in cls.model_fields}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {name: environ[var] for name, var in cls.env_names().items() if var in environ}
        try:
            return cls(**values)
        except ValidationError as exc:
            names = cls.env_names()
            problems = "; ".join(f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors())
            raise SettingsError(f"invalid service settings: {problems}") from None
