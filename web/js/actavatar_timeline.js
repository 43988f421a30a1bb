// ActAvatar timeline phase editor: a DOM widget on the "ActAvatar Phase Prompt" node.
//
// The widget keeps the node's `phase_script` input (same name, same position), so its value lands in the workflow's
// widgets_values and in the API prompt as the engine's phase-script JSON string
//   {"version": 1, "base": "...", "negative": "...", "phases": [{"start": s, "end": e, "text": "..."}]}
// A value is kept verbatim until the user edits it (an invalid one is shown with its error, never rewritten); an edit
// writes PhaseScript.dumps() form (see phase_model.mjs).
//
// How it hooks into the ComfyUI frontend (1.49.x and the newest release are tested): beforeRegisterNodeDef sets
// `widgetType` on the phase_script input spec, and getCustomWidgets provides that widget type, so the frontend builds
// this widget instead of its textarea while the input socket stays STRING. Edits call the active workflow's changeTracker.checkState() so they join undo/redo.
//
// app/api come from window.comfyAPI (what /scripts/app.js re-exports) so the file works at any depth under
// WEB_DIRECTORY.

import * as PM from "./phase_model.mjs";

const app = window.comfyAPI?.app?.app;
const api = window.comfyAPI?.api?.api;

const NODE_CLASS = "ActAvatarPhasePrompt";
const INPUT_NAME = "phase_script";
const WIDGET_TYPE = "ACTAVATAR_PHASE_TIMELINE";
const SNAP_PROPERTY = "actavatar_snap";
// Colour slot of each phase (see PM.carryColours), kept in the workflow so undo/redo and reloading keep colours.
const COLOUR_PROPERTY = "actavatar_colours";
const SNAP_CHOICES = [0, 0.01, 0.05, 0.1, 0.2, 0.25, 0.5, 1];
const MIN_HEIGHT = 330;
const MIN_WIDTH = 520;
const MESSAGE_MS = 4000;
const PEAK_BUCKETS = 4000;
// Fill colours for phase blocks (PM.COLOUR_SLOTS of them); white text stays readable on all of them in dark and light
// themes.
const COLOURS = ["#2f6db0", "#b0562c", "#2f8a4c", "#8048b0", "#96701f", "#1f7f83", "#b03a6a", "#55657a"];

const TIMELINES = new WeakMap(); // node -> Timeline
const HINT = "Drag empty time to add · drag a block to move, its edges to resize · Del · ←/→ nudge";
const HINT_LONG =
  "Drag on empty time to add a phase. Drag a block to move it, drag its edges to resize it. Click a block to edit " +
  "its text. Del/Backspace deletes the selected phase, ←/→ nudge it by the snap step (Shift: ×10), ↑/↓ select " +
  "another phase, Enter edits its text, Esc deselects. Hold Alt while dragging to ignore snapping. Ctrl+Z undoes."

// ------------------------------------------------------------------------------------------ styles
const STYLE_ID = "actavatar-timeline-style";
const CSS = `
.aa-tl { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; overflow: hidden;
  font: 12px/1.3 Arial, sans-serif; color: var(--input-text, #ddd); }
.aa-tl * { box-sizing: border-box; }
.aa-tl textarea, .aa-tl input, .aa-tl select, .aa-tl button { font: inherit; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px; }
.aa-tl button { cursor: pointer; padding: 1px 8px; }
.aa-tl button:hover { border-color: var(--fg-color, #fff); }
.aa-row { display: flex; gap: 6px; align-items: flex-start; }
.aa-row > label { width: 58px; flex: none; padding-top: 3px; color: var(--descrip-text, #999); font-size: 11px; }
.aa-base { flex: 1; resize: none; height: 40px; padding: 3px 5px; }
.aa-neg { flex: 1; height: 22px; padding: 2px 5px; }
.aa-timeline { position: relative; flex: 1 1 auto; min-height: 92px; display: flex; flex-direction: column;
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px; background: var(--comfy-input-bg, #222);
  outline: none; user-select: none; touch-action: none; overflow: hidden; }
.aa-timeline:focus { border-color: var(--fg-color, #fff); }
.aa-ruler { position: relative; height: 17px; flex: none; border-bottom: 1px solid var(--border-color, #4e4e4e);
  font-size: 10px; color: var(--descrip-text, #999); overflow: hidden; }
.aa-tick { position: absolute; top: 0; height: 100%; border-left: 1px solid var(--border-color, #4e4e4e);
  padding-left: 2px; white-space: nowrap; pointer-events: none; }
.aa-tick.minor { height: 5px; top: auto; bottom: 0; }
.aa-track { position: relative; flex: 1 1 auto; cursor: crosshair; }
.aa-wave { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
.aa-outside { position: absolute; top: 0; bottom: 0; pointer-events: none;
  background: repeating-linear-gradient(45deg, transparent 0 6px, rgba(128,128,128,.28) 6px 12px); }
.aa-clipend { position: absolute; top: 0; bottom: 0; width: 0; border-left: 2px solid var(--error-text, #f44);
  pointer-events: none; }
.aa-block { position: absolute; top: 6px; bottom: 4px; min-width: 3px; border-radius: 4px; color: #fff;
  overflow: hidden; cursor: grab; border: 1px solid rgba(0,0,0,.35); }
.aa-block.sel { outline: 2px solid var(--fg-color, #fff); outline-offset: 1px; z-index: 2; }
.aa-block.bad { border: 2px dashed var(--error-text, #f44); }
.aa-block .aa-label, .aa-block .aa-times { position: absolute; left: 7px; right: 7px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; text-shadow: 0 1px 2px rgba(0,0,0,.7); pointer-events: none; }
.aa-block .aa-label { top: 3px; font-weight: 600; }
.aa-block .aa-times { top: 18px; font-size: 10px; opacity: .9; }
.aa-block .aa-label.empty { font-style: italic; font-weight: normal; opacity: .85; }
.aa-block .aa-reason { position: absolute; left: 7px; right: 7px; top: 32px; font-size: 10px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; pointer-events: none; font-weight: 600; color: #fff;
  text-shadow: 0 1px 2px #000; }
.aa-h { position: absolute; top: 0; bottom: 0; width: 7px; cursor: ew-resize; z-index: 1; }
.aa-h.s { left: 0; } .aa-h.e { right: 0; }
.aa-block.sel .aa-h { background: rgba(255,255,255,.28); }
.aa-ticks, .aa-pins { position: absolute; inset: 0; pointer-events: none; }
.aa-pin { position: absolute; top: 1px; width: 14px; height: 14px; margin-left: -7px; border-radius: 7px; z-index: 3;
  background: var(--error-text, #f44); color: #fff; font: bold 10px/14px Arial, sans-serif; text-align: center;
  pointer-events: none; box-shadow: 0 0 0 1px var(--comfy-input-bg, #222); }
.aa-ghost { position: absolute; top: 8px; bottom: 8px; border: 1px dashed var(--fg-color, #fff); border-radius: 4px;
  background: rgba(128,128,128,.3); pointer-events: none; }
.aa-ghost.short { border-color: var(--error-text, #f44); }
.aa-edit { display: flex; gap: 6px; align-items: center; min-height: 24px; flex: none; }
.aa-edit .aa-which { flex: none; color: var(--descrip-text, #999); font-size: 11px; }
.aa-edit .aa-text { flex: 1; height: 22px; padding: 2px 5px; min-width: 40px; }
.aa-hint { color: var(--descrip-text, #999); font-size: 11px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.aa-status { min-height: 15px; flex: none; font-size: 11px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; color: var(--descrip-text, #999); }
.aa-status.warn { color: var(--error-text, #f44); font-weight: 600; }
.aa-problems { flex: none; max-height: 64px; overflow: auto; margin: 0; padding: 0 0 0 14px; font-size: 11px;
  color: var(--error-text, #f44); }
.aa-problems:empty { display: none; }
.aa-problems li.later { color: var(--descrip-text, #999); }
.aa-bar { display: flex; gap: 8px; align-items: center; flex: none; font-size: 11px; color: var(--descrip-text, #999); }
.aa-bar .aa-clip { flex: 1; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.aa-bar select { height: 20px; padding: 0 2px; }
.aa-raw { flex: 1 1 auto; min-height: 70px; resize: none; padding: 4px; font: 11px/1.35 monospace; }
.aa-raw { display: none; }
.aa-tl.raw .aa-raw { display: block; }
.aa-tl.raw .aa-timeline, .aa-tl.raw .aa-edit, .aa-tl.invalid .aa-row { display: none; }
`;

function injectStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, className, props = {}) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  Object.assign(e, props);
  return e;
}

// ------------------------------------------------------------------------------------------ audio
const WAVES = new Map(); // url -> Promise<{duration, peaks: Float32Array [min0, max0, min1, max1, ...]}>

function viewURL(filename, subfolder = "", type = "input") {
  const q = `filename=${encodeURIComponent(filename)}&type=${encodeURIComponent(type)}&subfolder=${encodeURIComponent(subfolder)}`;
  return api?.apiURL ? api.apiURL(`/view?${q}`) : `/view?${q}`;
}

function loadWave(url) {
  if (!WAVES.has(url)) {
    const job = (async () => {
      const resp = await fetch(url);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const bytes = await resp.arrayBuffer();
      const Offline = window.OfflineAudioContext || window.webkitOfflineAudioContext;
      if (!Offline) throw new Error("this browser has no WebAudio");
      const decoded = await new Offline(1, 1, 44100).decodeAudioData(bytes);
      const n = decoded.length;
      const buckets = Math.max(1, Math.min(PEAK_BUCKETS, n));
      const peaks = new Float32Array(buckets * 2);
      const channels = [];
      for (let c = 0; c < decoded.numberOfChannels; c++) channels.push(decoded.getChannelData(c));
      for (let b = 0; b < buckets; b++) {
        const from = Math.floor((b * n) / buckets);
        const to = Math.max(from + 1, Math.floor(((b + 1) * n) / buckets));
        let lo = 0;
        let hi = 0;
        for (let i = from; i < to; i++) {
          let v = 0;
          for (const ch of channels) v += ch[i];
          v /= channels.length;
          if (v < lo) lo = v;
          if (v > hi) hi = v;
        }
        peaks[2 * b] = lo;
        peaks[2 * b + 1] = hi;
      }
      return { duration: decoded.duration, peaks };
    })();
    job.catch(() => WAVES.delete(url)); // let a later attempt retry
    WAVES.set(url, job);
  }
  return WAVES.get(url);
}

// ------------------------------------------------------------------------------------------ helpers
function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function upstreamNode(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null || !node.graph) return null;
  let origin = null;
  try {
    origin = node.getInputNode(slot);
  } catch {
    return null;
  }
  // Walk through legacy Reroute nodes.
  for (let hops = 0; origin && origin.type === "Reroute" && hops < 16; hops++) {
    try {
      origin = origin.getInputNode(0);
    } catch {
      return null;
    }
  }
  return origin;
}

function niceTickStep(span, widthPx) {
  const target = span / Math.max(1, widthPx / 70);
  for (const s of [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600]) if (s >= target) return s;
  return 1200;
}

function secs(t) {
  return `${PM.fmt(t)} s`;
}

function checkState() {
  try {
    const tracker =
      app?.extensionManager?.workflow?.activeWorkflow?.changeTracker ?? app?.workflowManager?.activeWorkflow?.changeTracker;
    tracker?.checkState?.();
  } catch (err) {
    console.debug("[ActAvatar] changeTracker.checkState failed", err);
  }
}

// ------------------------------------------------------------------------------------------ the widget
class Timeline {
  constructor(node, inputName, initialValue) {
    injectStyle();
    this.node = node;
    this.value = typeof initialValue === "string" ? initialValue : "";
    this.script = null;
    this.slots = []; // colour slot per phase of this.script
    this.parseError = null;
    this.selected = -1;
    this.drag = null;
    this.preview = null; // {script, ghost, reason} while dragging
    this.message = null; // {text, warn, until}
    this.audio = null; // {key, url, name, status: loading|ready|error, duration, peaks, error}
    this.runAudio = null; // {url, name} from the last execution
    this.pollKey = "";
    this.rawMode = false;
    this.build();
    this.parse();

    const self = this;
    this.widget = node.addDOMWidget(inputName, "actavatar_timeline", this.root, {
      getValue: () => self.value,
      setValue: (v) => self.setValue(v),
      getMinHeight: () => MIN_HEIGHT,
      onDraw: () => self.poll(),
      margin: 8,
    });
    this.widget.timeline = this;
    TIMELINES.set(node, this);
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => {
        const clip = this.clip();
        this.renderRuler(clip);
        this.drawWave(clip);
      });
      this.resizeObserver.observe(this.track);
    }
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      self.resizeObserver?.disconnect();
      return onRemoved?.apply(this, arguments);
    };
    this.render();
  }

  // ---------------------------------------------------------------------------------------- value
  setValue(v) {
    this.value = v === undefined || v === null ? "" : typeof v === "string" ? v : JSON.stringify(v);
    this.selected = -1;
    this.drag = null;
    this.preview = null;
    this.parse({ stored: true });
    this.render();
  }

  /** Parse this.value; colours carry over from the previous script (or, with `stored`, come from the workflow). */
  parse({ stored = false } = {}) {
    const prev = this.script;
    try {
      this.script = PM.parseScript(this.value);
      this.parseError = null;
    } catch (err) {
      this.script = null;
      this.parseError = err instanceof PM.PhaseScriptError ? err.message : String(err);
    }
    const saved = this.node.properties?.[COLOUR_PROPERTY];
    if (!this.script) this.slots = [];
    else if (stored && PM.validColours(this.script, saved)) this.slots = [...saved];
    else this.slots = PM.carryColours(prev, this.slots, this.script);
  }

  storeColours() {
    this.node.properties = this.node.properties || {};
    this.node.properties[COLOUR_PROPERTY] = [...this.slots];
  }

  /** Make `script` the widget value (the contract's JSON string) and tell ComfyUI. */
  commit(script, { select = this.selected, reason = null, track = true } = {}) {
    this.slots = PM.carryColours(this.script, this.slots, script);
    this.script = script;
    this.storeColours();
    this.parseError = null;
    this.value = PM.dumps(script);
    this.selected = select;
    if (reason) this.say(reason, true);
    this.widget?.callback?.(this.value);
    this.node.setDirtyCanvas?.(true, true);
    app?.graph?.setDirtyCanvas?.(true, true);
    if (track) checkState();
    this.render();
  }

  // ---------------------------------------------------------------------------------------- clip
  clip() {
    const fpsWidget = widgetValue(this.node, "fps");
    const fps = fpsWidget === undefined || fpsWidget === null || fpsWidget === "" ? PM.DEFAULT_FPS : Number(fpsWidget);
    const durationRaw = Number(widgetValue(this.node, "duration"));
    let duration = null;
    let source = "";
    const audioReady = this.audio?.status === "ready";
    if (Number.isFinite(durationRaw) && durationRaw > 0) {
      duration = durationRaw;
      source = "duration widget";
    } else if (audioReady) {
      duration = this.audio.duration;
      source = `audio '${this.audio.name}'`;
    }
    const script = this.preview?.script ?? this.script;
    const lastEnd = script ? Math.max(0, ...script.phases.map((p) => p.end)) : 0;
    let span = duration ?? Math.max(10, Math.ceil(lastEnd + 1));
    if (lastEnd > span) span = lastEnd * 1.05;
    const audioEnd = audioReady ? this.audio.duration : null;
    if (audioEnd && audioEnd > span) span = audioEnd;
    return { duration, fps, span, source, end: duration ?? span, audioEnd };
  }

  get step() {
    const v = Number(this.node.properties?.[SNAP_PROPERTY]);
    return Number.isFinite(v) && v >= 0 ? v : PM.DEFAULT_STEP;
  }

  ctx(e) {
    const c = this.clip();
    const step = e?.altKey ? 0 : this.step;
    return { end: c.end, step, minLength: step > 0 ? step : 0.01 };
  }

  // ---------------------------------------------------------------------------------------- DOM
  build() {
    const root = (this.root = el("div", "aa-tl"));
    root.dataset.actavatar = "timeline";

    const baseRow = el("div", "aa-row");
    baseRow.append(el("label", "", { textContent: "Base" }));
    this.baseInput = el("textarea", "aa-base", { placeholder: "Who is talking and where, e.g. 'A woman in a red blazer talks to the camera'", spellcheck: false });
    baseRow.append(this.baseInput);
    const negRow = el("div", "aa-row");
    negRow.append(el("label", "", { textContent: "Negative" }));
    this.negInput = el("input", "aa-neg", { type: "text", placeholder: "(optional) what to avoid", spellcheck: false });
    negRow.append(this.negInput);

    this.timeline = el("div", "aa-timeline", { tabIndex: 0 });
    this.timeline.setAttribute("role", "application");
    this.timeline.setAttribute("aria-label", "Phase timeline");
    this.ruler = el("div", "aa-ruler");
    this.ticks = el("div", "aa-ticks");
    this.pins = el("div", "aa-pins");
    this.ruler.append(this.ticks, this.pins);
    this.track = el("div", "aa-track");
    this.wave = el("canvas", "aa-wave");
    this.layer = el("div", "aa-layer");
    this.track.append(this.wave, this.layer);
    this.timeline.append(this.ruler, this.track);

    this.status = el("div", "aa-status");
    this.edit = el("div", "aa-edit");
    this.which = el("span", "aa-which");
    this.textInput = el("input", "aa-text", { type: "text", placeholder: "What happens in this phase, e.g. 'waves with the right hand'", spellcheck: false });
    this.deleteButton = el("button", "aa-delete", { type: "button", textContent: "Delete", title: "Delete this phase (Del)" });
    this.hint = el("span", "aa-hint", { textContent: HINT, title: HINT_LONG });
    this.edit.append(this.which, this.textInput, this.deleteButton, this.hint);

    this.problemList = el("ul", "aa-problems");

    const bar = el("div", "aa-bar");
    this.clipInfo = el("span", "aa-clip");
    const snapLabel = el("label", "", { textContent: "Snap " });
    this.snapSelect = el("select", "aa-snap", { title: "Snap phase edges to this step (hold Alt while dragging to ignore it)" });
    for (const s of SNAP_CHOICES) this.snapSelect.append(el("option", "", { value: String(s), textContent: s ? `${s} s` : "off" }));
    snapLabel.append(this.snapSelect);
    this.rawButton = el("button", "aa-rawbtn", { type: "button", textContent: "JSON", title: "Show or edit the phase script as text" });
    bar.append(this.clipInfo, snapLabel, this.rawButton);

    this.raw = el("textarea", "aa-raw", { spellcheck: false });

    root.append(baseRow, negRow, this.timeline, this.edit, this.status, this.problemList, this.raw, bar);
    this.bindEvents();
  }

  bindEvents() {
    const stop = (e) => e.stopPropagation();
    // Text fields: update the value as the user types; record one undo step when the field is committed.
    this.baseInput.addEventListener("input", () => {
      if (this.script) this.commit(PM.setBase(this.script, this.baseInput.value), { track: false });
    });
    this.negInput.addEventListener("input", () => {
      if (this.script) this.commit(PM.setNegative(this.script, this.negInput.value), { track: false });
    });
    this.textInput.addEventListener("input", () => {
      if (this.script && this.selected >= 0) {
        this.commit(PM.setPhaseText(this.script, this.selected, this.textInput.value).script, { track: false });
      }
    });
    for (const input of [this.baseInput, this.negInput, this.textInput, this.raw]) {
      input.addEventListener("change", () => checkState());
      input.addEventListener("wheel", stop, { passive: true });
    }
    this.textInput.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === "Escape") {
        e.preventDefault();
        this.timeline.focus({ preventScroll: true });
        checkState();
      }
    });
    this.raw.addEventListener("input", () => {
      // Raw text is kept exactly as typed; the timeline follows when it parses. The text view stays open while
      // the user works in it ("Timeline" closes it).
      this.rawMode = true;
      this.value = this.raw.value;
      this.parse();
      if (this.script) this.storeColours();
      this.widget?.callback?.(this.value);
      this.node.setDirtyCanvas?.(true, true);
      this.render({ keepRaw: true });
    });
    this.deleteButton.addEventListener("click", () => this.deleteSelected());
    this.rawButton.addEventListener("click", () => {
      this.rawMode = !this.rawMode;
      this.render();
    });
    this.snapSelect.addEventListener("change", () => {
      this.node.properties = this.node.properties || {};
      this.node.properties[SNAP_PROPERTY] = Number(this.snapSelect.value);
      checkState();
      this.render();
    });

    const t = this.track;
    t.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    t.addEventListener("pointermove", (e) => this.onPointerMove(e));
    t.addEventListener("pointerup", (e) => this.onPointerUp(e));
    t.addEventListener("pointercancel", () => this.cancelDrag());
    t.addEventListener("lostpointercapture", () => {
      if (this.drag) this.onPointerUp(null);
    });
    this.timeline.addEventListener("keydown", (e) => this.onKeyDown(e));
    // Follow duration/fps/audio changes before any interaction, even where the canvas does not draw the node.
    this.root.addEventListener("pointerenter", () => this.poll());
    // The canvas keeps zooming and panning over the widget.
    this.root.addEventListener(
      "wheel",
      (e) => {
        if (e.target === this.raw || e.target === this.baseInput || e.target === this.problemList) return;
        e.preventDefault();
        app?.canvas?.processMouseWheel?.(e);
      },
      { passive: false },
    );
  }

  timeAt(e) {
    const rect = this.track.getBoundingClientRect();
    const frac = rect.width > 0 ? (e.clientX - rect.left) / rect.width : 0;
    return frac * this.clip().span;
  }

  onPointerDown(e) {
    if (e.button === 1) {
      app?.canvas?.processMouseDown?.(e); // middle button pans the canvas, like ComfyUI's own text widgets
      return;
    }
    if (e.button !== 0 || !this.script) return;
    e.preventDefault();
    e.stopPropagation();
    this.timeline.focus({ preventScroll: true });
    const t = this.timeAt(e);
    const block = e.target.closest?.(".aa-block");
    const handle = e.target.closest?.(".aa-h");
    let mode = "create";
    let index = -1;
    if (block) {
      index = Number(block.dataset.index);
      mode = handle ? (handle.classList.contains("s") ? "start" : "end") : "move";
      this.selected = index;
    } else {
      this.selected = -1;
    }
    this.drag = { mode, index, anchor: t, x0: e.clientX, moved: false, pointerId: e.pointerId };
    try {
      this.track.setPointerCapture(e.pointerId);
    } catch {
      /* capture is optional */
    }
    if (block) this.track.style.cursor = mode === "move" ? "grabbing" : "ew-resize";
    this.render();
  }

  onPointerMove(e) {
    const d = this.drag;
    if (!d) {
      if ((e.buttons & 4) === 4) app?.canvas?.processMouseMove?.(e);
      return;
    }
    e.preventDefault();
    e.stopPropagation();
    if (!d.moved && Math.abs(e.clientX - d.x0) < 3) return;
    d.moved = true;
    const t = this.timeAt(e);
    const ctx = this.ctx(e);
    const base = this.script;
    if (d.mode === "create") {
      const span = PM.createSpan(base, d.anchor, t, ctx);
      this.preview = { script: base, ghost: span, reason: span.reason };
    } else if (d.mode === "move") {
      const r = PM.movePhase(base, d.index, t - d.anchor, ctx);
      this.preview = { script: r.script, index: r.index, reason: r.reason };
    } else {
      const r = PM.resizePhase(base, d.index, d.mode, t, ctx);
      this.preview = { script: r.script, index: r.index, reason: r.reason };
    }
    if (this.preview.reason) this.say(this.preview.reason, true);
    this.render();
  }

  onPointerUp(e) {
    const d = this.drag;
    if (!d) {
      if (e && e.button === 1) app?.canvas?.processMouseUp?.(e);
      return;
    }
    e?.preventDefault();
    e?.stopPropagation();
    this.drag = null;
    this.track.style.cursor = "";
    try {
      this.track.releasePointerCapture(d.pointerId);
    } catch {
      /* already released */
    }
    const preview = this.preview;
    this.preview = null;
    if (!d.moved || !preview) {
      this.render();
      return;
    }
    if (d.mode === "create") {
      const g = preview.ghost;
      if (g.start === null || g.tooShort) {
        if (g.tooShort) this.say(`A phase must be at least ${secs(this.ctx(e).minLength)} long; drag further.`, true);
        this.render();
        return;
      }
      const r = PM.addPhase(this.script, g.start, g.end, "", this.ctx(e));
      if (r.index < 0) {
        this.say(r.reason, true);
        this.render();
        return;
      }
      this.commit(r.script, { select: r.index, reason: g.reason });
      this.textInput.focus({ preventScroll: true }); // type the action right away
      return;
    }
    if (PM.dumps(preview.script) !== PM.dumps(this.script)) {
      this.commit(preview.script, { select: preview.index, reason: preview.reason });
    } else {
      this.render();
    }
  }

  cancelDrag() {
    this.drag = null;
    this.preview = null;
    this.track.style.cursor = "";
    this.render();
  }

  onKeyDown(e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return; // Ctrl+Z / Ctrl+Y reach ComfyUI's undo
    if (!this.script) {
      // Never let Delete/Backspace on the timeline reach LiteGraph, which would delete the selected node.
      if (e.key === "Delete" || e.key === "Backspace") {
        e.preventDefault();
        e.stopPropagation();
      }
      return;
    }
    const i = this.selected;
    let handled = true;
    if ((e.key === "Delete" || e.key === "Backspace") && i >= 0) {
      this.deleteSelected();
    } else if ((e.key === "ArrowLeft" || e.key === "ArrowRight") && i >= 0) {
      const r = PM.nudgePhase(this.script, i, e.key === "ArrowRight" ? 1 : -1, this.ctx(e), e.shiftKey ? 10 : 1);
      if (r.reason) this.say(r.reason, true);
      if (PM.dumps(r.script) !== this.value) this.commit(r.script, { select: r.index });
      else this.render();
    } else if ((e.key === "ArrowUp" || e.key === "ArrowDown") && this.script.phases.length) {
      const n = this.script.phases.length;
      this.selected = i < 0 ? 0 : (i + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
      this.render();
    } else if (e.key === "Enter" && i >= 0) {
      this.textInput.focus({ preventScroll: true });
    } else if (e.key === "Escape" && i >= 0) {
      this.selected = -1;
      this.render();
    } else if (e.key === "Delete" || e.key === "Backspace") {
      // Nothing selected: swallow the key so LiteGraph does not delete the node under the cursor.
    } else {
      handled = false;
    }
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  deleteSelected() {
    if (!this.script || this.selected < 0) return;
    const message = PM.deletedMessage(this.selected);
    const r = PM.deletePhase(this.script, this.selected);
    this.commit(r.script, { select: -1 });
    this.say(message, false);
    this.timeline.focus({ preventScroll: true });
  }

  say(text, warn = false) {
    this.message = { text, warn, until: Date.now() + MESSAGE_MS };
    clearTimeout(this.messageTimer);
    this.messageTimer = setTimeout(() => this.renderStatus(), MESSAGE_MS + 50);
    this.renderStatus();
  }

  // ---------------------------------------------------------------------------------------- execution & polling
  onExecuted(message) {
    const item = message?.audio?.[0] ?? message?.actavatar_audio?.[0];
    if (item?.filename) {
      this.runAudio = { url: viewURL(item.filename, item.subfolder || "", item.type || "output"), name: item.filename };
      this.pollKey = "";
      this.poll();
    }
  }

  /** The audio the node knows: a connected LoadAudio's file, else the audio of the last run, else none. */
  audioSource() {
    const origin = upstreamNode(this.node, "audio");
    if (!origin) return null;
    const file = origin.widgets?.find((w) => w.name === "audio")?.value;
    if (typeof file === "string" && file && (origin.comfyClass === "LoadAudio" || origin.type === "LoadAudio")) {
      const cut = file.lastIndexOf("/");
      const name = cut < 0 ? file : file.slice(cut + 1);
      return { key: `input:${file}`, url: viewURL(name, cut < 0 ? "" : file.slice(0, cut), "input"), name };
    }
    if (this.runAudio) return { key: `run:${this.runAudio.url}`, ...this.runAudio };
    return { key: `pending:${origin.id}`, url: null, name: origin.title || origin.type };
  }

  /** Called whenever the node is drawn: follow duration/fps/audio/theme changes cheaply. */
  poll() {
    const id = String(this.node.id);
    if (this.root.dataset.nodeId !== id) this.root.dataset.nodeId = id; // lets tests and tools find a node's timeline
    const src = this.audioSource();
    const theme = document.documentElement.style.getPropertyValue("--fg-color");
    const zoom = Math.round((app?.canvas?.ds?.scale || 1) * 20); // sharper waveform when zoomed in
    const key = [widgetValue(this.node, "duration"), widgetValue(this.node, "fps"), src?.key ?? "", theme, zoom].join("|");
    if (key === this.pollKey) return;
    this.pollKey = key;
    if ((src?.key ?? "") !== (this.audio?.key ?? "")) this.loadAudio(src);
    this.render();
  }

  loadAudio(src) {
    if (!src) {
      this.audio = null;
      return;
    }
    if (!src.url) {
      this.audio = { key: src.key, status: "pending", name: src.name };
      return;
    }
    const audio = (this.audio = { key: src.key, url: src.url, name: src.name, status: "loading" });
    loadWave(src.url).then(
      (wave) => {
        if (this.audio !== audio) return;
        Object.assign(audio, { status: "ready", duration: wave.duration, peaks: wave.peaks });
        this.render();
      },
      (err) => {
        if (this.audio !== audio) return;
        Object.assign(audio, { status: "error", error: String(err?.message || err) });
        this.render();
      },
    );
  }

  // ---------------------------------------------------------------------------------------- rendering
  render({ keepRaw = false } = {}) {
    if (!this.root) return;
    const clip = this.clip();
    const script = this.preview?.script ?? this.script;
    this.root.classList.toggle("raw", this.rawMode || !!this.parseError);
    this.root.classList.toggle("invalid", !!this.parseError);

    // text fields (never overwrite the field being typed in)
    const active = document.activeElement;
    if (active !== this.baseInput) this.baseInput.value = this.script ? this.script.base : "";
    if (active !== this.negInput) this.negInput.value = this.script ? this.script.negative : "";
    this.baseInput.disabled = this.negInput.disabled = !this.script;
    if (!keepRaw && active !== this.raw) this.raw.value = this.value;

    // validation against the engine's rules
    const issues = script ? PM.validate(script, { duration: clip.duration, fps: clip.fps, all: true }) : [];
    const byPhase = new Map();
    for (const issue of issues) for (const i of issue.phases) if (!byPhase.has(i)) byPhase.set(i, issue);

    this.renderRuler(clip);
    this.renderBlocks(script, clip, byPhase);
    this.renderEditor(script, byPhase);
    this.renderProblems(issues);
    this.renderStatus();
    this.renderBar(clip);
    this.drawWave(clip);
  }

  renderRuler(clip) {
    const width = this.track.clientWidth || 400;
    this.track.dataset.span = String(clip.span); // seconds across the track (tests and tooling read it)
    const key = `${clip.span}|${width}`;
    if (key === this.rulerKey) return; // nothing to redo while dragging
    this.rulerKey = key;
    const step = niceTickStep(clip.span, width);
    const minor = step / 5;
    const frag = document.createDocumentFragment();
    const count = Math.min(400, Math.floor(clip.span / minor + 1e-9));
    for (let k = 0; k <= count; k++) {
      const t = k * minor;
      const major = Math.abs(t / step - Math.round(t / step)) < 1e-6;
      const tick = el("div", major ? "aa-tick" : "aa-tick minor");
      tick.style.left = `${(t / clip.span) * 100}%`;
      if (major) tick.textContent = `${PM.fmt(t)}s`;
      frag.append(tick);
    }
    this.ticks.replaceChildren(frag);
  }

  renderBlocks(script, clip, byPhase) {
    const frag = document.createDocumentFragment();
    const pct = (t) => `${(Math.max(0, t) / clip.span) * 100}%`;
    if (clip.duration !== null && clip.duration < clip.span) {
      const out = el("div", "aa-outside", { title: `Beyond the clip (${secs(clip.duration)})` });
      out.style.left = pct(clip.duration);
      out.style.right = "0";
      const line = el("div", "aa-clipend");
      line.style.left = pct(clip.duration);
      frag.append(out, line);
    }
    if (!script) {
      this.layer.replaceChildren(frag);
      this.pins.replaceChildren();
      return;
    }
    const selected = this.preview?.index ?? this.selected;
    const slots = script === this.script ? this.slots : PM.carryColours(this.script, this.slots, script);
    const pins = [];
    script.phases.forEach((p, i) => {
      const block = el("div", "aa-block");
      block.dataset.index = String(i);
      const left = Math.max(0, Math.min(p.start, p.end));
      block.style.left = pct(left);
      block.style.width = `${(Math.max(0, Math.abs(p.end - p.start)) / clip.span) * 100}%`;
      // Solid where the label is, see-through over the waveform lane (the lower half of the track).
      block.dataset.colour = String(slots[i]);
      const colour = COLOURS[slots[i] % COLOURS.length];
      block.style.background = `linear-gradient(to bottom, ${colour} 0 50%, ${colour}66 50% 100%)`;
      if (i === selected) block.classList.add("sel");
      const label = el("span", "aa-label");
      const text = PM.pyStrip(p.text);
      label.textContent = text || "(no text)";
      if (!text) label.classList.add("empty");
      const times = el("span", "aa-times", { textContent: `${PM.fmt(p.start)}–${PM.fmt(p.end)} s` });
      block.append(el("div", "aa-h s"), label, times, el("div", "aa-h e"));
      const issue = byPhase.get(i);
      block.title = `Phase ${i + 1}: ${PM.fmt(p.start)}–${PM.fmt(p.end)} s\n${p.text || "(no text)"}`;
      if (issue) {
        // A pin above the block's middle stays visible even when the block is a sliver.
        const pin = el("div", "aa-pin", { textContent: "!" });
        pin.style.left = pct((p.start + p.end) / 2);
        pin.dataset.index = String(i);
        pins.push(pin);
        block.classList.add("bad");
        block.dataset.problem = issue.kind;
        block.append(el("span", "aa-reason", { textContent: shortReason(issue) }));
        block.title += `\n⚠ ${issue.message}`;
      }
      frag.append(block);
    });
    this.pins.replaceChildren(...pins);
    const g = this.preview?.ghost;
    if (g && g.start !== null) {
      const ghost = el("div", g.tooShort ? "aa-ghost short" : "aa-ghost");
      ghost.style.left = pct(g.start);
      ghost.style.width = `${((g.end - g.start) / clip.span) * 100}%`;
      frag.append(ghost);
    }
    this.layer.replaceChildren(frag);
  }

  renderEditor(script, byPhase) {
    const i = this.preview?.index ?? this.selected;
    const p = script && i >= 0 ? script.phases[i] : null;
    const show = !!p;
    this.which.style.display = this.textInput.style.display = this.deleteButton.style.display = show ? "" : "none";
    this.hint.style.display = show ? "none" : "";
    this.hint.textContent = HINT;
    if (!p) return;
    this.which.textContent = `Phase ${i + 1} · ${PM.fmt(p.start)}–${PM.fmt(p.end)} s`;
    if (document.activeElement !== this.textInput) this.textInput.value = p.text;
    this.textInput.style.borderColor = byPhase.get(i) ? "var(--error-text, #f44)" : "";
  }

  renderProblems(issues) {
    const frag = document.createDocumentFragment();
    if (this.parseError) {
      frag.append(el("li", "", { textContent: this.parseError }));
    } else {
      for (const issue of issues) {
        const li = el("li", issue.deferred ? "later" : "", { textContent: issue.message });
        if (issue.deferred) li.title = "The engine reports this once the problems above are fixed.";
        frag.append(li);
      }
    }
    this.problemList.replaceChildren(frag);
  }

  renderStatus() {
    const m = this.message;
    if (m && Date.now() < m.until) {
      this.status.textContent = m.text;
      this.status.classList.toggle("warn", !!m.warn);
      return;
    }
    this.message = null;
    this.status.classList.remove("warn");
    const script = this.script;
    if (this.parseError) {
      this.status.textContent = "Not shown on the timeline: kept exactly as it is until you edit it below.";
      this.status.classList.add("warn");
    } else if (!script) this.status.textContent = "";
    else if (!script.phases.length) this.status.textContent = "No phases yet: drag across the timeline to add one.";
    else {
      const issues = PM.problems(script, this.clip().duration, this.clip().fps);
      this.status.textContent = issues.length
        ? `${script.phases.length} phase(s) · the engine would reject this script (see below).`
        : `${script.phases.length} phase(s) · ready to queue.`;
    }
  }

  renderBar(clip) {
    let text;
    if (clip.duration !== null) text = `Clip ${secs(clip.duration)} (${clip.source})`;
    else text = "Duration unknown: set 'duration' or connect a LoadAudio";
    const a = this.audio;
    if (a?.status === "loading") text += ` · loading audio '${a.name}'…`;
    else if (a?.status === "error") text += ` · cannot read audio '${a.name}': ${a.error}`;
    else if (a?.status === "pending") text += ` · waveform after the first run (audio from ${a.name})`;
    else if (a?.status === "ready" && clip.source !== `audio '${a.name}'`) text += ` · audio '${a.name}' ${secs(a.duration)}`;
    text += ` · ${PM.fmt(clip.fps)} fps`;
    this.clipInfo.textContent = text;
    this.clipInfo.title = text;
    const step = String(this.step);
    if (![...this.snapSelect.options].some((o) => o.value === step)) {
      this.snapSelect.append(el("option", "", { value: step, textContent: `${step} s` }));
    }
    this.snapSelect.value = step;
    this.rawButton.textContent = this.rawMode ? "Timeline" : "JSON";
    this.rawButton.style.display = this.parseError ? "none" : "";
  }

  drawWave(clip = this.clip()) {
    const canvas = this.wave;
    const w = this.track.clientWidth;
    const h = this.track.clientHeight;
    if (!w || !h) return;
    const dpr = Math.min(3, (window.devicePixelRatio || 1) * Math.max(1, app?.canvas?.ds?.scale || 1));
    const W = Math.round(w * dpr);
    const H = Math.round(h * dpr);
    const a = this.audio;
    const theme = document.documentElement.style.getPropertyValue("--fg-color");
    const key = [W, H, clip.span, a?.key, a?.status, theme].join("|");
    if (key === this.waveKey) return; // unchanged: keep the pixels
    this.waveKey = key;
    if (canvas.width !== W || canvas.height !== H) {
      canvas.width = W;
      canvas.height = H;
    }
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, W, H);
    if (a?.status !== "ready" || !a.peaks) return;
    const fg = getComputedStyle(this.root).getPropertyValue("--fg-color").trim() || "#888";
    g.fillStyle = fg;
    g.globalAlpha = 0.6;
    const buckets = a.peaks.length / 2;
    const audioW = Math.min(W, (a.duration / clip.span) * W);
    // The waveform lane is the lower half of the track, under the see-through part of the blocks.
    const lane = H / 2;
    const mid = H - lane / 2 - 2 * dpr;
    for (let x = 0; x < audioW; x++) {
      const b0 = Math.floor((x / audioW) * buckets);
      const b1 = Math.max(b0 + 1, Math.floor(((x + 1) / audioW) * buckets));
      let lo = 0;
      let hi = 0;
      for (let b = b0; b < b1 && b < buckets; b++) {
        if (a.peaks[2 * b] < lo) lo = a.peaks[2 * b];
        if (a.peaks[2 * b + 1] > hi) hi = a.peaks[2 * b + 1];
      }
      const top = mid - hi * (lane / 2) * 0.95;
      const bottom = mid - lo * (lane / 2) * 0.95;
      g.fillRect(x, top, 1, Math.max(1, bottom - top));
    }
    g.globalAlpha = 1;
  }
}

function shortReason(issue) {
  switch (issue.kind) {
    case "text_empty":
      return "no text";
    case "text_long":
      return `text over ${PM.MAX_PHASE_TEXT} chars`;
    case "too_short":
      return "too short for a latent frame";
    case "after_clip_end":
    case "start_after_clip":
      return "beyond the clip";
    case "overlap":
      return "overlaps";
    case "start_negative":
      return "starts before 0 s";
    case "end_before_start":
      return "ends before it starts";
    case "too_many":
      return `more than ${PM.MAX_PHASES} phases`;
    default:
      return issue.message;
  }
}

// ------------------------------------------------------------------------------------------ registration
const LOADED_FLAG = "__actavatarPhaseTimelineLoaded";
if (!app) {
  console.error("[ActAvatar] window.comfyAPI.app is missing: the phase timeline needs the ComfyUI frontend >= 1.16.");
} else if (window[LOADED_FLAG]) {
  // The same web folder can be served twice (pyproject [tool.comfy] web and WEB_DIRECTORY): register once.
  console.info(`[ActAvatar] phase timeline already loaded from ${window[LOADED_FLAG]}; skipping ${import.meta.url}`);
} else {
  window[LOADED_FLAG] = import.meta.url;
  app.registerExtension({
    name: "ActAvatar.PhaseTimeline",

    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE_CLASS) return;
      const spec = nodeData.input?.required?.[INPUT_NAME] ?? nodeData.input?.optional?.[INPUT_NAME];
      if (Array.isArray(spec)) {
        // Keep the STRING socket type; only the widget the frontend builds for it changes.
        spec[1] = { ...(spec[1] || {}), widgetType: WIDGET_TYPE };
      } else {
        console.warn(`[ActAvatar] ${NODE_CLASS} has no '${INPUT_NAME}' input; the timeline is not attached.`);
      }
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = onExecuted?.apply(this, arguments);
        TIMELINES.get(this)?.onExecuted(message);
        return r;
      };
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = onConnectionsChange?.apply(this, arguments);
        const tl = TIMELINES.get(this);
        if (tl) {
          tl.pollKey = "";
          requestAnimationFrame(() => tl.poll());
        }
        return r;
      };
    },

    getCustomWidgets() {
      return {
        [WIDGET_TYPE](node, inputName, inputData) {
          const initial = inputData?.[1]?.default ?? "";
          const timeline = new Timeline(node, inputName, initial);
          return { widget: timeline.widget, minWidth: MIN_WIDTH, minHeight: MIN_HEIGHT };
        },
      };
    },
  });
}
