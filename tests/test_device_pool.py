"""The worker pool over several devices, on the CPU (`CDT_DEVICES=cpu,cpu`): each worker's
own thread and share of the cores, dispatch by load with a request pinned to its device, a
session moving to another device, timeouts and shutdown; and the failures of a device,
raised inside real jobs by a hook on the model (`torch.OutOfMemoryError`, and
`torch.AcceleratorError`, what torch raises for a CUDA error): their status codes, metrics,
readiness and recovery.

The CUDA side of these (allocator cache, sticky errors on a real GPU) has not run here:
scripts/gpu_check.sh runs it where a GPU is."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from media import encode_chunks
from service import Settings
from service.batching import Batching
from service.callers import Callers
from service.devices import DeviceSetupError, resolve, slots
from service.domain_errors import Timeout, Unavailable
from service.catalog import Catalog, ServedModel
from service.host import HostPool
from service.memory import MemoryModel
from service.metrics import Metrics
from service.workers import DeviceWorker, WorkerPool
from tests.servers import metric_sum
from tests.session_helpers import latents_of, npy_bytes, real_frames
from tests.test_service_app import frames, http_for, run_app
from tests.tolerance import assert_float_close

pytestmark = pytest.mark.timeout(300)

TWO_CPUS = ("cpu", "cpu")


def make_pool(served, queue_size: int, timeout_s: float, memory_bytes: int, devices=("cpu",),
              batching: Batching = Batching()) -> WorkerPool:
    model, identity = served
    metrics = Metrics()
    callers = Callers({}, queue_limit=2 * queue_size * len(devices), rate=0, burst=1, metrics=metrics)
    workers = [DeviceWorker(slot, {"tiny": model}, MemoryModel("cpu", memory_bytes), queue_size, timeout_s,
                            metrics, callers, batching) for slot in slots([torch.device(d) for d in devices])]
    catalog = Catalog([ServedModel("tiny", Path("tiny"), identity, model)])
    return WorkerPool(workers, catalog, HostPool(1, metrics), callers, metrics)


async def run(pool: WorkerPool, op: str, fn):
    """A one-job request, admitted where the pool places it."""
    admission = await pool.choose().admit(0)
    try:
        return await admission.execute(op, fn)
    finally:
        admission.release()


def sleeper(seconds: float, ran: list):
    def job(model):
        time.sleep(seconds)
        ran.append(seconds)
        return seconds
    return job


# --- one worker: timeouts, shutdown, memory ----------------------------------------------------

def test_timeouts_are_504_while_computing_and_503_while_waiting(served):
    ran: list = []

    async def scenario():
        pool = make_pool(served, queue_size=4, timeout_s=0.3, memory_bytes=2**40)
        pool.start()
        running = asyncio.ensure_future(run(pool, "slow", sleeper(0.6, ran)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(run(pool, "queued", sleeper(0.01, ran)))
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        later = await run(pool, "fast", sleeper(0.0, ran))
        await pool.stop()
        return outcomes, later

    (computing, waited), later = asyncio.run(scenario())
    assert isinstance(computing, Timeout) and computing.code == "compute_timeout"
    assert isinstance(waited, Unavailable) and waited.code == "queue_timeout"
    assert later == 0.0 and ran == [0.6, 0.0]  # the expired queued job never ran


def test_a_request_that_fits_alone_waits_for_memory_in_arrival_order(served):
    async def scenario():
        pool = make_pool(served, queue_size=4, timeout_s=0.5, memory_bytes=100)
        pool.start()
        worker = pool.workers[0]
        first = await worker.admit(60)
        big = asyncio.ensure_future(worker.admit(70))
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(worker.admit(30))  # would fit now, but arrived after `big`
        await asyncio.sleep(0.05)
        waiting = (big.done(), small.done())
        first.release()
        second = await asyncio.wait_for(big, 1)
        third = await asyncio.wait_for(small, 1)
        reserved = worker.memory.reserved
        second.release()
        third.release()
        blocker = await worker.admit(100)
        with pytest.raises(Unavailable) as timed_out:
            await worker.admit(1)  # never fits beside `blocker` within the timeout
        blocker.release()
        await pool.stop()
        return waiting, reserved, worker.memory.reserved, timed_out.value.code

    waiting, reserved, after, code = asyncio.run(scenario())
    assert waiting == (False, False)
    assert reserved == 100 and after == 0
    assert code == "queue_timeout"


# --- two CPU workers ------------------------------------------------------------------------------

def test_cpu_workers_run_in_threads_of_their_own_with_a_share_of_the_cores(served):
    async def scenario():
        pool = make_pool(served, queue_size=2, timeout_s=30, memory_bytes=2**40, devices=TWO_CPUS)
        pool.start()
        where = lambda model: (threading.current_thread().name, torch.get_num_threads())  # noqa: E731
        seen = []
        for worker in pool.workers:
            admission = await worker.admit(0)
            seen.append(await admission.execute("where", where))
            admission.release()
        await pool.stop()
        return [w.name for w in pool.workers], seen, threading.current_thread().name

    names, seen, loop_thread = asyncio.run(scenario())
    assert names == ["cpu/0", "cpu/1"]
    assert [thread.rsplit("_", 1)[0] for thread, _ in seen] == ["cdt-model-cpu/0", "cdt-model-cpu/1"]
    assert loop_thread not in {thread for thread, _ in seen}
    assert [threads for _, threads in seen] == [max(1, torch.get_num_threads() // 2)] * 2


def test_requests_go_to_the_least_loaded_device_and_stop_finishes_them_all(served):
    ran: list = []

    async def scenario():
        pool = make_pool(served, queue_size=1, timeout_s=30, memory_bytes=2**40, devices=TWO_CPUS)
        pool.start()
        admissions = [await pool.choose().admit(0) for _ in range(4)]  # two per device: the queue limit
        placed = [a.worker.name for a in admissions]
        with pytest.raises(Exception) as full:
            pool.check_capacity("anonymous")
        jobs = [asyncio.ensure_future(a.execute("job", sleeper(0.05 * (i + 1), ran)))
                for i, a in enumerate(admissions)]
        await asyncio.sleep(0.01)
        await pool.stop()
        with pytest.raises(Unavailable, match="shutting down"):
            pool.choose()
        return placed, full.value, await asyncio.gather(*jobs)

    placed, full, results = asyncio.run(scenario())
    assert placed == ["cpu/0", "cpu/1", "cpu/0", "cpu/1"]
    assert full.code == "overloaded" and full.retry_after_s >= 1
    assert results == pytest.approx([0.05, 0.1, 0.15, 0.2]) and len(ran) == 4


def test_whole_clip_requests_share_the_devices_and_each_runs_on_one(tiny_checkpoint, served):
    """Two encodes at once on two CPU workers: one device each, every chunk's job there; each
    result as the model gives it (within float rounding: a worker's one thread sums in another
    order than the reference's)."""
    clip = frames(t=25, h=24, w=32)  # 25 frames: 4 chunks of 8 on each request
    model, identity = served
    with torch.inference_mode():
        reference = torch.cat(list(encode_chunks(model, identity.content_hash, [clip[i:i + 8] for i in range(0, 25, 8)])),
                              dim=2)

    async def scenario(app):
        async with http_for(app) as http:
            answers = await asyncio.gather(*(http.post("/v1/encode", content=npy_bytes(clip), params={"format": "npy"},
                                                       headers={"content-type": "application/x-npy"})
                                             for _ in range(2)))
            text = (await http.get("/metrics")).text
        return answers, text

    answers, text = run_app(Settings(checkpoint=tiny_checkpoint, devices=TWO_CPUS), scenario)
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert_float_close(np.load(io.BytesIO(answer.content)), reference.numpy())
    jobs = {name: metric_sum(text, "cdt_compute_seconds_count", op="encode", device=name) for name in ("cpu/0", "cpu/1")}
    assert jobs == {"cpu/0": 5, "cpu/1": 5}  # 4 chunks and the tail, all of a request on its device


# --- failures of a device -----------------------------------------------------------------------------

@contextmanager
def fault(model, exc: Exception, worker: str, times: int = 1):
    """Raise `exc` in the encoder's forward on `worker`'s model thread, `times` times."""
    left = [times]

    def hook(module, args):
        if threading.current_thread().name.startswith(f"cdt-model-{worker}_") and left[0]:
            left[0] -= 1
            raise exc

    handle = model.encoder.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def post_encode(http: httpx.AsyncClient, clip: np.ndarray):
    return http.post("/v1/encode", content=npy_bytes(clip), headers={"content-type": "application/x-npy"})


def test_out_of_memory_fails_only_its_job_and_the_device_goes_on(tiny_checkpoint):
    async def scenario(app):
        model = app.state.pool.workers[0].models["tiny"]
        async with http_for(app) as http:
            with fault(model, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cpu"):
                refused = await post_encode(http, frames(9, 16, 16))
            retried = await post_encode(http, frames(9, 16, 16))
            ready, alive = await http.get("/readyz"), await http.get("/healthz")
            text = (await http.get("/metrics")).text
        return refused, retried, ready, alive, text

    refused, retried, ready, alive, text = run_app(Settings(checkpoint=tiny_checkpoint), scenario)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "device_out_of_memory"
    assert int(refused.headers["retry-after"]) >= 1
    assert retried.status_code == 200
    assert ready.status_code == 200 and alive.status_code == 200
    assert metric_sum(text, "cdt_device_errors_total", device="cpu", kind="out_of_memory") == 1
    assert metric_sum(text, "cdt_device_healthy", device="cpu") == 1


def test_a_failed_device_leaves_service_and_its_sessions_move_to_another(tiny_checkpoint, shared_videos, served):
    """An encode session's second chunk hits a fatal error on its device: 503 `device_failed`,
    /readyz fails, /healthz still answers while a device works, and the retried chunk is rebuilt
    on the other device from the session's log, with the latents the model gives. Once the
    last device fails, /healthz fails too (the orchestrator restarts the replica)."""
    clip = real_frames(shared_videos, 13)
    model, identity = served
    with torch.inference_mode():
        reference = torch.cat(list(encode_chunks(model, identity.content_hash, [clip[:5], clip[5:]])), dim=2)

    async def scenario(app):
        pool = app.state.pool
        async with http_for(app) as http:
            sid = (await http.post("/v1/sessions", json={"kind": "encode"})).json()["id"]
            first = await http.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(clip[:5]))
            held_by = app.state.sessions.hot.device_of(sid)
            other = next(w.name for w in pool.workers if w.name != held_by)
            with fault(pool.models.default.reference, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                       held_by):
                failed = await http.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(clip[5:]))
            not_ready, still_alive = await http.get("/readyz"), await http.get("/healthz")
            moved = await http.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(clip[5:]))
            moved_to = app.state.sessions.hot.device_of(sid)
            finished = await http.post(f"/v1/sessions/{sid}/finish")
            with fault(pool.models.default.reference, torch.AcceleratorError("CUDA error: unspecified launch failure"), other):
                last = await post_encode(http, frames(9, 16, 16))
            dead, refused = await http.get("/healthz"), await post_encode(http, frames(9, 16, 16))
            text = (await http.get("/metrics")).text
        return first, held_by, failed, not_ready, still_alive, moved, moved_to, other, finished, last, dead, refused, text

    (first, held_by, failed, not_ready, still_alive, moved, moved_to, other, finished, last, dead, refused,
     text) = run_app(Settings(checkpoint=tiny_checkpoint, devices=TWO_CPUS), scenario)
    assert first.status_code == 200 and held_by in ("cpu/0", "cpu/1")
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "device_failed"
    assert not_ready.status_code == 503 and f"device {held_by}" in not_ready.json()["error"]["message"]
    assert still_alive.status_code == 200
    assert moved.status_code == 200 and moved.headers.get("x-cdt-rebuild") and moved_to == other
    assert finished.status_code == 200
    latents = torch.cat([latents_of(first.content), latents_of(moved.content), latents_of(finished.content)], dim=2)
    assert_float_close(latents, reference)
    assert last.status_code == 503 and last.json()["error"]["code"] == "device_failed"
    assert dead.status_code == 503
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "device_failed"
    assert metric_sum(text, "cdt_device_healthy") == 0
    assert metric_sum(text, "cdt_device_errors_total", kind="fatal") == 2


def test_devices_that_are_not_here_are_refused_at_start():
    with pytest.raises(DeviceSetupError, match="CUDA is not available here"):
        resolve(("cuda",))
    assert resolve(()) == [torch.device("cpu")]  # no GPU visible: the CPU
