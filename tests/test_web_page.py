"""The web page at `/` driven in a real headless Chromium (Debian's chromium and
chromium-driver, through selenium) against a real `cdt serve` with the shipped checkpoint
and API keys on: a real clip is uploaded, both videos must play in sync, the PSNR the page
shows must be the one `/v1/encode` + `/v1/decode` and `media.metrics` give, the stream mode
must deliver every frame through sessions, and a wrong key must show the service's JSON
error. The screenshot in README.md (docs/web-page.png) is taken here: it is written there
with CDT_WRITE_SCREENSHOT=1, elsewhere into the test's temporary directory, so a test run
leaves the tree clean."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from media import psnr, read_video
from service.routes.page import STATIC_FILES
from tests.servers import REPO, Server, metric_sum

KEY = "web-page-key"
CLIP = "cotracker__bear.mp4"  # val split, 854x480 at 30 fps
FRAMES, SIZE, STEPS, CHUNK = 9, 96, 1, 4
MAX_FRAMES = 300  # not the default, so the page's bounds are seen to come from the settings
WAIT_S = 90  # a whole-clip run or a stream on 2 shared cores takes well under this
SCREENSHOT = REPO / "docs" / "web-page.png"
WRITE_SCREENSHOT = os.environ.get("CDT_WRITE_SCREENSHOT") == "1"
# Page and reference compute the PSNR of the same uint8 frames in float64; they differ only in
# summation order (relative error ~1e-16 of an MSE), far below this.
PSNR_TOLERANCE_DB = 1e-9
# Session chunks (4 frames) and the whole-clip path agree up to float rounding, which flips a uint8
# level here and there (measured: a few values a frame, ~1e-5 dB). 1e-3 dB is an MSE change of
# 0.023%, some tens of one-level flips in a frame of 49k values; a lost, doubled or misplaced
# chunk moves a frame's PSNR by tenths of a dB.
STREAM_TOLERANCE_DB = 1e-3


@pytest.fixture(scope="module")
def clip(shared_videos):
    return shared_videos / CLIP


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(REPO / "checkpoints" / "cdt-tiny", tmp_path_factory.mktemp("web") / "server.log",
                api_keys=KEY, max_frames=MAX_FRAMES) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(http, clip):
    """What the API gives for the page's inputs: frames as read by media (the service's
    reader), the reconstruction of /v1/encode + /v1/decode, and their PSNR by media.metrics."""
    data = clip.read_bytes()
    latents = http.post("/v1/encode", params={"frames": FRAMES, "size": SIZE}, content=data,
                        headers={"Content-Type": "video/mp4"})
    assert latents.status_code == 200, latents.text
    decoded = http.post("/v1/decode", params={"steps": STEPS, "seed": 0, "format": "npy"}, content=latents.content,
                        headers={"Content-Type": "application/x-safetensors"})
    assert decoded.status_code == 200, decoded.text
    original = read_video(clip, num_frames=FRAMES, size=SIZE).frames
    reconstruction = np.load(io.BytesIO(decoded.content))
    assert original.shape == reconstruction.shape
    return {"original": original, "reconstruction": reconstruction, "clip": psnr(original, reconstruction),
            "frames": [psnr(original[i:i + 1], reconstruction[i:i + 1]) for i in range(FRAMES)]}


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs Debian's packages)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500",
                     "--autoplay-policy=no-user-gesture-required", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    with webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options) as chrome:
        yield chrome


def wait_done(browser, action: str) -> None:
    WebDriverWait(browser, WAIT_S).until(lambda b: b.execute_script(
        "const s = document.getElementById('status').dataset;"
        "return s.action === arguments[0] && (s.state === 'done' || s.state === 'error');", action))
    state = browser.find_element(By.ID, "status").get_attribute("data-state")
    assert state == "done", browser.find_element(By.ID, "error").text


def open_page(browser, server, key: str) -> None:
    browser.get(server.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(key)
    for name, value in (("frames", FRAMES), ("size", SIZE), ("steps", STEPS), ("chunk", CHUNK)):
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))


@pytest.fixture(scope="module")
def page(browser, server, clip, reference):
    """The page after a whole-clip run on the clip (the reference runs first: one job at a time)."""
    open_page(browser, server, KEY)
    browser.find_element(By.ID, "file").send_keys(str(clip))
    browser.find_element(By.ID, "run").click()
    wait_done(browser, "run")
    return browser


def test_page_is_public_and_self_contained(server):
    """`/` needs no key and names only its own files; the API it calls does need one."""
    html = httpx.get(server.url + "/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert f'max="{MAX_FRAMES}"' in html.text and "$" not in html.text  # the server's CDT_MAX_FRAMES, filled in
    assert set(re.findall(r'(?:src|href)="static/([^"]+)"', html.text)) == {"page.css", "page.js"}
    assert "://" not in html.text  # nothing from another origin
    for name in STATIC_FILES:
        body = httpx.get(f"{server.url}/static/{name}")
        assert body.status_code == 200 and "://" not in body.text, name
    imported, pending = set(), ["page.js"]  # every module the page imports, transitively, is shipped
    while pending:
        imported.add(name := pending.pop())
        pending += [m for m in re.findall(r'from "\./([\w.]+)"', httpx.get(f"{server.url}/static/{name}").text)
                    if m not in imported]
    assert imported == {name for name in STATIC_FILES if name.endswith(".js")}
    assert httpx.post(server.url + "/v1/frames", content=b"x").json()["error"]["code"] == "missing_api_key"


def test_frames_endpoint_gives_what_the_encoder_sees(http, clip, reference, tmp_path):
    """/v1/frames returns the frames of the service's reader for the same options, and
    renders frames sent to it as an mp4 of the same size and length."""
    response = http.post("/v1/frames", params={"frames": FRAMES, "size": SIZE, "format": "npy"},
                         content=clip.read_bytes(), headers={"Content-Type": "video/mp4"})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), reference["original"])
    mp4 = http.post("/v1/frames", params={"format": "mp4", "fps": 30}, content=response.content,
                    headers={"Content-Type": "application/x-npy"})
    assert mp4.headers["content-type"] == "video/mp4"
    (tmp_path / "frames.mp4").write_bytes(mp4.content)
    assert read_video(tmp_path / "frames.mp4").frames.shape == reference["original"].shape


def test_both_videos_play_in_sync_and_psnr_matches_the_api(page, reference, clip):
    assert page.find_element(By.ID, "model").text.startswith("model cdt-tiny: tiny (")
    stats = {e.get_attribute("id"): e for e in page.find_elements(By.CSS_SELECTOR, "#stats dd")}
    shown = float(stats["stat-psnr"].get_attribute("data-db"))
    assert abs(shown - reference["clip"]) < PSNR_TOLERANCE_DB
    assert f"{reference['clip']:.2f} dB" in stats["stat-psnr"].text
    plotted = json.loads(page.find_element(By.ID, "plot").get_attribute("data-whole"))
    np.testing.assert_allclose(plotted["frames"], reference["frames"], rtol=0, atol=PSNR_TOLERANCE_DB)

    height, width = reference["original"].shape[1:3]
    latent_shape = [1, 16, 1 + -(-(FRAMES - 1) // 4), -(-height // 8), -(-width // 8)]  # frames and sides padded
    assert json.loads(stats["stat-shape"].get_attribute("data-shape")) == latent_shape
    assert float(stats["stat-encode"].get_attribute("data-ms")) > 0
    assert float(stats["stat-decode"].get_attribute("data-ms")) > 0
    assert int(stats["stat-size"].get_attribute("data-upload")) == clip.stat().st_size

    page.find_element(By.ID, "play").click()
    state = """return ['original', 'reconstruction'].map((id) => {
        const v = document.getElementById(id);
        return {t: v.currentTime, ready: v.readyState, error: v.error && v.error.message, paused: v.paused,
                w: v.videoWidth, h: v.videoHeight, duration: v.duration}; });"""
    WebDriverWait(page, 20).until(lambda b: all(v["t"] > 0.1 for v in b.execute_script(state)))
    first = page.execute_script(state)
    WebDriverWait(page, 20).until(lambda b: all(v["t"] != f["t"] for v, f in zip(b.execute_script(state), first)))
    for _ in range(5):  # while playing, the follower stays within a frame of the leader (on a loop's circle)
        original, reconstruction = page.execute_script(state)
        gap = abs(original["t"] - reconstruction["t"]) % original["duration"]
        assert min(gap, original["duration"] - gap) < 1 / 30
        time.sleep(0.1)
    for video in page.execute_script(state):
        assert video["error"] is None and not video["paused"] and video["ready"] >= 2  # HAVE_CURRENT_DATA
        assert (video["h"], video["w"]) == (height, width + width % 2)  # mp4 stores even sizes
        assert video["duration"] == pytest.approx(FRAMES / 30, abs=2 / 30)
    page.find_element(By.ID, "play").click()  # pause: the follower takes the leader's time
    WebDriverWait(page, 5).until(lambda b: all(v["paused"] for v in b.execute_script(state)))
    WebDriverWait(page, 5).until(lambda b: len({round(v["t"], 6) for v in b.execute_script(state)}) == 1)


def test_stream_mode_shows_every_chunk(page, reference, tmp_path):
    page.find_element(By.ID, "stream").click()
    wait_done(page, "stream")
    rows = page.find_elements(By.CSS_SELECTOR, "#chunks tbody tr")
    chunks = -(-FRAMES // CHUNK)
    assert [r.find_element(By.CLASS_NAME, "seq").text for r in rows] == [str(s) for s in range(chunks)] + ["finish"]
    frames_out = [r.find_element(By.CLASS_NAME, "frames-out").text for r in rows]
    assert sum(int(n) for n in frames_out if n.isdigit()) == FRAMES
    assert sum(len(r.find_elements(By.CSS_SELECTOR, ".thumbs canvas")) for r in rows) == FRAMES
    assert all(r.find_element(By.CLASS_NAME, "encode").text.endswith(" s") for r in rows)
    summary = page.find_element(By.ID, "stream-summary")
    assert int(summary.get_attribute("data-frames")) == FRAMES
    streamed = json.loads(page.find_element(By.ID, "plot").get_attribute("data-stream"))
    assert float(summary.get_attribute("data-db")) == streamed["clip"]
    np.testing.assert_allclose(streamed["frames"] + [streamed["clip"]], reference["frames"] + [reference["clip"]],
                               rtol=0, atol=STREAM_TOLERANCE_DB)

    page.execute_script("document.getElementById('original').pause()")
    width, height = page.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    shot = page.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    (SCREENSHOT if WRITE_SCREENSHOT else tmp_path / SCREENSHOT.name).write_bytes(base64.b64decode(shot["data"]))


def test_a_wrong_key_shows_the_json_error(browser, server, clip):
    """In a second tab, so a first one keeps its results."""
    browser.switch_to.new_window("tab")
    try:
        open_page(browser, server, "not-a-key")
        browser.find_element(By.ID, "file").send_keys(str(clip))
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state")
                                             == "error")
        panel = browser.find_element(By.ID, "error")
        assert panel.is_displayed() and panel.get_attribute("data-code") == "invalid_api_key"
        assert "403 invalid_api_key: the API key is not valid" in panel.text
        shown = json.loads(browser.find_element(By.ID, "error-body").text)
        assert shown == {"error": {"code": "invalid_api_key", "message": "the API key is not valid"}}
        WebDriverWait(browser, 5).until(lambda b: b.find_element(By.ID, "model").text
                                        == "model: the API key is not valid")
    finally:
        browser.close()
        browser.switch_to.window(browser.window_handles[0])


@pytest.fixture(scope="module")
def two_models_server(tmp_path_factory, tiny_checkpoint):
    """The shipped checkpoint (the default) beside a fresh tiny one."""
    models = f"cdt-tiny={REPO / 'checkpoints' / 'cdt-tiny'},fresh={tiny_checkpoint}"
    with Server(None, tmp_path_factory.mktemp("web-models") / "server.log", api_keys=KEY, models=models) as running:
        yield running


def test_the_model_selector_runs_the_chosen_model(browser, two_models_server, clip):
    """The selector lists the served models, the default first; a whole-clip run and a stream
    run on the chosen one (the server counts their frames and session jobs under its name)."""
    server = two_models_server
    browser.switch_to.new_window("tab")
    try:
        open_page(browser, server, KEY)
        browser.find_element(By.ID, "file").send_keys(str(clip))  # moves the focus: the key is sent
        select = browser.find_element(By.ID, "model-select")
        WebDriverWait(browser, 20).until(lambda b: select.is_enabled())
        assert [o.get_attribute("value") for o in Select(select).options] == ["cdt-tiny", "fresh"]
        assert Select(select).first_selected_option.text == "cdt-tiny (4x8x8)"
        Select(select).select_by_value("fresh")
        WebDriverWait(browser, 5).until(lambda b: b.find_element(By.ID, "model").text.startswith("model fresh: tiny ("))
        assert "frames 1+4k" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "run").click()
        wait_done(browser, "run")
        assert browser.find_element(By.ID, "stat-model").get_attribute("data-model") == "fresh"
        browser.find_element(By.ID, "stream").click()
        wait_done(browser, "stream")
    finally:
        browser.close()
        browser.switch_to.window(browser.window_handles[0])
    text = server.metrics()
    assert metric_sum(text, "cdt_frames_processed_total", op="encode", model="fresh") == FRAMES
    assert metric_sum(text, "cdt_frames_processed_total", op="decode", model="fresh") == FRAMES
    assert metric_sum(text, "cdt_frames_processed_total", model="cdt-tiny") == 0
    for op in ("session_encode", "session_decode"):
        assert metric_sum(text, "cdt_compute_seconds_count", op=op, model="fresh") >= 1
        assert metric_sum(text, "cdt_compute_seconds_count", op=op, model="cdt-tiny") == 0
