"""The service in process (httpx ASGITransport against the real app and model):
overload and backpressure, timeouts, clean shutdown, the upload limit while
streaming, request options, settings, readiness with Redis, the async client, and
how errors are answered."""

from __future__ import annotations

import asyncio
import io

import logging

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cdt_client.client import AsyncClient, Overloaded, ServiceError
from cdt_client.retry import NO_RETRY, Retrying
from media import frames_to_tensor
from media.latents_file import latents_from_bytes
from model import NUM_TIMESTEPS, CDTConfig, build_model, save_pretrained
from service import Settings, create_app, domain_errors
from service.errors import ERROR_CODES, http_status, install_handlers
from service.sessions.store import SessionStoreUnavailable
from service.settings import SettingsError
from tests.servers import metric_sum

pytestmark = pytest.mark.timeout(300)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def frames(t: int = 9, h: int = 32, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def run_app(settings: Settings, scenario):
    """Run `scenario(app)` inside the app's lifespan (model loaded, pool started)."""
    app = create_app(settings)

    async def main():
        async with app.router.lifespan_context(app):
            return await scenario(app)

    return asyncio.run(main())


def client_for(app) -> AsyncClient:
    """A client that shows every answer as it comes (no retries)."""
    return AsyncClient("http://service", transport=httpx.ASGITransport(app=app), retry=NO_RETRY)


def http_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")


# --- 3. overload ---------------------------------------------------------------------------

def test_requests_beyond_the_queue_get_429_while_accepted_ones_complete(tiny_checkpoint, tmp_path):
    source = tmp_path / "clip.npy"
    source.write_bytes(npy_bytes(frames(17, 64, 64)))

    async def scenario(app):
        async with client_for(app) as client:
            results = await asyncio.gather(*(client.encode_file(source) for _ in range(5)), return_exceptions=True)
            # Once the burst is over the server takes work again.
            after = await client.encode_file(source)
        return results, after, app.state.metrics

    results, after, metrics = run_app(Settings(checkpoint=tiny_checkpoint, queue_size=1), scenario)
    accepted = [r for r in results if isinstance(r, bytes)]
    refused = [r for r in results if isinstance(r, Overloaded)]
    # Capacity is queue_size waiting + 1 running.
    assert len(accepted) == 2 and len(refused) == 3, results
    assert all(latents_from_bytes(r).frames == 17 for r in accepted + [after])
    assert all(r.code == "overloaded" and r.retry_after >= 1 for r in refused)
    assert metrics.rejected_total.labels("queue_full")._value.get() >= 3


def test_the_client_repeats_timed_out_requests_a_bounded_number_of_times(tiny_checkpoint, tmp_path):
    source = tmp_path / "clip.npy"
    source.write_bytes(npy_bytes(frames(17, 128, 128)))  # every chunk job outlasts 0.05 s

    async def scenario(app):
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://service", transport=transport, retry=Retrying(3, backoff_s=0.01)) as client:
            try:
                await client.encode_file(source)
            except ServiceError as exc:
                return exc, app.state.metrics

    # Every job outlives the timeout: 504 while it computes, 503 for a retry queued behind it.
    error, metrics = run_app(Settings(checkpoint=tiny_checkpoint, request_timeout_s=0.05), scenario)
    rejected = {r: metrics.rejected_total.labels(r)._value.get() for r in ("compute_timeout", "queue_timeout")}
    assert rejected["compute_timeout"] >= 1 and sum(rejected.values()) == 3  # three attempts, then the error
    assert error.status in (503, 504) and error.code in rejected


# --- upload limit, options -----------------------------------------------------------------

def test_upload_limit_stops_reading_a_chunked_body(tiny_checkpoint):
    sent = []

    async def body():
        for _ in range(200):
            sent.append(1)
            yield b"\0" * 1024

    async def scenario(app):
        async with http_for(app) as http:
            return await http.post("/v1/encode", content=body(), headers={"content-type": "video/mp4"})

    response = run_app(Settings(checkpoint=tiny_checkpoint, max_upload_mb=16 / 1024), scenario)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert "content-length" not in response.request.headers  # really chunked
    assert len(sent) <= 18  # refused at 16 KiB, not after the 200 KiB


def test_encode_options_and_float_input(tiny_checkpoint):
    clip = frames(6, 27, 21)
    as_float = frames_to_tensor(clip)[0].numpy()  # (3,T,H,W) in [-1,1]

    async def scenario(app):
        async with http_for(app) as http:
            post = lambda body, **params: http.post("/v1/encode", content=body, params=params,  # noqa: E731
                                                    headers={"content-type": "application/x-npy"})
            return {
                "uint8": await post(npy_bytes(clip)),
                "float": await post(npy_bytes(as_float), fps=12.5),
                "first4": await post(npy_bytes(clip), frames=4, size=16),
                "too_few": await post(npy_bytes(clip), frames=7),
                "out_of_range": await post(npy_bytes(as_float * 2)),
                "too_long": await post(npy_bytes(frames(9, 16, 16))),
                "too_wide": await post(npy_bytes(frames(1, 16, 80))),
            }

    r = run_app(Settings(checkpoint=tiny_checkpoint, max_frames=8, max_side=64), scenario)
    uint8, floats = latents_from_bytes(r["uint8"].content), latents_from_bytes(r["float"].content)
    assert torch.equal(uint8.latents, floats.latents) and (uint8.fps, floats.fps) == (30.0, 12.5)
    first4 = latents_from_bytes(r["first4"].content)
    assert (first4.frames, first4.height, first4.width) == (4, 21, 16)  # short side 21 -> 16
    codes = {k: (v.status_code, v.json()["error"]["code"]) for k, v in r.items()
             if k not in ("uint8", "float", "first4")}
    assert codes == {"too_few": (422, "too_few_frames"), "out_of_range": (422, "invalid_tensor"),
                     "too_long": (413, "clip_too_large"), "too_wide": (413, "clip_too_large")}


# --- settings, readiness -------------------------------------------------------------------

def set_environment(monkeypatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_settings_from_environment(monkeypatch):
    set_environment(monkeypatch, {"CDT_API_KEYS": "a, b,,", "CDT_QUEUE_SIZE": "3", "CDT_REDIS_URL": "",
                                  "CDT_DEVICES": "cuda:1, cpu,cpu", "CDT_MAX_UPLOAD_MB": "0.5"})
    s = Settings.from_env()
    assert s.api_keys == ("a", "b") and s.queue_size == 3 and s.redis_url is None
    assert s.devices == ("cuda:1", "cpu", "cpu")
    assert s.max_upload_bytes == 512 * 1024
    set_environment(monkeypatch, {"CDT_DEVICES": "tpu", "CDT_QUEUE_SIZE": "x"})
    with pytest.raises(SettingsError, match="CDT_DEVICES.*CDT_QUEUE_SIZE|CDT_QUEUE_SIZE.*CDT_DEVICES"):
        Settings.from_env()
    for listed_twice in ("cuda:0,cuda:0", "cuda,cuda:1"):  # one model per GPU
        set_environment(monkeypatch, {"CDT_DEVICES": listed_twice, "CDT_QUEUE_SIZE": "3"})
        with pytest.raises(SettingsError, match="a GPU may be listed once"):
            Settings.from_env()


async def decoder(http: httpx.AsyncClient):
    """A call of /v1/decode (npy output) on the latents of 5 frames of 16x16, given the steps."""
    latents = (await http.post("/v1/encode", content=npy_bytes(frames(5, 16, 16)),
                               headers={"content-type": "application/x-npy"})).content
    return lambda steps: http.post("/v1/decode", params={"steps": steps, "format": "npy"}, content=latents,
                                   headers={"content-type": "application/x-safetensors"})


def test_one_steps_limit_bounds_clip_decodes_sessions_and_the_page(tiny_checkpoint, monkeypatch):
    async def scenario(app):
        async with http_for(app) as http:
            decode = await decoder(http)
            session = lambda steps: http.post("/v1/sessions", json={"kind": "decode", "steps": steps})  # noqa: E731
            return {"decode_3": await decode(3), "decode_4": await decode(4), "decode_8193": await decode(8193),
                    "session_3": await session(3), "session_4": await session(4),
                    "page": await http.get("/"), "openapi": await http.get("/openapi.json")}

    r = run_app(Settings(checkpoint=tiny_checkpoint, max_steps=3), scenario)
    assert r["decode_3"].status_code == 200 and np.load(io.BytesIO(r["decode_3"].content)).shape == (5, 16, 16, 3)
    assert r["session_3"].status_code == 201
    for name in ("decode_4", "decode_8193", "session_4"):
        assert (r[name].status_code, r[name].json()["error"]["code"]) == (400, "bad_parameter"), name
    assert "CDT_MAX_STEPS" in r["decode_4"].json()["error"]["message"]
    assert 'max="3"' in r["page"].text and "1–3;" in r["page"].text
    # The schema states this replica's bound, so what it calls valid is accepted.
    schema = r["openapi"].json()
    operation_ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(operation_ids) == len(set(operation_ids))  # links and generated clients name operations by them
    steps = next(p for p in schema["paths"]["/v1/decode"]["post"]["parameters"] if p["name"] == "steps")
    assert steps["schema"]["maximum"] == schema["components"]["schemas"]["SessionSpec"]["properties"]["steps"][
        "maximum"] == 3
    monkeypatch.setenv("CDT_MAX_STEPS", str(NUM_TIMESTEPS + 1))
    with pytest.raises(SettingsError, match="CDT_MAX_STEPS"):
        Settings.from_env()


def test_steps_past_the_checkpoints_schedule_are_refused_before_any_job(tmp_path, tiny_field):
    """A checkpoint's schedule may be shorter than the schema's bound: every decode route refuses
    such steps with 422 `invalid_input` (the model's own check) without running a model job."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "short-schedule"
    save_pretrained(build_model(CDTConfig.from_preset("tiny", num_timesteps=16), "cdt"), checkpoint,
                    receptive_field=tiny_field)  # the schedule's length does not change the field
    raw = torch.zeros(1, 16, 1, 2, 2).numpy().tobytes()

    async def scenario(app):
        async with http_for(app) as http:
            decode = await decoder(http)
            answers = {"decode": await decode(17), "session": await http.post(
                "/v1/sessions", json={"kind": "decode", "steps": 17}), "diffusers": await http.post(
                "/v1/diffusers/decode", params={"steps": 17, "shape": [1, 16, 1, 2, 2], "dtype": "float32",
                                                "output_type": "pt"}, content=raw)}
            failed_jobs = metric_sum((await http.get("/metrics")).text, "cdt_compute_seconds_count", outcome="error")
            return answers, failed_jobs, await decode(16)

    answers, failed_jobs, longest = run_app(Settings(checkpoint=checkpoint), scenario)
    for name, answer in answers.items():
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_input"), name
        assert "16" in answer.json()["error"]["message"], name
    assert failed_jobs == 0
    assert longest.status_code == 200


# --- errors --------------------------------------------------------------------------------

def test_every_domain_error_has_a_status_and_its_code_is_listed():
    classes = [c for c in vars(domain_errors).values() if isinstance(c, type) and issubclass(c, Exception)
               and c is not domain_errors.ServiceError] + [SessionStoreUnavailable]
    assert len(classes) >= 13
    for cls in classes:
        status = http_status(cls)
        assert 400 <= status < 500 or status in (503, 504), cls
        assert status == 499 or cls.code in ERROR_CODES[status], cls


def test_an_escaping_value_error_is_a_logged_500(caplog):
    """A ValueError no domain error stands for is a bug in the service, not the client's."""
    app = FastAPI()
    install_handlers(app)

    @app.get("/bug")
    async def raise_a_bug():
        raise ValueError("frames must be a (B,3,T,H,W) tensor")

    @app.get("/refused")
    async def refuse():
        raise domain_errors.SeqOutOfOrder("expected chunk seq 3, got 5", expected_seq=3)

    with caplog.at_level(logging.ERROR, logger="cdt.service"), TestClient(app, raise_server_exceptions=False) as c:
        bug, refused = c.get("/bug"), c.get("/refused")
    assert bug.status_code == 500 and bug.json() == {"error": {"code": "internal_error",
                                                               "message": "internal error (ValueError)"}}
    assert "unhandled error on GET /bug" in caplog.text and "frames must be" in caplog.text
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "seq_out_of_order"
    assert refused.headers["x-cdt-expected-seq"] == "3"


@pytest.mark.parametrize("url, ready", [("redis://127.0.0.1:6379/0", True), ("redis://127.0.0.1:1/0", False)])
def test_readyz_checks_the_session_store(tiny_checkpoint, url, ready):
    async def scenario(app):
        async with http_for(app) as http:
            return await http.get("/readyz"), await http.get("/healthz")

    readyz, healthz = run_app(Settings(checkpoint=tiny_checkpoint, redis_url=url), scenario)
    assert healthz.status_code == 200
    assert readyz.status_code == (200 if ready else 503)
    if not ready:
        assert readyz.json()["error"]["code"] == "not_ready" and "session_store" in readyz.json()["error"]["message"]


def test_async_client_round_trip(tiny_checkpoint, tmp_path):
    source = tmp_path / "clip.npy"
    source.write_bytes(npy_bytes(frames(5, 16, 24)))

    async def scenario(app):
        async with client_for(app) as client:
            await client.encode_file(source, tmp_path / "latents.safetensors")
            decoded = await client.decode_file(tmp_path / "latents.safetensors", tmp_path / "out.npy", seed=1)
            return decoded, await client.models(), await client.ready()

    decoded, models, ready = run_app(Settings(checkpoint=tiny_checkpoint), scenario)
    assert np.load(io.BytesIO(decoded)).shape == (5, 16, 24, 3) and (tmp_path / "out.npy").is_file()
    assert models[0]["preset"] == "tiny" and ready
