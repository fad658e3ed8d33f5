// Per-frame PSNR drawn on a canvas: each series as a line with dots or as rings (so a series equal to
// another stays visible over it), its clip PSNR as a dashed level, a cursor at the frame shown; a
// click reports the frame under the pointer.

const MARGIN = { left: 48, right: 14, top: 22, bottom: 30 };

function niceStep(span) {
  const raw = span / 5;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

export class PsnrPlot {
  constructor(canvas, onPick) {
    this.canvas = canvas;
    this.frames = 0;
    this.cursor = null;
    this.series = new Map();  // name -> {label, color, rings, values (null where not yet known), clip}
    canvas.addEventListener("click", (event) => {
      const frame = this.frameAt(event.offsetX);
      if (frame !== null) onPick(frame);
    });
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  reset(frames) {
    this.frames = frames;
    for (const name of this.series.keys()) delete this.canvas.dataset[name];
    this.series.clear();
    this.cursor = null;
    this.draw();
  }

  set(name, { label, color, rings = false }, values, clip = null) {
    this.series.set(name, { label, color, rings, values, clip });
    this.canvas.dataset[name] = JSON.stringify({ frames: values, clip });
    this.draw();
  }

  setCursor(frame) {
    if (frame !== this.cursor) {
      this.cursor = frame;
      this.draw();
    }
  }

  x(frame, width) {
    const inner = width - MARGIN.left - MARGIN.right;
    return MARGIN.left + (this.frames > 1 ? (frame / (this.frames - 1)) * inner : inner / 2);
  }

  frameAt(offsetX) {
    if (this.frames === 0) return null;
    const inner = this.canvas.clientWidth - MARGIN.left - MARGIN.right;
    const frame = Math.round(((offsetX - MARGIN.left) / inner) * (this.frames - 1));
    return Math.max(0, Math.min(this.frames - 1, frame));
  }

  draw() {
    const canvas = this.canvas;
    const scale = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    const g = canvas.getContext("2d");
    g.setTransform(scale, 0, 0, scale, 0, 0);
    g.clearRect(0, 0, width, height);
    const known = [...this.series.values()].flatMap((s) => [...s.values, s.clip]).filter((v) => v !== null);
    if (this.frames === 0 || known.length === 0) return;

    let low = Math.min(...known);
    let high = Math.max(...known);
    if (high - low < 1) [low, high] = [low - 0.5, high + 0.5];
    const step = niceStep(high - low);
    low = Math.floor(low / step) * step;
    high = Math.ceil(high / step) * step;
    const y = (db) => MARGIN.top + (1 - (db - low) / (high - low)) * (height - MARGIN.top - MARGIN.bottom);

    g.font = "12px system-ui, sans-serif";
    g.lineWidth = 1;
    g.strokeStyle = "#e3e7ee";
    g.fillStyle = "#5d6778";
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (let db = low; db <= high + step / 2; db += step) {
      g.beginPath();
      g.moveTo(MARGIN.left, y(db));
      g.lineTo(width - MARGIN.right, y(db));
      g.stroke();
      g.fillText(db.toFixed(step < 1 ? 1 : 0), MARGIN.left - 6, y(db));
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    const every = Math.max(1, Math.ceil(this.frames / 20));
    for (let f = 0; f < this.frames; f += every) g.fillText(String(f), this.x(f, width), height - MARGIN.bottom + 6);
    g.textAlign = "left";
    g.fillText("frame", width - MARGIN.right - 34, height - 14);

    if (this.cursor !== null) {
      g.strokeStyle = "#9aa3b2";
      g.beginPath();
      g.moveTo(this.x(this.cursor, width), MARGIN.top);
      g.lineTo(this.x(this.cursor, width), height - MARGIN.bottom);
      g.stroke();
    }

    let legendX = MARGIN.left + 4;
    for (const s of this.series.values()) {
      g.strokeStyle = s.color;
      g.fillStyle = s.color;
      g.lineWidth = 2;
      if (!s.rings) {
        g.beginPath();
        let drawing = false;
        s.values.forEach((v, f) => {
          if (v === null) {
            drawing = false;
            return;
          }
          if (drawing) g.lineTo(this.x(f, width), y(v));
          else g.moveTo(this.x(f, width), y(v));
          drawing = true;
        });
        g.stroke();
      }
      s.values.forEach((v, f) => {
        if (v === null) return;
        g.beginPath();
        g.arc(this.x(f, width), y(v), s.rings ? 5 : 2.5, 0, 2 * Math.PI);
        if (s.rings) g.stroke();
        else g.fill();
      });
      if (s.clip !== null) {
        g.setLineDash([5, 4]);
        g.lineWidth = 1;
        g.beginPath();
        g.moveTo(MARGIN.left, y(s.clip));
        g.lineTo(width - MARGIN.right, y(s.clip));
        g.stroke();
        g.setLineDash([]);
      }
      g.textBaseline = "middle";
      const text = s.clip === null ? s.label : `${s.label}: clip ${s.clip.toFixed(2)} dB`;
      g.fillRect(legendX, 8, 12, 3);
      g.fillText(text, legendX + 16, 10);
      legendX += g.measureText(text).width + 34;
    }
  }
}
