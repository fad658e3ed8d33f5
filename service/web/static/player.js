// Two <video>s played as one: the original leads, the reconstruction follows its clock. The
// transport controls (play, frame steps, seek bar) drive the leader only.

export class SyncedPlayer {
  constructor(lead, follow, controls, onFrame) {
    Object.assign(this, { lead, follow, controls, onFrame, fps: 30, frames: 0, lastFrame: -1 });
    lead.addEventListener("play", () => {
      follow.currentTime = lead.currentTime;
      follow.play().catch(() => {});
      controls.play.textContent = "Pause";
      this.tick();
    });
    lead.addEventListener("pause", () => {
      follow.pause();
      follow.currentTime = lead.currentTime;
      controls.play.textContent = "Play";
    });
    lead.addEventListener("seeked", () => {
      follow.currentTime = lead.currentTime;
      this.update();
    });
    controls.play.addEventListener("click", () => (lead.paused ? lead.play().catch(() => {}) : lead.pause()));
    controls.prev.addEventListener("click", () => this.show(this.frame() - 1));
    controls.next.addEventListener("click", () => this.show(this.frame() + 1));
    controls.seek.addEventListener("input", () => this.show(Number(controls.seek.value)));
  }

  load(leadUrl, followUrl, fps, frames) {
    Object.assign(this, { fps, frames, lastFrame: -1 });
    this.lead.src = leadUrl;
    this.follow.src = followUrl;
    this.controls.seek.max = String(frames - 1);
    this.update();
  }

  frame() {
    return Math.max(0, Math.min(this.frames - 1, Math.floor(this.lead.currentTime * this.fps + 1e-6)));
  }

  // Seek both to the middle of frame `f`'s display interval (robust to rounding of timestamps).
  show(f) {
    this.lead.pause();
    this.lead.currentTime = (Math.max(0, Math.min(this.frames - 1, f)) + 0.5) / this.fps;
  }

  update() {
    const f = this.frame();
    this.controls.seek.value = String(f);
    this.controls.label.textContent = `frame ${f + 1} / ${this.frames}`;
    if (f !== this.lastFrame) {
      this.lastFrame = f;
      this.onFrame(f);
    }
  }

  tick() {
    if (this.lead.paused) return;
    // More than half a frame apart (a stall, or one looped first): put the follower back.
    if (!this.follow.seeking && Math.abs(this.follow.currentTime - this.lead.currentTime) > 0.5 / this.fps) {
      this.follow.currentTime = this.lead.currentTime;
    }
    this.update();
    requestAnimationFrame(() => this.tick());
  }
}
