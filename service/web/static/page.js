// The page: upload a video, encode and decode it through the API, show the original (as the
// service encoded it) beside the reconstruction with per-frame PSNR, or stream it through sessions.
//
// The PSNR reference is the service's own view of the upload (POST /v1/frames: its container
// decoding, frame cut and resize), never the browser's decoding of the file, which differs in colour
// conversion and scaling; reconstructions come as uint8 safetensors, so the PSNR is that of the
// frames /v1/decode returns, computed as media/metrics.py does. Videos are rendered to mp4 by the
// service from those same frames.

import { ApiError, call, timed } from "./api.js";
import { PsnrPlot } from "./plot.js";
import { SyncedPlayer } from "./player.js";
import { frameErrors, psnrFromErrors, psnrOf } from "./psnr.js";
import { NPY, SAFETENSORS, frameSlice, npyBlob, readFrames, readSafetensors } from "./tensors.js";

const $ = (id) => document.getElementById(id);
const WHOLE = { label: "whole clip", color: "#2457c5" };
const STREAMED = { label: "streamed", color: "#d9731a", rings: true };
const SEED = 0;

const state = { file: null, original: null, originalKey: null, urls: [], models: [] };

const plot = new PsnrPlot($("plot"), (frame) => player.show(frame));
const player = new SyncedPlayer($("original"), $("reconstruction"),
  { play: $("play"), prev: $("prev"), next: $("next"), seek: $("seek"), label: $("frame-label") },
  (frame) => plot.setCursor(frame));

// --- formatting ---------------------------------------------------------------------------------

function bytes(n) {
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) [n, i] = [n / 1000, i + 1];
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;
const decibels = (db) => `${db.toFixed(2)} dB`;

// --- inputs, status, errors ---------------------------------------------------------------------

const key = () => $("api-key").value.trim();

function options() {
  for (const id of ["frames", "size", "steps", "chunk"]) {
    if (!$(id).reportValidity()) throw new Error(`${id}: ${$(id).validationMessage}`);
  }
  return { frames: Number($("frames").value), size: $("size").value === "" ? null : Number($("size").value),
           steps: Number($("steps").value), chunk: Number($("chunk").value) };
}

function status(text, phase) {
  $("status").textContent = text;
  if (phase) $("status").dataset.state = phase;
}

function showError(error) {
  const panel = $("error");
  panel.hidden = false;
  if (error instanceof ApiError) {
    $("error-summary").textContent = error.status
      ? `${error.status} ${error.code}: ${error.message}` : `${error.code}: ${error.message}`;
    $("error-body").textContent = typeof error.body === "string" ? error.body : JSON.stringify(error.body, null, 2);
  } else {
    $("error-summary").textContent = `the page failed: ${error.message}`;
    $("error-body").textContent = "";
  }
  panel.dataset.code = error.code || "page_error";
  status("failed", "error");
}

async function busy(action, work) {
  $("error").hidden = true;
  $("run").disabled = $("stream").disabled = true;
  $("status").dataset.action = action;
  status("working", "busy");
  try {
    await work();
    status("done", "done");
  } catch (error) {
    showError(error);
  } finally {
    $("run").disabled = $("stream").disabled = state.file === null;
  }
}

function chooseFile(file) {
  state.file = file;
  state.original = null;
  $("file-name").textContent = file ? `${file.name} (${bytes(file.size)})` : "no file chosen";
  $("run").disabled = $("stream").disabled = !file;
}

// The served model the selector names (its card from GET /v1/models).
const model = () => $("model-select").value;

function describeModel() {
  const card = state.models.find((m) => m.name === model());
  if (!card) return;
  $("model").textContent = `model ${card.name}: ${card.preset} (${card.id}) · ${card.dtype} on ${card.device} · `
    + `${card.compression.label} to ${card.compression.latent_channels} channels · frames ${card.frames_rule}`;
}

async function showModels() {
  const select = $("model-select");
  try {
    state.models = (await (await call("v1/models", { method: "GET", key: key() })).json()).models;
    const chosen = select.value;
    select.replaceChildren(...state.models.map((card) => {
      const option = new Option(`${card.name} (${card.compression.label})`, card.name);
      option.dataset.hash = card.hash;
      return option;
    }));
    if (state.models.some((card) => card.name === chosen)) select.value = chosen;
    select.disabled = false;
    describeModel();
  } catch (error) {
    $("model").textContent = error instanceof ApiError && error.status === 401
      ? "this service needs an API key" : `model: ${error.message}`;
  }
}

// --- the service's view of the upload -----------------------------------------------------------

function uploadType(file) {
  return file.type || "application/octet-stream";  // the service sniffs npy, safetensors, containers
}

// The frames the encoder sees for these options (cached per file and options).
async function originalFrames(opts) {
  const cacheKey = `${opts.frames}/${opts.size}`;
  if (state.original && state.originalKey === cacheKey) return state.original;
  status("reading the frames as the service sees them", "busy");
  const response = await call("v1/frames", { key: key(), body: state.file, contentType: uploadType(state.file),
                                             query: { frames: opts.frames, size: opts.size, format: "safetensors" } });
  state.original = readFrames(await response.arrayBuffer());
  state.originalKey = cacheKey;
  return state.original;
}

async function mp4Url(clip) {
  const response = await call("v1/frames", { key: key(), body: clip.buffer, contentType: SAFETENSORS,
                                             query: { format: "mp4" } });
  const url = URL.createObjectURL(await response.blob());
  state.urls.push(url);
  return url;
}

// --- encode and decode the whole clip -----------------------------------------------------------

function stat(label, id, text, data = {}) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.id = id;
  dd.textContent = text;
  Object.assign(dd.dataset, data);
  $("stats").append(dt, dd);
}

async function runWhole() {
  const opts = options();
  const original = await originalFrames(opts);
  status("encoding", "busy");
  const encoded = await timed("v1/encode", { key: key(), body: state.file, contentType: uploadType(state.file),
                                             query: { frames: opts.frames, size: opts.size, model: model() } });
  const latents = readSafetensors(encoded.buffer).tensors.latents;
  status("decoding", "busy");
  const decoded = await timed("v1/decode", { key: key(), body: encoded.buffer, contentType: SAFETENSORS,
                                             query: { steps: opts.steps, seed: SEED, format: "safetensors",
                                                      model: model() } });
  const reconstruction = readFrames(decoded.buffer);
  if (reconstruction.data.length !== original.data.length) {
    throw new Error(`the reconstruction has ${reconstruction.count} frames of ${reconstruction.height}x`
                    + `${reconstruction.width}; the original ${original.count} of ${original.height}x${original.width}`);
  }
  const frameBytes = original.height * original.width * 3;
  const psnr = psnrFromErrors(frameErrors(original.data, reconstruction.data, frameBytes, original.count), frameBytes);

  status("rendering the videos", "busy");
  state.urls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  const [originalUrl, reconstructionUrl] = [await mp4Url(original), await mp4Url(reconstruction)];

  $("result").hidden = $("plot-panel").hidden = false;
  $("stats").replaceChildren();
  const raw = original.data.length;
  stat("model", "stat-model", model(), { model: model() });
  stat("clip", "stat-clip", `${original.count} frames of ${original.width}×${original.height} at `
       + `${original.fps.toFixed(2)} fps`);
  stat("encode request", "stat-encode", `${seconds(encoded.ms)} (upload, decoding the container, the encoder)`,
       { ms: encoded.ms });
  stat("decode request", "stat-decode", `${seconds(decoded.ms)} (${opts.steps} DDIM step${opts.steps > 1 ? "s" : ""},`
       + ` seed ${SEED})`, { ms: decoded.ms });
  stat("latent shape", "stat-shape", `${latents.shape.join(" × ")} (${latents.dtype.toLowerCase()})`,
       { shape: JSON.stringify(latents.shape) });
  stat("size", "stat-size", `latents file ${bytes(encoded.buffer.byteLength)} against the upload's `
       + `${bytes(state.file.size)} (${(state.file.size / encoded.buffer.byteLength).toFixed(1)}× smaller) and the `
       + `raw frames' ${bytes(raw)} (${(raw / encoded.buffer.byteLength).toFixed(1)}×)`,
       { latents: encoded.buffer.byteLength, upload: state.file.size });
  stat("PSNR", "stat-psnr", `${decibels(psnr.clip)} over the clip; frames from ${decibels(Math.min(...psnr.frames))} `
       + `to ${decibels(Math.max(...psnr.frames))}`, { db: psnr.clip });

  plot.reset(original.count);
  plot.set("whole", WHOLE, psnr.frames, psnr.clip);
  player.load(originalUrl, reconstructionUrl, original.fps, original.count);
}

// --- stream through sessions --------------------------------------------------------------------

function thumbnail(clip, f) {
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [clip.width, clip.height];
  const image = new ImageData(clip.width, clip.height);
  const rgb = frameSlice(clip, f, f + 1);
  for (let p = 0, q = 0; p < rgb.length; p += 3, q += 4) {
    image.data[q] = rgb[p];
    image.data[q + 1] = rgb[p + 1];
    image.data[q + 2] = rgb[p + 2];
    image.data[q + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  canvas.title = `frame ${f}`;
  return canvas;
}

function chunkRow(seq, framesIn) {
  const row = $("chunk-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".seq").textContent = seq;
  row.querySelector(".frames-in").textContent = framesIn;
  $("chunks").tBodies[0].append(row);
  return row;
}

async function runStream() {
  const opts = options();
  const original = await originalFrames(opts);
  const frameBytes = original.height * original.width * 3;
  $("stream-panel").hidden = $("plot-panel").hidden = false;
  $("chunks").tBodies[0].replaceChildren();
  $("stream-summary").textContent = "";
  if (plot.frames !== original.count) plot.reset(original.count);
  const errors = new Array(original.count).fill(null);
  const framePsnr = () => errors.map((e) => (e === null ? null : psnrOf(e, frameBytes)));

  const sessions = [];
  const open = async (spec) => {
    const info = await (await call("v1/sessions", { key: key(), json: spec })).json();
    sessions.push(info.id);
    return info.id;
  };
  const started = performance.now();
  let decoder;
  let decodeSeq = 0;
  let framesOut = 0;
  // Latents from the encode session go on to the decode session; its frames are shown at once.
  const decodeLatents = async (row, encoded) => {
    const chunk = JSON.parse(encoded.response.headers.get("X-CDT-Chunk"));
    row.querySelector(".latents").textContent = chunk.latent_count;
    if (chunk.latent_count === 0) {
      row.querySelector(".decode").textContent = row.querySelector(".frames-out").textContent = "–";
      return;
    }
    const decoded = await timed(`v1/sessions/${decoder}/chunks/${decodeSeq++}`, {
      key: key(), body: encoded.buffer, contentType: SAFETENSORS, query: { format: "safetensors" } });
    const position = JSON.parse(decoded.response.headers.get("X-CDT-Chunk"));
    const clip = readFrames(decoded.buffer);
    const thumbs = row.querySelector(".thumbs");
    for (let i = 0; i < clip.count; i++) {
      const f = position.frame_start + i;
      errors[f] = frameErrors(frameSlice(original, f, f + 1), frameSlice(clip, i, i + 1), frameBytes, 1)[0];
      thumbs.append(thumbnail(clip, i));
    }
    framesOut += clip.count;
    row.querySelector(".decode").textContent = seconds(decoded.ms);
    row.querySelector(".frames-out").textContent = clip.count;
    const chunkErrors = errors.slice(position.frame_start, position.frame_start + clip.count);
    if (clip.count) row.querySelector(".psnr").textContent = decibels(psnrFromErrors(chunkErrors, frameBytes).clip);
    plot.set("stream", STREAMED, framePsnr());
  };

  try {
    const chosen = model() ? { model: model() } : {};
    const encoder = await open({ kind: "encode", ...chosen });
    decoder = await open({ kind: "decode", ...chosen, height: original.height, width: original.width, frames: original.count,
                           steps: opts.steps, seed: SEED, fps: original.fps });
    for (let seq = 0, start = 0; start < original.count; seq++, start += opts.chunk) {
      const end = Math.min(original.count, start + opts.chunk);
      status(`streaming frames ${start}–${end - 1}`, "busy");
      const row = chunkRow(seq, end - start);
      const body = npyBlob(frameSlice(original, start, end), [end - start, original.height, original.width, 3]);
      const encoded = await timed(`v1/sessions/${encoder}/chunks/${seq}`, { key: key(), body, contentType: NPY,
                                                                             query: { format: "safetensors" } });
      row.querySelector(".encode").textContent = seconds(encoded.ms);
      await decodeLatents(row, encoded);
    }
    status("finishing the sessions", "busy");
    const row = chunkRow("finish", 0);
    const tail = await timed(`v1/sessions/${encoder}/finish`, { key: key(), query: { format: "safetensors" } });
    row.querySelector(".encode").textContent = seconds(tail.ms);
    await decodeLatents(row, tail);
    await call(`v1/sessions/${decoder}/finish`, { key: key() });
  } finally {
    for (const id of sessions) call(`v1/sessions/${id}`, { key: key(), method: "DELETE" }).catch(() => {});
  }
  const clip = psnrFromErrors(errors.filter((e) => e !== null), frameBytes).clip;
  plot.set("stream", STREAMED, framePsnr(), clip);
  const summary = $("stream-summary");
  summary.textContent = `${framesOut} frames from ${$("chunks").tBodies[0].rows.length - 1} chunks and a finish, `
    + `${seconds(performance.now() - started)}, PSNR ${decibels(clip)}`;
  Object.assign(summary.dataset, { frames: framesOut, db: clip });
}

// --- wiring -------------------------------------------------------------------------------------

$("file").addEventListener("change", (event) => chooseFile(event.target.files[0] || null));
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) chooseFile(event.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") $("file").click();
});
$("api-key").addEventListener("change", showModels);
$("model-select").addEventListener("change", describeModel);
$("run").addEventListener("click", () => busy("run", runWhole));
$("stream").addEventListener("click", () => busy("stream", runStream));
showModels();
