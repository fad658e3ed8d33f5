"""The real service over HTTP, the service stage of `scripts/gpu_check.sh`.

Starts `cdt serve` on a free port (tests/servers.py `Server`) on the devices given
(CDT_DEVICES), then checks, each a row of the stage's table:

- ready: the model card (preset, dtype, devices) once /readyz answers;
- whole clip: /v1/encode of a val clip and /v1/decode of its latents, against the
  checkpoint run in this process on the CPU in fp32, on the frames the service encoded
  (/v1/frames): on their first 9 frames, whose latents and decoded frames are the whole
  clip's first ones (the model is causal), so that the CPU's share stays small at any length;
- encode session, decode session: the clip through sessions of several chunks, against
  the whole-clip answers;
- diffusers encode, diffusers decode: the same through /v1/diffusers/*, as diffusers'
  remote_encode and remote_decode send it (float32 tensors; and a bfloat16 answer);
- out of memory, on GPUs only: a decode whose feature cache alone is twice the largest
  device's memory (its size measured on the CPU, scaled to CDT_MAX_SIDE's default frame;
  the DDIM steps make it grow, each step keeping its own U-Net cache), with
  CDT_MEMORY_BUDGET_MB set so high that admission lets it run: 503 `device_out_of_memory`
  with Retry-After, after which the clip encodes as before and /readyz is ready;
- devices, with more than one: concurrent requests, and every device ran jobs (the
  `cdt_compute_seconds_count{device}` series of /metrics), all answers alike;
- ready at the end: /readyz and /healthz, every device healthy, no device error but the
  one provoked.

Agreement: fp32 on the CPU is held to the model's float contract (tests/tolerance.py
FLOAT_ATOL, and uint8 frames within a one-level rounding flip); whatever runs on a GPU or in
bf16 to the bf16 bounds (the latents' relative error, the frames' PSNR).

    python -m benchmarks.gpu_service --devices cuda --run-dir DIR [--frames 33] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.gpu_check import FAILED, SKIPPED, check, verdict, write_stage
from benchmarks.gpu_parity import decode, encode, val_clips
from cdt_client.client import Client, content_type, raise_for_error
from cdt_client.retry import Retrying
from cdt_client.streaming import assemble_latents, npy_array, read_latents
from media import frames_to_tensor, psnr, tensor_to_frames
from model import DEFAULT_CHECKPOINT, StreamingDecoder, from_pretrained, outputs_for
from tests.servers import Server, metric_sum
from tests.tolerance import (BF16_FRAMES_PSNR_DB, BF16_TOLERANCE, FLOAT_ATOL, assert_float_close,
                             assert_uint8_close, relative_error)
from training.config import SHARED_VIDEOS

TENSOR = "tensor/binary"  # the diffusers routes' raw tensor bodies
SAFETENSORS = "application/x-safetensors"
SESSION_CHUNK_FRAMES = 4
SESSION_CHUNK_LATENTS = 1
OOM_SIDE = 2048  # CDT_MAX_SIDE's default: the largest frame a request may decode
OOM_MARGIN = 2.0  # the request's feature cache alone, over the largest device's memory
OOM_BUDGET_MB = 1e9  # CDT_MEMORY_BUDGET_MB on GPUs: admission never refuses the request first
CACHE_PROBE_SIDE = 64  # the frame the feature cache's size per pixel is measured at
REFERENCE_FRAMES = 9  # 1+4k: a whole number of latent groups, 3 latent frames


def cache_bytes_per_pixel_step(model, model_hash: str) -> float:
    """Bytes each DDIM step's feature cache holds per pixel of the frame, in the model's dtype:
    the cache after one latent frame decoded in 2 steps less that in 1, at a small frame."""
    side, sizes = CACHE_PROBE_SIDE // 8, []
    with torch.inference_mode():
        for steps in (1, 2):
            stream = StreamingDecoder(model, model_hash, steps=steps)
            stream.push(torch.zeros(1, 16, 1, side, side, device=model.device))
            sizes.append(stream.cache.nbytes())
    return (sizes[1] - sizes[0]) / CACHE_PROBE_SIDE**2


class Agreement:
    """How closely two computations of one result must agree: the float contract for fp32 on
    the CPU, the bf16 bounds for anything computed on a GPU or in bf16."""

    def __init__(self, card: dict) -> None:
        self.contract = card["dtype"] == "fp32" and all(d["name"].startswith("cpu") for d in card["devices"])

    def latents(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[bool, str]:
        error, largest = relative_error(a, b), (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()
        detail = f"latents: max diff {largest:.2g}, rel. error {error:.2g}"
        if self.contract:
            return _holds(assert_float_close, a, b), f"{detail} (max diff <= {FLOAT_ATOL:g})"
        return error <= BF16_TOLERANCE["rtol"], f"{detail} (rel. error <= {BF16_TOLERANCE['rtol']:g})"

    def frames(self, a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
        if a.shape != b.shape:
            return False, f"frames {a.shape} against {b.shape}"
        agree = psnr(a, b)
        if self.contract:
            return _holds(assert_uint8_close, a, b), f"frames agree to {agree:.1f} dB (uint8 within one level)"
        return agree >= BF16_FRAMES_PSNR_DB, f"frames agree to {agree:.1f} dB (>= {BF16_FRAMES_PSNR_DB:g})"


def _holds(assertion, *args) -> bool:
    try:
        assertion(*args)
    except AssertionError:
        return False
    return True


def _shape(array) -> str:
    return "x".join(map(str, array.shape))


class ServiceCheck:
    """The checks, in order, on one running server; each gives (outcome, detail, value)."""

    def __init__(self, server: Server, started: float, checkpoint: Path, clip: Path, frames: int, size: int,
                 timeout: float, run_dir: Path) -> None:
        """`started`: when the server was started (time.monotonic)."""
        self.server, self.started = server, started
        self.clip, self.options, self.run_dir = clip, {"frames": frames, "size": size}, run_dir
        self.timeout = timeout
        self.client = Client(server.url, timeout=timeout, retry=Retrying(attempts=1))  # a device error shows
        self.http = httpx.Client(base_url=server.url, timeout=timeout)
        self.checkpoint = checkpoint
        self.reference, identity = from_pretrained(checkpoint)  # CPU, fp32
        self.model_hash = identity.content_hash
        self.out_of_memory_provoked = 0

    def ready(self):
        self.server.wait_ready(self.timeout)
        (self.card,) = self.client.models()
        self.agreement = Agreement(self.card)
        self.devices = [device["name"] for device in self.card["devices"]]
        ok = self.card["hash"] == self.model_hash
        return verdict(ok), (f"{self.card['preset']} {self.card['kind']} {self.card['hash'][:12]} on "
                             f"{', '.join(self.devices)} in {self.card['dtype']}, ready in "
                             f"{time.monotonic() - self.started:.1f} s" + ("" if ok else f"; {self.checkpoint} is "
                                                                    f"{self.model_hash[:12]}")), self.card

    def whole_clip(self):
        self.latents_file = self.client.encode_file(self.clip, **self.options)
        self.latents = read_latents(self.latents_file)
        response = self.http.post("/v1/frames", content=self.clip.read_bytes(),
                                  params={**self.options, "format": "npy"},
                                  headers={"content-type": content_type(self.clip)})
        raise_for_error(response)
        self.frames = npy_array(response.content)
        latents_path = self.run_dir / "latents.safetensors"
        latents_path.write_bytes(self.latents_file)
        self.decoded = npy_array(self.client.decode_file(latents_path, format="npy"))
        head = self.frames[:REFERENCE_FRAMES] if len(self.frames) >= REFERENCE_FRAMES else self.frames
        head_latents = self.latents[:, :, :outputs_for("encode", len(head))]
        with torch.inference_mode():
            reference_latents = encode(self.reference, self.model_hash, head)
            reference_frames = decode(self.reference, self.model_hash, torch.from_numpy(head_latents), head)
        latents_ok, latents_detail = self.agreement.latents(head_latents, reference_latents)
        frames_ok, frames_detail = self.agreement.frames(self.decoded[:len(head)], reference_frames)
        return verdict(latents_ok and frames_ok), (
            f"{self.clip.name} {_shape(self.frames[..., 0])} -> {_shape(self.latents)} -> "
            f"{_shape(self.decoded[..., 0])}, reconstruction PSNR {psnr(self.frames, self.decoded):.1f} dB; its first "
            f"{len(head)} frames against the model on the CPU in fp32: {latents_detail}; {frames_detail}"), None

    def encode_session(self):
        latents = read_latents(self.client.stream_encode(self.frames, chunk_frames=SESSION_CHUNK_FRAMES))
        ok, detail = self.agreement.latents(latents, self.latents)
        chunks = math.ceil(len(self.frames) / SESSION_CHUNK_FRAMES)
        return verdict(ok), f"{chunks} chunks of {SESSION_CHUNK_FRAMES} frames, a finish; against /v1/encode: " \
                            f"{detail}", None

    def decode_session(self):
        frames = self.client.stream_decode(self.latents_file, chunk_latents=SESSION_CHUNK_LATENTS)
        ok, detail = self.agreement.frames(frames, self.decoded)
        chunks = math.ceil(self.latents.shape[2] / SESSION_CHUNK_LATENTS)
        return verdict(ok), f"{chunks} chunks of {SESSION_CHUNK_LATENTS} latent frame; against /v1/decode: " \
                            f"{detail}", None

    def _tensor_post(self, route: str, body: bytes, shape, dtype: str, **params) -> tuple[np.ndarray | torch.Tensor,
                                                                                            str]:
        """A diffusers route's answer to a raw tensor body: the tensor it answers, and its dtype."""
        response = self.http.post(route, content=body, params={"shape": list(shape), "dtype": dtype, **params},
                                  headers={"content-type": TENSOR})
        raise_for_error(response)
        answer_shape, answer_dtype = json.loads(response.headers["shape"]), response.headers["dtype"]
        if answer_dtype == "bfloat16":
            tensor = torch.frombuffer(bytearray(response.content), dtype=torch.bfloat16)
            return tensor.reshape(answer_shape), answer_dtype
        return np.frombuffer(response.content, dtype=answer_dtype).reshape(answer_shape).copy(), answer_dtype

    def diffusers_encode(self):
        video = frames_to_tensor(self.frames)
        latents, dtype = self._tensor_post("/v1/diffusers/encode", video.numpy().tobytes(), video.shape, "float32")
        ok, detail = self.agreement.latents(latents, self.latents)
        return verdict(ok and dtype == "float32"), f"float32 {_shape(video)} -> {dtype} {_shape(latents)}; " \
                                                   f"against /v1/encode: {detail}", None

    def diffusers_decode(self):
        t, h, w = self.frames.shape[:3]
        frames, dtype = self._tensor_post("/v1/diffusers/decode", self.latents.tobytes(), self.latents.shape, "float32",
                                          output_type="pt", partial_postprocess="true")
        ok, detail = self.agreement.frames(np.ascontiguousarray(frames[:t, :h, :w]), self.decoded)
        bf16 = torch.from_numpy(self.latents).to(torch.bfloat16)
        video, bf16_dtype = self._tensor_post("/v1/diffusers/decode", bf16.view(torch.uint8).numpy().tobytes(),
                                              bf16.shape, "bfloat16", output_type="pt")
        bf16_frames = tensor_to_frames(video.float())[:t, :h, :w]
        agree = psnr(bf16_frames, self.decoded)
        bf16_ok = bf16_dtype == "bfloat16" and agree >= BF16_FRAMES_PSNR_DB
        return verdict(ok and dtype == "uint8" and bf16_ok), (
            f"float32 latents -> {dtype} {_shape(frames)} (padded clip), cropped, against /v1/decode: {detail}; "
            f"bfloat16 latents -> {bf16_dtype} {_shape(video)}, against /v1/decode: frames agree to {agree:.1f} dB "
            f"(>= {BF16_FRAMES_PSNR_DB:g})"), None

    def out_of_memory(self):
        gpus = [torch.device(name) for name in self.devices if name.startswith("cuda")]
        if not gpus:
            # The same request, small enough for the CPU: what a GPU run sends is a request the service takes.
            response = self._large_decode(CACHE_PROBE_SIDE, steps=2)
            taken = response.status_code == 200 and npy_array(response.content).shape[:3] == (5, CACHE_PROBE_SIDE,
                                                                                               CACHE_PROBE_SIDE)
            return SKIPPED if taken else FAILED, (
                "no GPU (CPU reduced mode): no device memory to exhaust (tests/test_device_pool.py raises the error "
                f"inside jobs on the CPU); the same request at 5x{CACHE_PROBE_SIDE}x{CACHE_PROBE_SIDE} in 2 steps: "
                f"{response.status_code}" + ("" if taken else f" {response.text[:200]}")), None
        memory = max(torch.cuda.get_device_properties(device).total_memory for device in gpus)
        model, identity = from_pretrained(self.checkpoint, dtype=self.card["dtype"])
        per_step = cache_bytes_per_pixel_step(model, identity.content_hash)
        steps = math.ceil(OOM_MARGIN * memory / (per_step * OOM_SIDE**2))
        errors_before = metric_sum(self.server.metrics(), "cdt_device_errors_total", kind="out_of_memory")
        response = self._large_decode(OOM_SIDE, steps)
        self.out_of_memory_provoked += 1
        is_json = response.headers.get("content-type", "").startswith("application/json")
        code = response.json()["error"]["code"] if is_json else ""
        retry_after = response.headers.get("retry-after", "")
        refused = response.status_code == 503 and code == "device_out_of_memory" and retry_after.isdigit() \
            and int(retry_after) >= 1
        counted = metric_sum(self.server.metrics(), "cdt_device_errors_total", kind="out_of_memory") - errors_before
        latents_after = read_latents(self.client.encode_file(self.clip, **self.options))
        again, detail = self.agreement.latents(latents_after, self.latents)
        ready = self.http.get("/readyz").status_code == 200
        return verdict(refused and counted == 1 and again and ready), (
            f"decode of 5x{OOM_SIDE}x{OOM_SIDE} frames in {steps} DDIM steps (feature cache {per_step:.0f} B per "
            f"pixel and step: {per_step * OOM_SIDE**2 * steps / 2**30:.0f} GiB, the largest device has "
            f"{memory / 2**30:.0f} GiB): {response.status_code} {code or response.text[:200]}, Retry-After "
            f"{retry_after or 'absent'}, {counted:g} out-of-memory error counted; then the clip encodes again "
            f"({detail}); /readyz {'ready' if ready else 'NOT ready'}"), None

    def _large_decode(self, side: int, steps: int) -> httpx.Response:
        """/v1/decode of 2 latent frames (5 frames) of side x side, in `steps` DDIM steps."""
        latents = np.zeros((1, 16, 2, side // 8, side // 8), np.float32)
        body = assemble_latents([latents], {"frames": 5, "height": side, "width": side, "pad_frames": 0,
                                            "pad_height": 0, "pad_width": 0, "model": self.card["name"],
                                            "time_factor": self.card["compression"]["time"]}, self.card, fps=24.0)
        return self.http.post("/v1/decode", content=body, params={"steps": steps, "format": "npy"},
                              headers={"content-type": SAFETENSORS})

    def devices_ran_jobs(self):
        if len(self.devices) < 2:
            return SKIPPED, f"one device ({self.devices[0]})", None
        before = self._jobs_per_device()
        count = 2 * len(self.devices)

        def encode_once(_):  # a client per thread: concurrent requests, spread by the pool's placement
            with Client(self.server.url, timeout=self.timeout, retry=Retrying(attempts=1)) as client:
                return read_latents(client.encode_file(self.clip, **self.options))

        with ThreadPoolExecutor(count) as threads:
            answers = list(threads.map(encode_once, range(count)))
        ran = {name: jobs - before[name] for name, jobs in self._jobs_per_device().items()}
        agreements = [self.agreement.latents(latents, self.latents) for latents in answers]
        ok = all(jobs > 0 for jobs in ran.values()) and all(same for same, _ in agreements)
        # The first answer that differs, else the first's agreement.
        detail = next((detail for same, detail in agreements if not same), agreements[0][1])
        return verdict(ok), (f"{count} concurrent encodes; model jobs per device: "
                             f"{', '.join(f'{name} {jobs:g}' for name, jobs in ran.items())}; against the "
                             f"first /v1/encode: {detail}"), None

    def _jobs_per_device(self) -> dict[str, float]:
        text = self.server.metrics()
        return {name: metric_sum(text, "cdt_compute_seconds_count", device=name) for name in self.devices}

    def ready_at_the_end(self):
        ready, alive = self.http.get("/readyz").status_code, self.http.get("/healthz").status_code
        text = self.server.metrics()
        healthy = metric_sum(text, "cdt_device_healthy")
        fatal = metric_sum(text, "cdt_device_errors_total", kind="fatal")
        oom = metric_sum(text, "cdt_device_errors_total", kind="out_of_memory")
        ok = ready == alive == 200 and healthy == len(self.devices) and fatal == 0 \
            and oom == self.out_of_memory_provoked
        return verdict(ok), (f"/readyz {ready}, /healthz {alive}, {healthy:g} of {len(self.devices)} devices "
                             f"healthy, device errors: {fatal:g} fatal, {oom:g} out of memory "
                             f"({self.out_of_memory_provoked} provoked)"), None

    def close(self) -> None:
        self.client.close()
        self.http.close()


def run(args) -> int:
    environment = {"devices": args.devices}
    if any(name.startswith("cuda") for name in args.devices.split(",")):
        environment["memory_budget_mb"] = str(OOM_BUDGET_MB)
    rows: list[dict] = []
    started = time.monotonic()
    server = Server(args.checkpoint, args.run_dir / "serve.log", **environment)
    try:
        service = ServiceCheck(server, started, args.checkpoint, args.clip, args.frames, args.size, args.timeout,
                               args.run_dir)
        try:
            if check(rows, "ready", service.ready) is None:  # no server to check
                return write_stage(args.run_dir, "service", rows)
            for name, step in (("whole clip", service.whole_clip), ("encode session", service.encode_session),
                               ("decode session", service.decode_session),
                               ("diffusers encode", service.diffusers_encode),
                               ("diffusers decode", service.diffusers_decode),
                               ("out of memory", service.out_of_memory), ("devices", service.devices_ran_jobs),
                               ("ready at the end", service.ready_at_the_end)):
                check(rows, name, step)
        finally:
            service.close()
    finally:
        server.stop()
    notes = (f"`cdt serve` with CDT_DEVICES={args.devices}" +
             (f", CDT_MEMORY_BUDGET_MB={OOM_BUDGET_MB:g}" if "memory_budget_mb" in environment else "") +
             f"; {args.clip.name}, {args.frames} frames at short side {args.size}; decodes in 1 DDIM step, seed 0.")
    return write_stage(args.run_dir, "service", rows, notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cuda", help="CDT_DEVICES of the server")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--manifest", type=Path, default=SHARED_VIDEOS / "MANIFEST.tsv")
    parser.add_argument("--clip", type=Path, help="the clip sent (default: the manifest's first val clip)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=256, help="short side the service resizes the clip to")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the server may take to be ready, "
                                                                     "and each request")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    args.clip = args.clip or val_clips(args.manifest, 1)[0]
    # The server is stopped on the way out, also when the script stops this stage.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
