// The service's tensor formats in the browser: safetensors read (latents, frames), npy written
// (frame chunks sent to a session).

export const NPY = "application/x-npy";
export const SAFETENSORS = "application/x-safetensors";

// Tensors by name, as {dtype, shape, bytes} views into `buffer`, and the string metadata.
export function readSafetensors(buffer) {
  const headerLength = Number(new DataView(buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const tensors = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [begin, end] = entry.data_offsets;
    tensors[name] = { dtype: entry.dtype, shape: entry.shape, bytes: new Uint8Array(buffer, 8 + headerLength + begin,
                                                                                    end - begin) };
  }
  return { tensors, metadata: header.__metadata__ || {} };
}

// A uint8 (T,H,W,3) clip from a safetensors frames file (tensor `frames`, metadata `fps`).
export function readFrames(buffer) {
  const { tensors, metadata } = readSafetensors(buffer);
  const frames = tensors.frames;
  if (!frames || frames.dtype !== "U8" || frames.shape.length !== 4 || frames.shape[3] !== 3) {
    throw new Error("the service sent no uint8 (T,H,W,3) tensor 'frames'");
  }
  const [count, height, width] = frames.shape;
  return { data: frames.bytes, count, height, width, fps: Number(metadata.fps) || 30, buffer };
}

// frames [start, end) of a clip.
export function frameSlice(clip, start, end) {
  const frameBytes = clip.height * clip.width * 3;
  return clip.data.subarray(start * frameBytes, end * frameBytes);
}

// An npy (format 1.0) body of uint8 `data` with `shape`.
export function npyBlob(data, shape) {
  let header = `{'descr': '|u1', 'fortran_order': False, 'shape': (${shape.join(", ")},), }`;
  header += " ".repeat((64 - ((10 + header.length + 1) % 64)) % 64) + "\n";  // 64-byte aligned data
  const prefix = new Uint8Array(10);
  prefix.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);  // \x93NUMPY v1.0
  new DataView(prefix.buffer).setUint16(8, header.length, true);
  return new Blob([prefix, new TextEncoder().encode(header), data], { type: NPY });
}
