"""Service settings: one object, read once from the environment, injected everywhere.

Plain pydantic (no pydantic-settings dependency): `Settings.from_env()` maps each
`CDT_*` variable to a field and pydantic validates the values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model import DEFAULT_CHECKPOINT, NUM_TIMESTEPS, SUPPORTED_DTYPES

ENV_PREFIX = "CDT_"


class SettingsError(ValueError):
    """An environment variable with an invalid value."""


def mib(megabytes: float) -> int:
    """A size setting in MiB, as bytes."""
    return int(megabytes * 1024 * 1024)


MAX_STEPS_VAR = ENV_PREFIX + "MAX_STEPS"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint directory served")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    # None = bf16 on CUDA, fp32 on CPU, whatever the CPU: sessions are pinned to a dtype, so
    # a per-node default would break failover between unlike nodes. bf16 is ~2x faster on
    # CPUs with AVX512-BF16/AMX and ~5x slower without (benchmarks/results/precision.md).
    dtype: str | None = Field(None, description="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    redis_url: str | None = Field(None, description="session store: redis:// or rediss:// for one "
                                      "Redis, redis+cluster://host:port for a Redis Cluster (any node); in-process "
                                      "store when unset")
    api_keys: tuple[str, ...] = Field((), description="accepted Bearer keys; auth is off when empty")
    max_upload_mb: float = Field(256.0, gt=0, description="largest request body")
    max_frames: int = Field(1025, ge=1, description="longest clip (frames) a request may encode or decode: it "
                            "bounds a request's time, not its memory (requests stream in chunks)")
    memory_budget_mb: float | None = Field(None, gt=0, description="memory this replica admits whole-clip "
                                           "requests into (default: 80% of the machine's or cgroup's memory, or of "
                                           "the CUDA device's free memory, beyond what is resident at start)")
    max_side: int = Field(2048, ge=8, description="largest height or width a request may encode or decode")
    max_steps: int = Field(1000, ge=1, le=NUM_TIMESTEPS, description="most DDIM steps a decode may take: "
                           "/v1/decode, decode sessions and the `cdt` commands (at most the model's "
                           f"{NUM_TIMESTEPS} diffusion levels)")
    queue_size: int = Field(8, ge=1, description="jobs waiting for the model beyond the running one")
    request_timeout_s: float = Field(300.0, gt=0, description="queue wait + compute limit per model job: a session "
                                     "chunk, or one chunk of a whole-clip request")
    session_ttl_s: int = Field(3600, ge=1, description="idle lifetime of a streaming session (and the most a "
                               "session may ask for)")
    max_sessions: int = Field(1000, ge=1, description="live streaming sessions in the store (all replicas)")
    session_hot_mb: float = Field(2048.0, ge=0, description="feature caches of the sessions this replica serves, "
                                  "kept in its memory (LRU): a session whose cache was evicted is rebuilt from the "
                                  "store on its next chunk")
    max_session_log_mb: float = Field(512.0, gt=0, description="largest input log of one session: the chunk bodies "
                                      "covering the model's receptive field (413 session_log_too_large beyond)")
    session_snapshot_mb: float = Field(0.0, ge=0, description="largest feature cache written to the store as a "
                                       "snapshot (off the response path); 0 = no snapshots, the store holds only "
                                       "the log")
    session_snapshot_every: int = Field(4, ge=1, description="chunks between snapshots of a session")
    session_snapshot_part_mb: float = Field(64.0, gt=0, description="largest store value of a snapshot part")
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
    def session_hot_bytes(self) -> int:
        return mib(self.session_hot_mb)

    @property
    def max_session_log_bytes(self) -> int:
        return mib(self.max_session_log_mb)

    @property
    def session_snapshot_bytes(self) -> int:
        return mib(self.session_snapshot_mb)

    @property
    def session_snapshot_part_bytes(self) -> int:
        return max(1, mib(self.session_snapshot_part_mb))

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


def max_steps_from_env(environ: Mapping[str, str] | None = None) -> int:
    """CDT_MAX_STEPS alone, validated as the service validates it: the `cdt` commands bound
    --steps by the same setting without depending on the service's other variables."""
    environ = os.environ if environ is None else environ
    return Settings.from_env({MAX_STEPS_VAR: environ[MAX_STEPS_VAR]} if MAX_STEPS_VAR in environ else {}).max_steps
