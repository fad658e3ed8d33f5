"""Service settings: one object, read once from the `CDT_*` environment variables, injected
everywhere.

pydantic-settings maps each field to the variable `CDT_<FIELD>` and validates its value.
Each field's `description` is the setting's documentation: docs/settings.md is generated
from them (docs/gen_reference.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import re

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model import DEFAULT_CHECKPOINT, NUM_TIMESTEPS, SUPPORTED_DTYPES

ENV_PREFIX = "CDT_"


class SettingsError(ValueError):
    """An environment variable with an invalid value."""


def comma_list(value) -> tuple[str, ...]:
    """A list setting's entries: a comma-separated string's, or a sequence's, stripped, without
    empty ones."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(entry.strip() for entry in value if entry.strip())


def mib(megabytes: float) -> int:
    """A size setting in MiB, as bytes."""
    return int(megabytes * 1024 * 1024)


class EnvSettings(BaseSettings):
    """Settings read from `CDT_*` variables, whose invalid values raise one `SettingsError`
    naming the variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: ENV_PREFIX + name.upper() for name in cls.model_fields}

    @classmethod
    def from_env(cls):
        try:
            return cls()
        except ValidationError as exc:
            names = cls.env_names()
            problems = "; ".join(f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" if e["loc"] else e["msg"]
                                 for e in exc.errors())
            raise SettingsError(f"invalid service settings: {problems}") from None


# The one setting the `cdt` commands share with the service (StepsLimit below).
MaxSteps = Annotated[int, Field(ge=1, le=NUM_TIMESTEPS, description=(
    "most DDIM steps a decode may take: on `/v1/decode`, in decode sessions, on the web page and in the `cdt` "
    "commands (400 `bad_parameter`, or exit code 2, beyond); at most the model's "
    f"{NUM_TIMESTEPS} diffusion levels"))]
DEFAULT_MAX_STEPS = 1000
# A served model's name: what `model=` takes, metrics label and latents files carry.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Settings(EnvSettings):
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description=(
        "checkpoint directory served as the one model when `CDT_MODELS` is unset, named by its directory's name; "
        "by default the shipped one (in an installed wheel, its copy under the environment's "
        "`share/cdt-tokenizer/`)"))
    models: Annotated[tuple[str, ...], NoDecode] = Field((), description=(
        "several models served at once: comma-separated `name=path` entries (`cdt-tiny=checkpoints/cdt-tiny,"
        "t8=checkpoints/cdt-tiny-t8`), or one directory whose checkpoint subdirectories (those with a "
        "`config.json`) are served under their directories' names, in name order. The first is the default "
        "of requests that name none (`model=`). Every device holds every model (the weights of each, once "
        "per device); `GET /v1/models` lists them. When set, `CDT_CHECKPOINT` is not read (the image sets it as its default); unset: "
        "`CDT_CHECKPOINT` alone"))
    devices: Annotated[tuple[str, ...], NoDecode] = Field((), description=(
        "comma-separated devices this replica computes on, each with its own resident model, model thread "
        "and memory budget: `cuda` (every visible GPU), `cuda:N`, `cpu`. `cpu` may repeat: `cpu,cpu` runs two "
        "model threads that split the CPU's cores. Unset: every visible GPU, else `cpu`"))
    dtype: str | None = Field(None, description=(
        "compute dtype, `fp32` or `bf16`; unset: `bf16` when every device is a GPU with fast bf16 (compute "
        "capability 8.0 and up), else `fp32`. Where the CPU has "
        "bf16 arithmetic (AVX512-BF16/AMX) bf16 is faster than fp32, without it several times "
        "slower, and the service logs a warning (`benchmarks/results/precision.md`). The CPU default does "
        "not follow the CPU because a session is pinned to its replica's dtype: it fails over only between "
        "replicas of one dtype"))
    host_threads: int = Field(4, ge=1, description=(
        "threads for the host work beside the model threads: decoding uploaded containers, reading "
        "spooled latents, rendering mp4 and tensor answers"))
    batch_max: int | None = Field(None, ge=1, description=(
        "most stream pushes (session chunks, whole-clip chunks) of one shape, phase and settings that a device "
        "runs as one batched forward when they are waiting together; 1: no batching; unset: the device "
        "kind's default (`service.devices.DEFAULT_BATCH_MAX`, from `benchmarks/results/batching.md`)"))
    batch_wait_ms: float = Field(0.0, ge=0, description=(
        "how long (ms) a device holding a batchable job waits for more of its kind before running it; 0: it "
        "batches only what is already waiting, adding no latency"))
    redis_url: str | None = Field(None, description=(
        "session store shared by replicas: `redis://host:port/db` (or `rediss://`) for one Redis, "
        "`redis+cluster://host:port` for a Redis Cluster (any node); unset: an in-process store. When set, "
        "`/readyz` pings it"))
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field((), description=(
        "comma-separated API keys, each optionally `key:weight`; when set, `/v1/*` needs `Authorization: Bearer "
        "<key>` (the probes, `/metrics` and the web page need none); unset: auth off. A key's weight (default "
        "1) is its share of a device against the other keys with work waiting"))
    key_queue_size: int = Field(4, ge=1, description=(
        "requests one key (or the anonymous caller) may have waiting or running on the replica; beyond: 429 "
        "`key_queue_full` with `Retry-After`, while other keys are still served"))
    key_max_sessions: int = Field(100, ge=1, description=(
        "live streaming sessions one key may hold, all replicas together (finished ones count until deleted or "
        "expired, as for `CDT_MAX_SESSIONS`); beyond: 429 `key_too_many_sessions` with `Retry-After`"))
    key_rate: float = Field(0.0, ge=0, description=(
        "requests per second one key may send to the model routes (a token bucket of `CDT_KEY_BURST`); beyond: "
        "429 `key_rate_limited` with `Retry-After`; 0: no rate limit"))
    key_burst: int = Field(10, ge=1, description="requests one key may send at once above `CDT_KEY_RATE`")
    max_upload_mb: float = Field(256.0, gt=0, description=(
        "largest request body (MiB), enforced while the body streams in; also the largest answer built in "
        "memory (`/v1/frames`, the diffusers routes)"))
    max_frames: int = Field(1025, ge=1, description=(
        "longest clip (frames) a request or a session chunk may encode or decode. It bounds a request's "
        "time (about this many times the per-frame compute), not its memory: requests stream in chunks"))
    max_side: int = Field(2048, ge=8, description="largest frame height or width a request may encode or decode")
    max_steps: MaxSteps = DEFAULT_MAX_STEPS
    memory_budget_mb: float | None = Field(None, gt=0, description=(
        "memory (MiB) each device admits requests into, each reserving its estimate; unset: read from the "
        "device: on a GPU, 80% of its free memory once the model is loaded, less `CDT_SESSION_HOT_MB`; on "
        "the CPU, 80% of the machine's (or cgroup's) memory beyond what is resident, shared equally by "
        "the CPU's model threads, less `CDT_SESSION_HOT_MB`"))
    queue_size: int = Field(8, ge=1, description=(
        "requests that may wait for a device (or for its memory) besides the running one, per device; "
        "beyond, on every device: 429 `overloaded` with `Retry-After`"))
    request_timeout_s: float = Field(300.0, gt=0, description=(
        "limit (seconds) on queue wait + compute of one model job: a session chunk (with the rebuild of its "
        "stream), or one chunk of a whole-clip request"))
    session_ttl_s: int = Field(3600, ge=1, description=(
        "idle lifetime (seconds) of a streaming session, and the most a session may ask for"))
    max_sessions: int = Field(1000, ge=1, description=(
        "live streaming sessions in the store, all replicas together; beyond: 429 `too_many_sessions`"))
    session_hot_mb: float = Field(2048.0, ge=0, description=(
        "memory (MiB) per device for the feature caches of the sessions it serves, least recently used "
        "evicted first: an evicted session's stream is rebuilt from the store on its next chunk"))
    max_session_log_mb: float = Field(512.0, gt=0, description=(
        "largest input log (MiB) of one session in the store: the chunk bodies covering the model's "
        "receptive field (413 `session_log_too_large` beyond)"))
    session_snapshot_mb: float = Field(1024.0, ge=0, description=(
        "largest feature cache (MiB) a session's stream may have to be snapshotted, off the response path, so "
        "that a rebuild replays only the chunks after its snapshot; 0: no snapshots, a rebuild replays the "
        "input log's window"))
    session_snapshot_store: str | None = Field(None, description=(
        "where snapshots live: unset, the session store itself (Redis, or the in-process store); "
        "`file:///path`, a directory every replica mounts (a ReadWriteMany volume), which keeps Redis to the "
        "records, last responses and logs. Snapshots of expired sessions are swept from it"))
    session_rebuild_target: float = Field(10.0, ge=1, description=(
        "longest rebuild of a session's stream after its replica is lost, in chunk computes: a session is "
        "snapshotted every K chunks, K derived per session from this and the measured cost of its "
        "snapshot against its chunks' compute (restore + K replayed chunks <= target), and from "
        "`CDT_SESSION_SNAPSHOT_TRAFFIC`"))
    session_snapshot_traffic: float = Field(10.0, gt=0, description=(
        "most bytes of snapshots written per byte of a session's chunks (body plus response), within "
        "`CDT_SESSION_REBUILD_TARGET`: K is the smallest interval that keeps to this, or the rebuild target's "
        "when that is smaller"))
    session_snapshot_part_mb: float = Field(64.0, gt=0, description=(
        "largest stored value (MiB) of a snapshot, which is split into parts"))
    session_snapshot_sweep_s: float = Field(60.0, gt=0, description=(
        "interval (seconds) of the sweep that deletes, from a `file://` snapshot store, the snapshots of "
        "sessions that expired"))
    drain_s: float = Field(60.0, ge=0, description=(
        "on SIGTERM, the budget (seconds) for handing sessions over: the replica stops taking sessions (503 "
        "`draining`), lets its running chunks finish, then snapshots its hot streams, most recently used first, "
        "so the replicas that continue them replay nothing; streams not snapshotted in time are rebuilt from "
        "the log. Keep the deploy files' stop grace (terminationGracePeriodSeconds, stop_grace_period) longer"))
    session_key_prefix: str = Field("cdt:", min_length=1, description=(
        "Redis key prefix (several deployments may share one Redis)"))

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value):
        devices = comma_list(value)
        for device in devices:
            kind, _, index = device.partition(":")
            if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
                raise ValueError(f"each device must be cpu, cuda or cuda:N, got {device!r}")
        gpus = [device for device in devices if device != "cpu"]
        if len(set(gpus)) != len(gpus) or ("cuda" in gpus and len(gpus) > 1):
            # One model per GPU: a second one on the same GPU would split its memory, not add compute.
            raise ValueError(f"a GPU may be listed once (`cuda` lists every GPU), got {','.join(devices)}")
        return devices

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value):
        entries = comma_list(value)
        named = [entry for entry in entries if "=" in entry]
        if (named and len(named) != len(entries)) or (not named and len(entries) > 1):
            raise ValueError("give `name=path` entries, or one directory of checkpoints")
        names = [entry.partition("=")[0].strip() for entry in named]
        for name in names:
            if not MODEL_NAME.match(name):
                raise ValueError(f"a model name is letters, digits, `.`, `_` and `-` (64 at most), got {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"each model name may be given once, got {','.join(names)}")
        return entries

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {value!r}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value):
        entries = comma_list(value)
        for entry in entries:
            _, _, weight = entry.partition(":")
            try:
                ok = not weight or 0 < float(weight) < float("inf")
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"a key's weight must be a positive number (`key:weight`), got {weight!r}")
        return entries

    @property
    def keys(self) -> tuple[str, ...]:
        """The API keys, without their weights."""
        return tuple(entry.partition(":")[0] for entry in self.api_keys)

    @property
    def key_weights(self) -> dict[str, float]:
        """Each API key's weight."""
        return {key: float(weight or 1) for key, _, weight in (entry.partition(":") for entry in self.api_keys)}

    @field_validator("redis_url", "session_snapshot_store", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return value or None

    @field_validator("session_snapshot_store")
    @classmethod
    def _snapshot_store(cls, value: str | None) -> str | None:
        if value is not None:
            from .sessions.store.files import directory_of

            directory_of(value)  # raises ValueError on anything but file:///absolute/path
        return value

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


class StepsLimit(EnvSettings):
    """CDT_MAX_STEPS without the service's other variables: a `cdt` command bounds --steps as
    the service bounds a request's `steps`, whatever the rest of the environment holds."""

    max_steps: MaxSteps = DEFAULT_MAX_STEPS


def max_steps_from_env() -> int:
    """CDT_MAX_STEPS alone, validated as the service validates it."""
    return StepsLimit.from_env().max_steps
