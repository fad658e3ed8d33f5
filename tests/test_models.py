"""Several models in one service: the shipped checkpoint (`cdt-tiny`) beside a freshly
initialised tiny one (`fresh`, another content hash), served at once by the real app in
process. Each route runs the model it names, latents files carry their model and are
refused by another (409 `model_mismatch`), an unknown name is 404 `model_not_found`,
sessions stay pinned to their model's weights (also on a replica that does not serve
them), metrics carry the model, and `/v1/models` lists both. The page's selector is
driven in a real browser in tests/test_web_page.py."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch

from cdt_client.client import AsyncClient, NotFound
from cdt_client.retry import NO_RETRY
from media import encode_frames, frames_to_tensor
from media.latents_file import latents_from_bytes
from model import DEFAULT_CHECKPOINT, from_pretrained
from service import Settings, create_app
from service.catalog import CheckpointMissing, model_sources
from service.memory import chunk_lengths
from service.settings import SettingsError
from tests.servers import SHARED_REDIS_URL, metric_sum
from tests.session_helpers import latents_of, npy_bytes
from tests.test_service_app import frames, http_for, run_app
from tests.tolerance import assert_float_close

pytestmark = pytest.mark.timeout(300)

NPY = {"content-type": "application/x-npy"}
SAFETENSORS = {"content-type": "application/x-safetensors"}


@pytest.fixture(scope="module")
def two_models(tiny_checkpoint) -> tuple[str, ...]:
    """CDT_MODELS of the shipped checkpoint (the default) and a fresh tiny one."""
    return (f"cdt-tiny={DEFAULT_CHECKPOINT}", f"fresh={tiny_checkpoint}")


@pytest.fixture(scope="module")
def hashes(tiny_checkpoint) -> dict[str, str]:
    return {name: (path / "model.sha256").read_text().strip()
            for name, path in (("cdt-tiny", DEFAULT_CHECKPOINT), ("fresh", tiny_checkpoint))}


def test_the_settings_name_the_models(monkeypatch, tiny_checkpoint, tmp_path):
    def sources(**env):
        for name in ("CDT_MODELS", "CDT_CHECKPOINT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return [(s.name, s.path) for s in model_sources(Settings.from_env())]

    assert sources(CDT_CHECKPOINT=str(tiny_checkpoint)) == [("tiny", tiny_checkpoint)]
    assert sources(CDT_MODELS=f"b={tiny_checkpoint}, a={DEFAULT_CHECKPOINT}") == [
        ("b", tiny_checkpoint), ("a", DEFAULT_CHECKPOINT)]  # in the given order: the first is the default
    (tmp_path / "zz").symlink_to(tiny_checkpoint)
    (tmp_path / "cdt-tiny").symlink_to(DEFAULT_CHECKPOINT)
    (tmp_path / "notes").mkdir()  # not a checkpoint: skipped
    assert sources(CDT_MODELS=str(tmp_path)) == [("cdt-tiny", tmp_path / "cdt-tiny"), ("zz", tmp_path / "zz")]
    for bad, message in ((f"a={tiny_checkpoint},{tiny_checkpoint}", "name=path"),
                         (f"a={tiny_checkpoint},a={DEFAULT_CHECKPOINT}", "once"),
                         (f"a b={tiny_checkpoint}", "model name")):
        with pytest.raises(SettingsError, match=message):
            sources(CDT_MODELS=bad)
    # CDT_MODELS replaces CDT_CHECKPOINT (which the image sets as its default).
    assert sources(CDT_MODELS=f"a={DEFAULT_CHECKPOINT}", CDT_CHECKPOINT=str(tiny_checkpoint)) == [
        ("a", DEFAULT_CHECKPOINT)]
    with pytest.raises(CheckpointMissing, match="'gone'"):
        sources(CDT_MODELS=f"gone={tmp_path / 'gone'}")
    with pytest.raises(CheckpointMissing, match="no checkpoint"):
        sources(CDT_MODELS=str(tmp_path / "notes"))


def test_chunks_are_whole_groups_of_the_models_frames():
    assert list(chunk_lengths(4)) == [8, 4]
    assert list(chunk_lengths(8)) == [8]
    assert list(chunk_lengths(16)) == [16]


def test_each_route_runs_the_model_it_names(two_models, hashes, tiny_checkpoint):
    clip = frames(9, 32, 40)
    tensor = frames_to_tensor(clip)  # the float input /v1/encode makes of these frames

    async def scenario(app):
        async with http_for(app) as http:
            models = (await http.get("/v1/models")).json()["models"]
            latents = {name: await http.post("/v1/encode", params={"model": name} if name else {},
                                             content=npy_bytes(clip), headers=NPY)
                       for name in ("cdt-tiny", "fresh", None)}
            decode = {(made, asked): await http.post("/v1/decode", params={"format": "npy", **asked_param},
                                                     content=latents[made].content, headers=SAFETENSORS)
                      for made in ("cdt-tiny", "fresh")
                      for asked, asked_param in (("same", {"model": made}), ("none", {}),
                                                 ("other", {"model": "fresh" if made == "cdt-tiny" else "cdt-tiny"}))}
            unknown = [await http.post(path, params={"model": "nope"}, content=body, headers=headers)
                       for path, body, headers in (("/v1/encode", npy_bytes(clip), NPY),
                                                   ("/v1/decode", latents["fresh"].content, SAFETENSORS),
                                                   ("/v1/frames", npy_bytes(clip), NPY),
                                                   ("/v1/diffusers/encode", b"\0" * 12, {}))]
            unknown.append(await http.post("/v1/sessions", json={"kind": "encode", "model": "nope"}))
            diffusers = {name: await http.post("/v1/diffusers/encode", content=tensor.numpy().tobytes(),
                                               params={"shape": list(tensor.shape), "dtype": "float32",
                                                       "model": name})
                         for name in ("cdt-tiny", "fresh")}
            metrics = (await http.get("/metrics")).text
        return models, latents, decode, unknown, diffusers, metrics

    settings = Settings(models=two_models)
    models, latents, decode, unknown, diffusers, metrics = run_app(settings, scenario)

    # /v1/models: both, the default first, each with its own identity and facts.
    assert [(m["name"], m["hash"], m["default"]) for m in models] == [
        ("cdt-tiny", hashes["cdt-tiny"], True), ("fresh", hashes["fresh"], False)]
    for card in models:
        assert card["preset"] == "tiny" and card["frames_rule"] == "1+4k" and card["dtype"] == "fp32"
        assert card["compression"] == {"time": 4, "space": 8, "latent_channels": 16, "label": "4x8x8", "ratio": 48.0}
        assert card["max_steps"] == settings.max_steps and card["weights_bytes"] == 4 * card["parameters"] > 0
        assert set(card["receptive_field"]) == {"encode_frames", "decode_base_latents", "decode_per_step_latents"}
    # Each latents file names the model that made it; no `model` is the default.
    files = {name: latents_from_bytes(r.content) for name, r in latents.items()}
    assert [(f.model_name, f.model_hash, f.time_factor) for f in files.values()] == [
        ("cdt-tiny", hashes["cdt-tiny"], 4), ("fresh", hashes["fresh"], 4), ("cdt-tiny", hashes["cdt-tiny"], 4)]
    torch.testing.assert_close(files[None].latents, files["cdt-tiny"].latents, rtol=0, atol=0)
    # Their own model (named, or found from the file when none is named) decodes them; the other refuses.
    for made in ("cdt-tiny", "fresh"):
        same, none, other = (decode[made, asked] for asked in ("same", "none", "other"))
        assert same.status_code == 200 and same.content == none.content
        assert np.load(io.BytesIO(same.content)).shape == (9, 32, 40, 3)
        assert other.status_code == 409 and other.json()["error"]["code"] == "model_mismatch"
        assert f"made by model {made}" in other.json()["error"]["message"]
    # The fresh model's latents are its own: those of the checkpoint encoded here, chunk by chunk
    # like the service (float rounding only: streaming's contract).
    model, identity = from_pretrained(tiny_checkpoint)
    local = encode_frames(model, identity.content_hash, [clip[:8], clip[8:]], 30.0, streamed=True)
    assert_float_close(files["fresh"].latents, local.latents)
    assert not torch.allclose(files["fresh"].latents, files["cdt-tiny"].latents, atol=1e-2)
    assert [(r.status_code, r.json()["error"]["code"]) for r in unknown] == [(404, "model_not_found")] * 5
    assert all(r.status_code == 200 for r in diffusers.values())
    assert diffusers["cdt-tiny"].content != diffusers["fresh"].content
    assert_float_close(np.frombuffer(diffusers["fresh"].content, np.float32).copy().reshape(local.latents.shape),
                       local.latents)
    # Metrics: frames, jobs and the model info per model.
    for name in ("cdt-tiny", "fresh"):
        assert metric_sum(metrics, "cdt_frames_processed_total", op="encode", model=name) >= 9
        assert metric_sum(metrics, "cdt_frames_processed_total", op="decode", model=name) == 2 * 9
        assert metric_sum(metrics, "cdt_compute_seconds_count", op="encode", model=name) >= 2
        assert metric_sum(metrics, "cdt_model_info", model=name, hash=hashes[name]) == 1


def test_sessions_stay_pinned_to_their_model(two_models, hashes, tiny_checkpoint, redis_prefix, tmp_path):
    """A session runs its model's weights on every chunk, on any replica serving them under any
    name; a replica that does not serve them refuses its chunks (409 `model_mismatch`)."""
    clip = frames(9, 32, 40, seed=3)
    (tmp_path / "clip.npy").write_bytes(npy_bytes(clip))
    shared = {"redis_url": SHARED_REDIS_URL, "session_key_prefix": redis_prefix}
    both = create_app(Settings(models=two_models, **shared))
    renamed = create_app(Settings(models=(f"other-name={tiny_checkpoint}",), **shared))
    default_only = create_app(Settings(checkpoint=DEFAULT_CHECKPOINT, **shared))

    async def scenario():
        async with both.router.lifespan_context(both), renamed.router.lifespan_context(renamed), \
                default_only.router.lifespan_context(default_only):
            async with http_for(both) as a, http_for(renamed) as b, http_for(default_only) as c:
                info = (await a.post("/v1/sessions", json={"kind": "encode", "model": "fresh"})).json()
                sid = info["id"]
                first = await a.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(clip[:5]), headers=NPY)
                refused = await c.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(clip[5:]), headers=NPY)
                moved = await b.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(clip[5:]), headers=NPY)
                finish = await b.post(f"/v1/sessions/{sid}/finish")
                whole = await a.post("/v1/encode", params={"model": "fresh"}, content=npy_bytes(clip), headers=NPY)
                default = (await a.post("/v1/sessions", json={"kind": "decode"})).json()
                async with AsyncClient("http://service", transport=httpx.ASGITransport(app=both),
                                       retry=NO_RETRY) as client:
                    streamed = await client.stream_encode(clip, chunk_frames=4, model="fresh")
                    decoded = await client.stream_decode(streamed)  # the file's model, found by its hash
                    with pytest.raises(NotFound, match="model_not_found"):
                        await client.stream_encode(clip, model="nope")
                    served = await client.encode_file(tmp_path / "clip.npy", model="fresh")
                metrics = (await a.get("/metrics")).text
        return info, first, refused, moved, finish, whole, default, streamed, decoded, served, metrics

    info, first, refused, moved, finish, whole, default, streamed, decoded, served, metrics = asyncio.run(scenario())
    assert (info["model"], info["model_hash"]) == ("fresh", hashes["fresh"])
    assert (default["model"], default["model_hash"]) == ("cdt-tiny", hashes["cdt-tiny"])
    assert first.status_code == 200 and moved.status_code == 200 and finish.status_code == 200
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_mismatch"
    assert "fresh" in refused.json()["error"]["message"]
    assert moved.headers["x-cdt-rebuild"] == "missing"  # the renamed replica rebuilt the stream of these weights
    session = torch.cat([latents_of(r.content) for r in (first, moved, finish)], dim=2)
    assert_float_close(session, latents_from_bytes(whole.content).latents)
    # The client's streamed latents file is the fresh model's, and decodes with it.
    item = latents_from_bytes(streamed)
    assert (item.model_name, item.model_hash, item.time_factor) == ("fresh", hashes["fresh"], 4)
    assert_float_close(item.latents, latents_from_bytes(whole.content).latents)
    assert decoded.shape == (9, 32, 40, 3)
    assert latents_from_bytes(served).model_name == "fresh"
    assert metric_sum(metrics, "cdt_compute_seconds_count", op="session_encode", model="fresh") >= 1
    assert metric_sum(metrics, "cdt_compute_seconds_count", op="session_decode", model="fresh") >= 1

