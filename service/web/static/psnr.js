// PSNR exactly as media/metrics.py defines it: uint8 RGB taken to [0,1], 10*log10(1/MSE) with the
// MSE over every pixel and channel, the MSE floored at 1e-10 and the result capped at 100 dB.
// A clip's PSNR comes from the MSE of the whole clip, not from the mean of its frames' PSNR.

export const PSNR_CAP = 100;
const MSE_FLOOR = 1e-10;

// Sum of squared differences in uint8 levels: an integer, exact in a double up to 2^53.
function sse(a, b, begin, end) {
  let total = 0;
  for (let i = begin; i < end; i++) {
    const d = a[i] - b[i];
    total += d * d;
  }
  return total;
}

export function psnrOf(sumSquares, values) {
  const mse = sumSquares / (255 * 255) / values;
  return Math.min(PSNR_CAP, 10 * Math.log10(1 / Math.max(mse, MSE_FLOOR)));
}

// Per-frame squared-error sums of `count` frames of `frameBytes` values each.
export function frameErrors(reference, test, frameBytes, count) {
  const sums = [];
  for (let f = 0; f < count; f++) sums.push(sse(reference, test, f * frameBytes, (f + 1) * frameBytes));
  return sums;
}

// {frames: per-frame PSNR, clip: the clip's PSNR} from per-frame squared-error sums.
export function psnrFromErrors(sums, frameBytes) {
  return {
    frames: sums.map((s) => psnrOf(s, frameBytes)),
    clip: psnrOf(sums.reduce((x, y) => x + y, 0), frameBytes * sums.length),
  };
}
