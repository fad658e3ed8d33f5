"""Streaming sessions: a long video (or latent sequence) in successive chunk requests,
with the model's FeatureCache kept in the session store between them, so the next
chunk may land on any replica.

A chunk is applied exactly once: the store write is a compare-and-set on the record's
version, and the response is stored with the state, so a retried `seq` (or a racing
duplicate that lost the write) gets the winner's bytes back without a second apply.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from prometheus_client import Counter, Gauge, Histogram
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from media import Padding, pad_spatial, tensor_to_frames
from model import CacheFormatError, CacheMismatchError, StreamingDecoder, StreamingEncoder, Tokenizer, dtype_name
from model.config import LATENT_CHANNELS, SPACE_FACTOR
from model.tokenizer import pixel_frames

from .codecs import NPY, SAFETENSORS, Body, ClipOptions, Kind, Limits, decode_clip, encode_frames
from .errors import BadParameter, Conflict, InvalidInput, NotFound, PayloadTooLarge, ServiceError, Unavailable
from .metrics import LATENCY_BUCKETS, Metrics
from .session_store import SessionRecord, SessionStore, SessionStoreUnavailable
from .settings import Settings
from .workers import WorkerPool

CHUNK_FORMAT = "cdt-latent-chunk"
CHUNK_HEADER = "X-CDT-Chunk"  # chunk metadata as JSON, on every chunk response
REPLAYED_HEADER = "X-CDT-Replayed"
FINISH = "finish"  # the `seq` recorded for a finish, so a retried finish replays too
# State sizes: tens of kB (tiny, small frames) to hundreds of MB (large frames).
STATE_BUCKETS = tuple(2.0**k for k in range(14, 32, 2))


class TooManySessions(ServiceError):
    status, code = 429, "too_many_sessions"


class SessionSpec(BaseModel):
    """Body of POST /v1/sessions."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["encode", "decode"]
    height: int | None = Field(None, ge=SPACE_FACTOR, description="original frame height (encode: default = "
                               "first chunk's; decode: output is cropped to it)")
    width: int | None = Field(None, ge=SPACE_FACTOR, description="original frame width")
    frames: int | None = Field(None, ge=1, description="decode: original frame count; output stops there")
    steps: int = Field(1, ge=1, le=64, description="decode: DDIM steps")
    seed: int = Field(0, ge=0, lt=2**63, description="decode: noise seed")
    dtype: str | None = Field(None, description="compute dtype; must be the serving replica's")
    fps: float = Field(30.0, gt=0, le=1000, description="decode: frame rate of mp4 output")
    ttl_s: int | None = Field(None, ge=1, description="idle lifetime; at most CDT_SESSION_TTL_S")


class SessionMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.active = Gauge("cdt_active_sessions", "live streaming sessions (store-wide)", registry=r)
        self.state_bytes = Histogram("cdt_session_state_bytes", "exported feature-cache size per chunk",
                                     ["kind"], buckets=STATE_BUCKETS, registry=r)
        self.store_seconds = Histogram("cdt_session_store_seconds", "session store latency", ["op"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.state_reads = Counter("cdt_session_state_reads", "session states read: local copy or store",
                                   ["source"], registry=r)
        self.chunk_seconds = Histogram("cdt_chunk_seconds", "chunk latency: load, compute, save", ["kind"],
                                       buckets=LATENCY_BUCKETS, registry=r)


@dataclass
class ChunkResult:
    body: bytes
    media_type: str
    headers: dict[str, str]


class Sessions:
    """Session operations; routes hand off to these and never touch the store."""

    def __init__(self, store: SessionStore, pool: WorkerPool, settings: Settings, metrics: Metrics) -> None:
        self.store, self.pool, self.settings = store, pool, settings
        self.metrics = SessionMetrics(metrics)
        model = pool.model
        self.model_hash, self.dtype = model.content_hash(), dtype_name(model.compute_dtype)
        self.limits = Limits(settings.max_frames, settings.max_side)

    # --- store access, timed and mapped to HTTP errors -----------------------------------
    async def _store(self, op: str, coro):
        start = time.perf_counter()
        try:
            return await coro
        except SessionStoreUnavailable as exc:
            raise Unavailable(str(exc), code="session_store_unavailable") from None
        finally:
            self.metrics.store_seconds.labels(op).observe(time.perf_counter() - start)

    async def _load(self, session_id: str, owner: str, blobs: bool = True) -> SessionRecord:
        record = await self._store("load", self.store.load(session_id, blobs))
        if record is not None and blobs:
            self.metrics.state_reads.labels("local" if record.local else "store").inc()
        # Another owner's session is reported exactly like a missing one.
        if record is None or record.meta.get("owner") != owner:
            raise NotFound(f"session {session_id} does not exist (unknown, expired or deleted)",
                           code="session_not_found")
        meta = record.meta
        if meta["model_hash"] != self.model_hash or meta["dtype"] != self.dtype:
            raise Conflict(f"session belongs to model {meta['model_hash'][:12]} ({meta['dtype']}); this replica "
                           f"serves {self.model_hash[:12]} ({self.dtype})", code="model_mismatch")
        return record

    async def refresh_active(self) -> int:
        count = await self._store("count", self.store.live_count())
        self.metrics.active.set(count)
        return count

    # --- lifecycle ----------------------------------------------------------------------
    async def create(self, spec: SessionSpec, owner: str) -> dict[str, Any]:
        if spec.dtype is not None and spec.dtype != self.dtype:
            raise Conflict(f"this replica computes in {self.dtype}, the session asks for {spec.dtype}",
                           code="model_mismatch")
        if spec.kind == "decode" and self.pool.model.kind == "cdt":
            self.pool.model.schedule.ddim_timesteps(spec.steps)
        ttl = min(spec.ttl_s or self.settings.session_ttl_s, self.settings.session_ttl_s)
        session_id = secrets.token_urlsafe(24)  # 192 random bits: unguessable
        meta = {**spec.model_dump(exclude={"ttl_s", "dtype"}), "id": session_id, "owner": owner,
                "model_hash": self.model_hash, "dtype": self.dtype, "ttl_s": ttl, "next_seq": 0,
                "finished": False, "created_at": time.time(), "frames_in": 0, "frames_out": 0,
                "latents_in": 0, "latents_out": 0, "last": None}
        created = await self._store("create", self.store.create(session_id, SessionRecord(meta), ttl,
                                                                self.settings.max_sessions))
        if not created:
            raise TooManySessions(f"the limit of {self.settings.max_sessions} live sessions is reached; finish "
                                  "or delete sessions, or retry later (CDT_MAX_SESSIONS)",
                                  headers={"Retry-After": "30"})
        await self.refresh_active()
        return self.describe(SessionRecord(meta, expires_at=time.time() + ttl))

    async def get(self, session_id: str, owner: str) -> dict[str, Any]:
        return self.describe(await self._load(session_id, owner, blobs=False))

    async def delete(self, session_id: str, owner: str) -> None:
        await self._load(session_id, owner, blobs=False)
        await self._store("delete", self.store.delete(session_id))
        await self.refresh_active()

    @staticmethod
    def describe(record: SessionRecord) -> dict[str, Any]:
        meta = record.meta
        return {
            "id": meta["id"], "kind": meta["kind"], "state": "finished" if meta["finished"] else "open",
            "next_seq": meta["next_seq"], "frames_in": meta["frames_in"], "frames_out": meta["frames_out"],
            "latents_in": meta["latents_in"], "latents_out": meta["latents_out"],
            "height": meta["height"], "width": meta["width"], "steps": meta["steps"], "seed": meta["seed"],
            "model_hash": meta["model_hash"], "dtype": meta["dtype"], "state_bytes": record.state_bytes,
            "expires_at": record.expires_at, "ttl_s": meta["ttl_s"],
        }

    # --- chunks ---------------------------------------------------------------------------
    async def push(self, session_id: str, seq: int, owner: str, body: Body | None, fmt: str | None) -> ChunkResult:
        """Apply chunk `seq` (body None = finish) exactly once and return its output."""
        start = time.perf_counter()
        record = await self._load(session_id, owner)
        meta = record.meta
        fmt = output_format(meta["kind"], fmt)
        label = FINISH if body is None else seq
        replay = self._replay(record, label)
        if replay is not None:
            return replay
        if meta["finished"]:
            raise Conflict("the session is finished; start a new one", code="session_finished")
        if body is not None and seq != meta["next_seq"]:
            raise Conflict(f"expected chunk seq {meta['next_seq']}, got {seq}", code="seq_out_of_order",
                           headers={"X-CDT-Expected-Seq": str(meta["next_seq"])})
        if meta["kind"] == "encode":
            result, state, meta = await self._encode_chunk(record, body, fmt)
        else:
            result, state, meta = await self._decode_chunk(record, body, fmt)
        if len(state) > self.settings.max_state_bytes:
            raise PayloadTooLarge(f"the session state would be {len(state)} bytes, over the limit of "
                                  f"{self.settings.max_state_bytes} (CDT_MAX_SESSION_STATE_MB); use smaller frames",
                                  code="session_state_too_large")
        meta["last"] = {"seq": label, "media_type": result.media_type, "headers": result.headers}
        saved = await self._store("save", self.store.save(session_id, SessionRecord(meta, state, result.body),
                                                          record.version, meta["ttl_s"]))
        if not saved:
            # Another request applied a chunk first: answer as a retry of it, or refuse.
            winner = await self._load(session_id, owner)
            replay = self._replay(winner, label)
            if replay is None:
                raise Conflict(f"chunk {seq} raced with another write; expected seq {winner.meta['next_seq']}",
                               code="seq_out_of_order")
            return replay
        self.metrics.state_bytes.labels(meta["kind"]).observe(len(state))
        self.metrics.chunk_seconds.labels(meta["kind"]).observe(time.perf_counter() - start)
        return result

    @staticmethod
    def _replay(record: SessionRecord, label: int | str) -> ChunkResult | None:
        last = record.meta.get("last")
        if last is None or last["seq"] != label:
            return None
        return ChunkResult(record.response, last["media_type"], {**last["headers"], REPLAYED_HEADER: "1"})

    async def _encode_chunk(self, record: SessionRecord, body: Body | None, fmt: str):
        meta = dict(record.meta)
        video = None
        if body is not None:
            video = (await asyncio.to_thread(decode_clip, body, ClipOptions(), self.limits)).video
            _, _, t, h, w = video.shape
            meta["height"], meta["width"] = meta["height"] or h, meta["width"] or w
            if (h, w) != (meta["height"], meta["width"]):
                raise InvalidInput(f"chunk frames are {h}x{w}, the session is {meta['height']}x{meta['width']}",
                                   code="chunk_shape_mismatch")
        elif meta["frames_in"] == 0:
            raise InvalidInput("nothing to finish: the session received no frames", code="empty_session")
        state = record.state or None

        def job(model: Tokenizer):
            stream = StreamingEncoder.from_state(model, state) if state else StreamingEncoder(model)
            out = stream.push(pad_spatial(video)) if video is not None else stream.finish()
            return out.float().cpu(), stream.export_state()

        latents, new_state = await self._run("session_encode", job)
        start = meta["latents_out"]
        meta["next_seq"] += body is not None
        meta["frames_in"] += 0 if video is None else video.shape[2]
        meta["latents_out"] += latents.shape[2]
        meta["finished"] = body is None
        info = {"format": CHUNK_FORMAT, "session": meta["id"], "latent_start": start,
                "latent_count": latents.shape[2], "frames_in": meta["frames_in"], "finished": meta["finished"],
                "height": meta["height"], "width": meta["width"], "model_hash": self.model_hash}
        if meta["finished"]:  # what a client needs to write the whole clip's latents file
            padding = Padding.for_shape(meta["frames_in"], meta["height"], meta["width"])
            info.update(frames=meta["frames_in"], pad_frames=padding.frames, pad_height=padding.height,
                        pad_width=padding.width)
        # The finished session keeps no feature cache: only what a replayed finish needs.
        return encode_latent_chunk(latents, info, fmt), (b"" if meta["finished"] else new_state), meta

    async def _decode_chunk(self, record: SessionRecord, body: Body | None, fmt: str):
        meta = dict(record.meta)
        if body is None:
            meta["finished"] = True
            summary = {k: meta[k] for k in ("id", "latents_in", "frames_out", "height", "width")}
            return ChunkResult(json.dumps(summary).encode(), "application/json", {}), b"", meta
        latents = parse_latent_chunk(body)
        _, _, m, h, w = latents.shape
        if pixel_frames(m, first_chunk=False) > self.settings.max_frames + 3:  # per chunk; a stream has no limit
            raise PayloadTooLarge(f"a chunk of {m} latent frames decodes to more than {self.settings.max_frames} "
                                  "frames; send fewer per chunk", code="clip_too_large")
        height, width = meta["height"] or h * SPACE_FACTOR, meta["width"] or w * SPACE_FACTOR
        if height > h * SPACE_FACTOR or width > w * SPACE_FACTOR:
            raise InvalidInput(f"latents decode to {h * SPACE_FACTOR}x{w * SPACE_FACTOR}, smaller than the "
                               f"session's {height}x{width}", code="chunk_shape_mismatch")
        meta["height"], meta["width"] = height, width
        state = record.state or None
        steps, seed = meta["steps"], meta["seed"]

        def job(model: Tokenizer):
            stream = (StreamingDecoder.from_state(model, state) if state
                      else StreamingDecoder(model, steps=steps, seed=seed))
            return stream.push(latents).cpu(), stream.export_state()

        video, new_state = await self._run("session_decode", job)
        start = meta["frames_out"]
        keep = video.shape[2] if meta["frames"] is None else max(0, min(video.shape[2], meta["frames"] - start))
        meta["next_seq"] += 1
        meta["latents_in"] += m
        meta["frames_out"] += keep
        body_bytes, media_type = (await asyncio.to_thread(frames_body, video[:, :, :keep, :height, :width],
                                                          meta["fps"], fmt)
                                  if keep else (b"", "application/octet-stream"))
        headers = {CHUNK_HEADER: json.dumps({"session": meta["id"], "frame_start": start, "frame_count": keep})}
        return ChunkResult(body_bytes, media_type, headers), new_state, meta

    async def _run(self, op: str, job):
        try:
            return await self.pool.run(op, job)
        except (CacheMismatchError, CacheFormatError) as exc:
            raise Conflict(f"session state does not fit this replica: {exc}", code="model_mismatch") from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None


# --- chunk bodies ------------------------------------------------------------------------

def output_format(kind: str, fmt: str | None) -> str:
    """Encode sessions return latents (safetensors by default), decode sessions frames (mp4)."""
    if fmt is None:
        return "safetensors" if kind == "encode" else "mp4"
    if kind == "encode" and fmt == "mp4":
        raise BadParameter("encode sessions return latents: use format=safetensors or npy")
    return fmt


def encode_latent_chunk(latents: torch.Tensor, info: dict[str, Any], fmt: str) -> ChunkResult:
    headers = {CHUNK_HEADER: json.dumps(info, sort_keys=True)}
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, latents.numpy(), allow_pickle=False)
        return ChunkResult(buffer.getvalue(), NPY, headers)
    meta = {"cdt_chunk": json.dumps(info, sort_keys=True), "format": CHUNK_FORMAT}
    return ChunkResult(st_save({"latents": latents.contiguous()}, metadata=meta), SAFETENSORS, headers)


def frames_body(video: torch.Tensor, fps: float, fmt: str) -> tuple[bytes, str]:
    """Float (1,3,n,H,W) frames as an mp4/npy/safetensors body of uint8 frames."""
    return encode_frames(tensor_to_frames(video), fps, fmt)


def parse_latent_chunk(body: Body) -> torch.Tensor:
    """Latents (1,16,m,h,w) from a chunk response, a whole latents file, or npy."""
    if body.kind is Kind.NPY:
        try:
            latents = torch.from_numpy(np.load(io.BytesIO(body.data), allow_pickle=False).copy())
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidInput(f"not a numeric npy array ({exc})", code="invalid_latents") from None
    elif body.kind is Kind.SAFETENSORS:
        try:
            tensors = st_load(body.data)
        except Exception as exc:  # safetensors raises several types for bad input
            raise InvalidInput(f"not a valid safetensors file ({exc})", code="invalid_latents") from None
        if "latents" not in tensors:
            raise InvalidInput("safetensors latents need a tensor named 'latents'", code="invalid_latents")
        latents = tensors["latents"]
    else:
        raise InvalidInput("decode sessions take latents as safetensors or npy", code="invalid_latents")
    if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != LATENT_CHANNELS or 0 in latents.shape[3:]:
        raise InvalidInput(f"latents must be (1,{LATENT_CHANNELS},T,h,w), got {tuple(latents.shape)}",
                           code="invalid_latents")
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise InvalidInput("latents must be finite floats", code="invalid_latents")
    return latents.float()
