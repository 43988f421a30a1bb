// ActAvatar phase-script model for the timeline widget. Plain ES module: no DOM, no ComfyUI.
//
// This mirrors actavatar_core/phases.py (the authoritative contract): the JSON form
//   {"version": 1, "base": "...", "negative": "", "phases": [{"start": 0, "end": 2, "text": "..."}]}
// the compact text form ("base | 0-2s: waves | 2-4.5s: points down"), the validation rules and their messages,
// and PhaseScript.dumps() byte for byte. Shared test vectors (tests/vectors/phase_scripts.json) are checked
// against both implementations.
//
// The file ends in .mjs on purpose: ComfyUI's GET /extensions lists only "**/*.js" under WEB_DIRECTORY, so this
// module is imported by actavatar_timeline.js and never loaded as an extension on its own (it would be harmless
// anyway: it has no side effects).

export const SCRIPT_VERSION = 1;
export const MAX_PHASES = 8;
export const MAX_PHASE_TEXT = 300;
export const MAX_BASE_TEXT = 2000;
export const VAE_TEMPORAL_STRIDE = 4;
export const DEFAULT_FPS = 25.0;
export const EPS = 1e-6;
/** Phase times at or beyond this many seconds are refused (phases.py _MAX_SECONDS). */
export const MAX_SECONDS = 1e9;

// ------------------------------------------------------------------------------------------ errors
export class PhaseScriptError extends Error {
  constructor(problem, fix = null) {
    const p = String(problem).trimEnd();
    const f = fix ? String(fix).trimEnd() : null;
    super(f ? `${p} Fix: ${f}` : p);
    this.name = "PhaseScriptError";
    this.problem = p;
    this.fix = f;
  }
}

// ------------------------------------------------------------------------------------------ Python look-alikes
// Python's str.isspace() / str.strip() / re "\s" set (differs from JS: adds \x1c-\x1f and \x85, lacks \ufeff).
const PY_WS = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const STRIP_RE = new RegExp(`^[${PY_WS}]+|[${PY_WS}]+$`, "g");

/** Python's str.strip(). */
export function pyStrip(s) {
  return String(s).replace(STRIP_RE, "");
}

/** Python's len() on a str: code points, not UTF-16 units. */
export function pyLen(s) {
  let n = 0;
  for (const _ of String(s)) n++;
  return n;
}

function pySlice(s, n) {
  return Array.from(String(s)).slice(0, n).join("");
}

/** Exact decimal digits of a finite non-negative double: [integer digits, fraction digits]. */
function exactDecimal(a) {
  if (a >= 1e21) return [BigInt(a).toString(), ""];
  // toFixed(100) is exact for every double >= 2**-48; smaller values round to 0 at the precisions used here.
  const [i, f = ""] = a.toFixed(100).split(".");
  return [i, f];
}

/** Round a string of decimal digits to `keep` digits, half to even on an exact tie. Returns [digits, carry]. */
function roundDigits(digits, keep) {
  if (keep < 0) return ["", false];
  const head = digits.slice(0, keep);
  const rest = digits.slice(keep);
  let up = false;
  if (rest.length) {
    const first = rest[0];
    const tail = rest.slice(1);
    if (first > "5") up = true;
    else if (first === "5") {
      if (/[1-9]/.test(tail)) up = true;
      else {
        const last = head.length ? Number(head[head.length - 1]) : 0;
        up = last % 2 === 1;
      }
    }
  }
  if (!up) return [head, false];
  const arr = head.split("").map(Number);
  let k = arr.length - 1;
  while (k >= 0) {
    if (arr[k] === 9) {
      arr[k] = 0;
      k--;
    } else {
      arr[k] += 1;
      break;
    }
  }
  if (k < 0) return ["1" + arr.join(""), true];
  return [arr.join(""), false];
}

/** Python's round(x, n) for a float (correctly rounded, ties to even). */
export function pyRound(x, n) {
  if (!Number.isFinite(x) || x === 0) return x;
  const neg = x < 0;
  const a = Math.abs(x);
  if (a >= 1e21) return x;
  const [ip, fp] = exactDecimal(a);
  const frac = fp.padEnd(n + 1, "0");
  const [digits] = roundDigits(ip + frac, ip.length + n);
  // digits may have gained a leading digit through the carry; the decimal point stays n from the right.
  const intPart = digits.slice(0, digits.length - n) || "0";
  const fracPart = digits.slice(digits.length - n);
  const value = Number(n > 0 ? `${intPart}.${fracPart}` : intPart);
  return neg ? -value : value;
}

function pad2(e) {
  const s = String(Math.abs(e));
  return (e < 0 ? "-" : "+") + (s.length < 2 ? "0" + s : s);
}

/** Python's format(x, "g") (precision 6). */
export function pyFormatG(x, precision = 6) {
  if (Number.isNaN(x)) return "nan";
  if (x === Infinity) return "inf";
  if (x === -Infinity) return "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0" : "0";
  const sign = x < 0 ? "-" : "";
  const [ip, fp] = exactDecimal(Math.abs(x));
  let exp;
  let sig;
  if (ip !== "0") {
    exp = ip.length - 1;
    sig = ip + fp;
  } else {
    const lead = fp.search(/[1-9]/);
    exp = -(lead + 1);
    sig = fp.slice(lead);
  }
  let [digits, carry] = roundDigits(sig, precision);
  if (carry) {
    exp += 1;
    digits = digits.slice(0, precision);
  }
  digits = digits.padEnd(precision, "0");
  if (exp >= -4 && exp < precision) {
    let s;
    if (exp >= 0) s = digits.slice(0, exp + 1) + "." + digits.slice(exp + 1);
    else s = "0." + "0".repeat(-exp - 1) + digits;
    s = s.replace(/\.?0+$/, "");
    if (s.endsWith(".")) s = s.slice(0, -1);
    return sign + s;
  }
  let mant = digits[0] + "." + digits.slice(1);
  mant = mant.replace(/\.?0+$/, "");
  return `${sign}${mant}e${pad2(exp)}`;
}

/** Python's repr() of a float. */
export function pyFloatRepr(x) {
  if (Number.isNaN(x)) return "nan";
  if (x === Infinity) return "inf";
  if (x === -Infinity) return "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [m, e] = Math.abs(x).toExponential().split("e");
  const digits = m.replace(".", "");
  const exp = Number(e);
  if (exp >= -4 && exp < 16) {
    let s;
    if (exp >= 0) {
      const ipart = digits.slice(0, exp + 1).padEnd(exp + 1, "0");
      const fpart = digits.slice(exp + 1);
      s = `${ipart}.${fpart || "0"}`;
    } else {
      s = "0." + "0".repeat(-exp - 1) + digits;
    }
    return sign + s;
  }
  const mant = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${mant}e${pad2(exp)}`;
}

/** The Python type name a JSON value would have after json.loads. */
function pyTypeName(v) {
  if (v === null || v === undefined) return "NoneType";
  if (Array.isArray(v)) return "list";
  if (typeof v === "string") return "str";
  if (typeof v === "boolean") return "bool";
  if (typeof v === "number") return Number.isInteger(v) ? "int" : "float";
  return "dict";
}

/** An approximation of Python's repr() for JSON values (used in messages only). */
function pyRepr(v) {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return Number.isInteger(v) && Math.abs(v) < 1e16 ? String(v) : pyFloatRepr(v);
  if (typeof v === "string") {
    const q = v.includes("'") && !v.includes('"') ? '"' : "'";
    const body = v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t");
    return q + (q === "'" ? body.replace(/'/g, "\\'") : body) + q;
  }
  if (Array.isArray(v)) return "[" + v.map(pyRepr).join(", ") + "]";
  return "{" + Object.keys(v).map((k) => `${pyRepr(k)}: ${pyRepr(v[k])}`).join(", ") + "}";
}

function pyTruthy(v) {
  if (v === null || v === undefined || v === false || v === 0 || v === "") return false;
  if (Array.isArray(v)) return v.length > 0;
  if (typeof v === "object") return Object.keys(v).length > 0;
  return true;
}

/** phases.py _fmt: f"{round(value, 3):g}". */
export function fmt(value) {
  return pyFormatG(pyRound(value, 3));
}

/** phases.py _clean_number, rendered as json.dumps renders it. */
function dumpNumber(value) {
  const r = pyRound(value, 6);
  if (Number.isFinite(r) && Number.isInteger(r)) return BigInt(r).toString();
  return pyFloatRepr(r);
}

function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

const hasOwn = (o, k) => Object.prototype.hasOwnProperty.call(o, k);

// ------------------------------------------------------------------------------------------ parsing
const JSON_FIX =
  'Write it as {"version": 1, "base": "...", "phases": [{"start": 0, "end": 2, "text": "..."}]} ' +
  "or use the compact form '0-2s: waves | 2-4s: points down'.";

/** A position in `text` as Python's json module reports it (1-based line and column). */
function lineCol(text, pos) {
  const before = text.slice(0, pos);
  const line = before.split("\n").length;
  const col = pos - (before.lastIndexOf("\n") + 1) + 1;
  return [line, col];
}

function jsonError(text, err) {
  let msg = String((err && err.message) || err);
  let pos = null;
  const m = /at position (\d+)/.exec(msg);
  if (m) pos = Number(m[1]);
  else if (/Unexpected end of JSON input/.test(msg)) pos = text.length;
  msg = msg
    .replace(/\s*\(line \d+ column \d+\)/, "")
    .replace(/,\s*(?:\.\.\.)?".*"(?:\.\.\.)? is not valid JSON$/s, "")
    .replace(/\s*in JSON at position \d+/, "")
    .replace(/^JSON\.parse: /, "")
    .trim();
  if (!msg) msg = "Invalid JSON";
  const where = pos === null ? "" : (() => {
    const [l, c] = lineCol(text, pos);
    return ` at line ${l}, column ${c}`;
  })();
  return new PhaseScriptError(`The phase script is not valid JSON (${msg}${where}).`, JSON_FIX);
}

function phaseFromJson(index, raw) {
  const where = `Phase entry ${index + 1}`;
  if (!isPlainObject(raw)) {
    throw new PhaseScriptError(`${where} is not an object.`, 'Write each phase as {"start": 0, "end": 2, "text": "..."}.');
  }
  const missing = ["start", "end", "text"].filter((k) => !hasOwn(raw, k));
  if (missing.length) {
    throw new PhaseScriptError(`${where} lacks ${missing.join(", ")}.`, 'Each phase needs "start", "end" (seconds) and "text".');
  }
  const extra = Object.keys(raw).filter((k) => !["start", "end", "text"].includes(k)).sort();
  if (extra.length) {
    throw new PhaseScriptError(`${where} has unknown field(s) ${extra.join(", ")}.`, 'Use only "start", "end" and "text".');
  }
  const values = [];
  for (const key of ["start", "end"]) {
    const value = raw[key];
    if (typeof value !== "number" || !(Math.abs(value) < MAX_SECONDS)) {
      throw new PhaseScriptError(
        `${where} has ${key} = ${typeof value === "number" ? pyFormatG(value) : pyRepr(value)}, which is not a finite number of seconds.`,
        `Write ${key} as a number such as 2 or 2.5.`,
      );
    }
    values.push(value + 0); // -0 is 0, as in phases.py
  }
  if (typeof raw.text !== "string") {
    throw new PhaseScriptError(`${where} text is not a string.`, "Describe the action as text.");
  }
  return { start: values[0], end: values[1], text: raw.text };
}

/** Phases in time order (stable sort by start, then end), like phases.py _ordered. */
export function ordered(phases) {
  return phases
    .map((p, i) => [p, i])
    .sort((a, b) => a[0].start - b[0].start || a[0].end - b[0].end || a[1] - b[1])
    .map(([p]) => p);
}

/** Parse the JSON contract (a string or an already-decoded object). */
export function fromJson(data) {
  if (typeof data === "string") {
    try {
      data = JSON.parse(data);
    } catch (err) {
      throw jsonError(data, err);
    }
  }
  if (!isPlainObject(data)) {
    throw new PhaseScriptError(
      `The phase script must be a JSON object, got ${pyTypeName(data)}.`,
      'Wrap it as {"version": 1, "base": "...", "phases": [...]}.',
    );
  }
  const version = hasOwn(data, "version") ? data.version : SCRIPT_VERSION;
  // phases.py compares with `!=`, so Python's True == 1 is accepted too; mirror that.
  if (version !== SCRIPT_VERSION) {
    throw new PhaseScriptError(
      `Phase script version ${pyRepr(version)} is not supported (this ActAvatar reads version ${SCRIPT_VERSION}).`,
      `Set "version": ${SCRIPT_VERSION}, or update ActAvatar.`,
    );
  }
  const unknown = Object.keys(data).filter((k) => !["version", "base", "negative", "phases"].includes(k)).sort();
  if (unknown.length) {
    throw new PhaseScriptError(
      `Unknown phase script field(s): ${unknown.join(", ")}.`,
      'Only "version", "base", "negative" and "phases" are allowed; check the spelling.',
    );
  }
  const base = hasOwn(data, "base") ? data.base : "";
  let negative = hasOwn(data, "negative") ? data.negative : "";
  if (negative === null) negative = ""; // phases.py: null counts as no negative prompt
  if (typeof base !== "string") {
    throw new PhaseScriptError('"base" must be a string.', 'Write the base prompt as text, e.g. "base": "A man talking".');
  }
  if (typeof negative !== "string") {
    throw new PhaseScriptError('"negative" must be a string.', 'Write the negative prompt as text or leave it "".');
  }
  const rawPhases = hasOwn(data, "phases") ? data.phases : [];
  if (!Array.isArray(rawPhases)) {
    throw new PhaseScriptError('"phases" must be a list.', 'Write "phases": [{"start": 0, "end": 2, "text": "..."}].');
  }
  const phases = rawPhases.map((p, i) => phaseFromJson(i, p));
  return { base, negative, phases: ordered(phases) };
}

const WS = `[${PY_WS}]`;
const NUMBER = "[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+";
const COMPACT_PHASE = new RegExp(
  `^${WS}*\\[?${WS}*(?<start>${NUMBER})${WS}*s?${WS}*(?:-|\u2013|to)${WS}*(?<end>${NUMBER})${WS}*s?${WS}*\\]?${WS}*:(?<text>[^\\n]*)$`,
  "iu",
);
// A segment that starts like a time anchor ("2-:", "2.5 to 4 waves", "[1s-") but is not a valid one. The separator
// must not be followed by a letter, so that base prompts such as "1990s-style anchor" or "3 tomatoes" are not taken
// for broken anchors (phases.py's _LOOKS_TIMED does mistake them: see tests/vectors/phase_scripts.json).
const LOOKS_TIMED = new RegExp(`^${WS}*\\[?${WS}*-?[0-9.]+${WS}*s?${WS}*(?:-|\u2013|to)(?!\\p{L})`, "iu");

/** Parse "base | 0-2s: action | 2-4.5s: action" ("|" or newlines separate segments). */
export function fromCompact(text) {
  const baseParts = [];
  let negative = "";
  const phases = [];
  const segments = String(text)
    .split(/[|\n]/)
    .map(pyStrip)
    .filter((s) => s);
  segments.forEach((segment, index) => {
    if (segment.toLowerCase().startsWith("negative:")) {
      negative = pyStrip(segment.slice(segment.indexOf(":") + 1));
      return;
    }
    const m = COMPACT_PHASE.exec(segment);
    if (m) {
      for (const raw of [m.groups.start, m.groups.end]) {
        if (!(Number(raw) < MAX_SECONDS)) {
          throw new PhaseScriptError(
            `Segment ${index + 1} ('${pySlice(segment, 40)}') has a time of ${raw} s, beyond ${pyFormatG(MAX_SECONDS)} s.`,
            "Write phase times in seconds from the start of the clip, e.g. '0-2s: waves'.",
          );
        }
      }
      phases.push({ start: Number(m.groups.start), end: Number(m.groups.end), text: pyStrip(m.groups.text) });
      return;
    }
    if (LOOKS_TIMED.test(segment)) {
      throw new PhaseScriptError(
        `Cannot read the time anchor of segment ${index + 1} ('${pySlice(segment, 40)}').`,
        "Write phases as 'START-ENDs: text', e.g. '0-2s: waves' or '2.5-4s: points down'.",
      );
    }
    if (phases.length) {
      throw new PhaseScriptError(
        `Segment ${index + 1} ('${pySlice(segment, 40)}') has no time anchor but comes after a phase.`,
        "Put the base prompt first, or give the segment a window like '2-4s: ...'.",
      );
    }
    baseParts.push(segment);
  });
  return { base: baseParts.join(" "), negative, phases: ordered(phases) };
}

/**
 * Accept the JSON contract (string or object) or the compact text form, like PhaseScript.parse.
 * Returns {base, negative, phases: [{start, end, text}]} with phases in time order; throws PhaseScriptError.
 */
export function parseScript(value) {
  if (isPlainObject(value)) return fromJson(value);
  if (typeof value !== "string") {
    throw new PhaseScriptError(
      `A phase script must be text or JSON, got ${pyTypeName(value)}.`,
      "Pass the JSON phase script or the compact form '0-2s: waves | 2-4s: points down'.",
    );
  }
  // A byte-order mark (a JSON file saved by some Windows editors) must not turn the JSON into a base prompt;
  // phases.py strips it too (see the "json_with_bom" vector).
  const stripped = pyStrip(value.replace(/^\ufeff/, ""));
  if (stripped.startsWith("{")) return fromJson(stripped);
  if (stripped.startsWith("[")) {
    // A JSON list (wrong: the error says so), or compact text opening with "[0-2s]: ..."
    let parsed;
    try {
      parsed = JSON.parse(stripped);
    } catch {
      parsed = undefined;
    }
    if (parsed !== undefined) return fromJson(stripped);
  }
  return fromCompact(stripped);
}

/** Python-compatible PhaseScript.dumps(): json.dumps(to_json(), ensure_ascii=False). */
export function dumps(script) {
  const phases = script.phases
    .map((p) => `{"start": ${dumpNumber(p.start)}, "end": ${dumpNumber(p.end)}, "text": ${JSON.stringify(p.text)}}`)
    .join(", ");
  return (
    `{"version": ${SCRIPT_VERSION}, "base": ${JSON.stringify(script.base)}, ` +
    `"negative": ${JSON.stringify(script.negative || "")}, "phases": [${phases}]}`
  );
}

/** PhaseScript.to_compact(). */
export function toCompact(script) {
  const parts = script.base ? [script.base] : [];
  for (const p of script.phases) parts.push(`${fmt(p.start)}-${fmt(p.end)}s: ${p.text}`);
  if (script.negative) parts.push(`negative: ${script.negative}`);
  return parts.join(" | ");
}

export function emptyScript(base = "") {
  return { base, negative: "", phases: [] };
}

// ------------------------------------------------------------------------------------------ frame grid
export function framesForDuration(seconds, fps) {
  const needed = Math.max(1, Math.ceil(seconds * fps - EPS));
  return VAE_TEMPORAL_STRIDE * Math.ceil((needed - 1) / VAE_TEMPORAL_STRIDE) + 1;
}

export function latentFrameCount(numFrames) {
  return (numFrames - 1) / VAE_TEMPORAL_STRIDE + 1;
}

/** Time of latent frame j: t_0 = 0, t_j = (4j - 1.5) / fps. */
export function latentFrameTime(j, fps) {
  return j === 0 ? 0.0 : (VAE_TEMPORAL_STRIDE * j - 1.5) / fps;
}

export function latentFrameTimes(numLatentFrames, fps) {
  const out = [];
  for (let j = 0; j < numLatentFrames; j++) out.push(latentFrameTime(j, fps));
  return out;
}

function gridCount(duration, fps, phases) {
  const horizon = duration !== null && duration !== undefined ? duration : Math.max(0, ...phases.map((p) => p.end));
  return latentFrameCount(framesForDuration(Math.max(horizon, 1.0 / fps), fps));
}

const WALK_STEPS = 16;

/** Whether some latent frame time t of the grid satisfies start - EPS <= t < end - EPS (same test as phases.py). */
function holdsLatentFrame(phase, count, fps) {
  const lo = phase.start - EPS;
  const hi = phase.end - EPS;
  if (count > 0 && lo <= 0 && 0 < hi) return true;
  // Two frames before the first time >= lo, then walk forward (times increase with j); the step bound keeps an
  // absurd frame rate (where j + 1 no longer changes t) from looping forever. Same as phases.py _holds_latent_frame.
  let j = Math.max(1, Math.ceil((lo * fps + 1.5) / VAE_TEMPORAL_STRIDE) - 2);
  for (let step = 0; step < WALK_STEPS; step++, j++) {
    if (!(j < count)) return false;
    const t = latentFrameTime(j, fps);
    if (t >= hi) return false;
    if (lo <= t) return true;
  }
  return false;
}

function describe(p) {
  const short = pyLen(p.text) <= 40 ? p.text : pySlice(p.text, 37) + "...";
  return `${fmt(p.start)}-${fmt(p.end)}s '${short}'`;
}

export { describe as describePhase };

// ------------------------------------------------------------------------------------------ validation
/**
 * Every rule the script breaks, with the phases each one concerns (0-based indices into script.phases, which must
 * be in time order). `message` is the exact PhaseScript.problems() text. `kind` is one of: base_empty, base_long,
 * negative_long, too_many, text_empty, text_long, start_negative, end_before_start, after_clip_end,
 * start_after_clip, overlap, bad_fps, too_short.
 *
 * With {all: true}, "too short" is also reported when other problems exist (phases.py checks it only once
 * everything else is right); such entries carry deferred: true and are not part of problems().
 */
export function validate(script, { duration = null, fps = DEFAULT_FPS, all = false } = {}) {
  const out = [];
  const add = (kind, message, phases = []) => out.push({ kind, message, phases });
  const phases = script.phases;
  if (!pyStrip(script.base)) {
    add("base_empty", "The base prompt is empty. Fix: describe who is talking and where, e.g. 'A man in a grey suit talks to the camera'.");
  }
  if (pyLen(script.base) > MAX_BASE_TEXT) {
    add("base_long", `The base prompt has ${pyLen(script.base)} characters, more than ${MAX_BASE_TEXT}. Fix: shorten it.`);
  }
  const neg = script.negative || "";
  if (pyLen(neg) > MAX_BASE_TEXT) {
    add("negative_long", `The negative prompt has ${pyLen(neg)} characters, more than ${MAX_BASE_TEXT}. Fix: shorten it.`);
  }
  if (phases.length > MAX_PHASES) {
    add(
      "too_many",
      `The script has ${phases.length} phases; at most ${MAX_PHASES} are allowed. Fix: merge neighbouring phases or split the clip.`,
      phases.map((_, i) => i).slice(MAX_PHASES),
    );
  }
  const hasDuration = duration !== null && duration !== undefined;
  phases.forEach((phase, i) => {
    const k = i + 1;
    const name = `Phase ${k} (${describe(phase)})`;
    if (!pyStrip(phase.text)) {
      add("text_empty", `Phase ${k} (${fmt(phase.start)}-${fmt(phase.end)}s) has no text. Fix: describe the action, e.g. 'raises the left hand'.`, [i]);
    }
    if (pyLen(phase.text) > MAX_PHASE_TEXT) {
      add("text_long", `${name} text has ${pyLen(phase.text)} characters, more than ${MAX_PHASE_TEXT}. Fix: shorten it.`, [i]);
    }
    if (phase.start < 0) add("start_negative", `${name} starts before 0 s. Fix: set its start to 0 or later.`, [i]);
    if (phase.end <= phase.start) add("end_before_start", `${name} ends at or before its start. Fix: make the end later than the start.`, [i]);
    if (hasDuration && phase.end > duration + EPS) {
      add(
        "after_clip_end",
        `${name} ends after the clip, which is ${fmt(duration)} s long. ` +
          `Fix: end it at ${fmt(duration)} s or earlier, or use a longer audio/clip.`,
        [i],
      );
    }
    if (hasDuration && phase.start >= duration - EPS && phase.end > phase.start) {
      add("start_after_clip", `${name} starts after the clip ends (${fmt(duration)} s). Fix: move it inside the clip or remove it.`, [i]);
    }
  });
  for (let k = 1; k < phases.length; k++) {
    const prev = phases[k - 1];
    const cur = phases[k];
    if (cur.start < prev.end - EPS) {
      add(
        "overlap",
        `Phase ${k} (${describe(prev)}) and phase ${k + 1} (${describe(cur)}) overlap. ` +
          `Fix: end phase ${k} at ${fmt(cur.start)} s or start phase ${k + 1} at ${fmt(prev.end)} s.`,
        [k - 1, k],
      );
    }
  }
  if (!(fps > 0) || !Number.isFinite(fps)) {
    add("bad_fps", `The frame rate ${pyFloatRepr(Number(fps))} is not a positive number. Fix: use e.g. 24 or 25 fps.`);
  } else if (out.length === 0 || all) {
    const deferred = out.length > 0;
    // The grid needs sane numbers; with broken phases (negative or reversed) only check the sane ones.
    const count = gridCount(hasDuration ? duration : null, fps, phases);
    const step = VAE_TEMPORAL_STRIDE / fps;
    phases.forEach((phase, i) => {
      if (deferred && (phase.end <= phase.start || phase.start < 0)) return;
      if (!holdsLatentFrame(phase, count, fps)) {
        const entry = {
          kind: "too_short",
          message:
            `Phase ${i + 1} (${describe(phase)}) is too short: no latent frame falls inside it at ${fmt(fps)} fps ` +
            `(one latent frame every ${fmt(step)} s). Fix: make it at least ${fmt(step)} s long.`,
          phases: [i],
        };
        if (deferred) entry.deferred = true;
        out.push(entry);
      }
    });
  }
  return out;
}

/** Exactly PhaseScript.problems(duration, fps): the list of messages, empty when valid. */
export function problems(script, duration = null, fps = DEFAULT_FPS) {
  return validate(script, { duration, fps }).map((p) => p.message);
}

/**
 * Parse and validate in one go, like the engine does for a widget value. Returns
 * {ok, script|null, parseError|null, problems: [messages], issues: [validate entries]}.
 */
export function check(value, { duration = null, fps = DEFAULT_FPS } = {}) {
  let script;
  try {
    script = parseScript(value);
  } catch (err) {
    if (!(err instanceof PhaseScriptError)) throw err;
    return { ok: false, script: null, parseError: err.message, problems: [err.message], issues: [] };
  }
  const issues = validate(script, { duration, fps });
  return { ok: issues.length === 0, script, parseError: null, problems: issues.map((i) => i.message), issues };
}

// ------------------------------------------------------------------------------------------ editing
// All editing functions are pure: they take a script (phases in time order) and return a new one plus, when a
// request had to be limited, a short `reason` the widget shows to the user.
//
// ctx: {end: last allowed second (the clip duration, or the visible span when the duration is unknown),
//       step: snapping step in seconds (0 = no snapping), minLength: shortest phase a drag may make}

export const DEFAULT_STEP = 0.1;

function clean(t) {
  return Math.round(t * 1e6) / 1e6;
}

export function snap(t, step = DEFAULT_STEP) {
  if (!step || !(step > 0)) return clean(t);
  return clean(Math.round(t / step) * step);
}

function ctxOf(ctx = {}) {
  const step = ctx.step === undefined ? DEFAULT_STEP : ctx.step;
  const end = ctx.end === undefined || ctx.end === null ? Infinity : ctx.end;
  const minLength = ctx.minLength !== undefined ? ctx.minLength : step > 0 ? step : 0.01;
  return { step, end, minLength };
}

function phaseName(phases, i) {
  const p = phases[i];
  return `phase ${i + 1} (${fmt(p.start)}-${fmt(p.end)} s)`;
}

function withPhases(script, phases) {
  return { base: script.base, negative: script.negative, phases };
}

/** Index of the phase whose window holds t (half-open), or -1. */
export function phaseAt(script, t) {
  return script.phases.findIndex((p) => p.start - EPS <= t && t < p.end - EPS);
}

/** The free interval around t: [lo, hi] between neighbouring phases and the clip limits, or null inside a phase. */
export function freeGap(script, t, ctx = {}) {
  const { end } = ctxOf(ctx);
  if (phaseAt(script, t) >= 0 || t < 0 || t > end + EPS) return null;
  let lo = 0;
  let hi = end;
  let loIdx = -1;
  let hiIdx = -1;
  script.phases.forEach((p, i) => {
    if (p.end <= t + EPS && p.end > lo) {
      lo = p.end;
      loIdx = i;
    }
    if (p.start >= t - EPS && p.start < hi) {
      hi = p.start;
      hiIdx = i;
    }
  });
  return { lo, hi, loIdx, hiIdx };
}

/**
 * The phase a drag from `anchor` to `t` over empty time would create (snapped, clamped into the free gap).
 * Returns {start, end, reason} (reason null when nothing was limited), or {start: null, reason} when no phase
 * can be made there.
 */
export function createSpan(script, anchor, t, ctx = {}) {
  const c = ctxOf(ctx);
  if (script.phases.length >= MAX_PHASES) {
    return { start: null, end: null, reason: `At most ${MAX_PHASES} phases are allowed; delete one first.` };
  }
  const a = Math.min(Math.max(anchor, 0), c.end);
  const gap = freeGap(script, a, c);
  if (!gap) return { start: null, end: null, reason: "That time already belongs to a phase." };
  let start = snap(Math.min(a, t), c.step);
  let end = snap(Math.max(a, t), c.step);
  let reason = null;
  if (start < gap.lo - EPS) {
    start = gap.lo;
    reason =
      gap.loIdx >= 0 ? `Stopped at ${phaseName(script.phases, gap.loIdx)}: phases cannot overlap.` : "Phases cannot start before 0 s.";
  }
  if (end > gap.hi + EPS) {
    end = gap.hi;
    reason =
      gap.hiIdx >= 0
        ? `Stopped at ${phaseName(script.phases, gap.hiIdx)}: phases cannot overlap.`
        : `Stopped at the end of the clip (${fmt(c.end)} s).`;
  }
  start = Math.max(start, gap.lo);
  end = Math.min(end, gap.hi);
  if (end - start < c.minLength - EPS) {
    if (gap.hi - gap.lo < c.minLength - EPS) {
      return { start: null, end: null, reason: `No room for a ${fmt(c.minLength)} s phase here.` };
    }
    return { start, end, reason, tooShort: true };
  }
  return { start, end, reason };
}

/** Add a phase (kept in time order). Returns {script, index, reason}. Refuses overlaps and more than MAX_PHASES. */
export function addPhase(script, start, end, text = "", ctx = {}) {
  if (script.phases.length >= MAX_PHASES) {
    return { script, index: -1, reason: `At most ${MAX_PHASES} phases are allowed; delete one first.` };
  }
  const c = ctxOf(ctx);
  if (end - start < c.minLength - EPS) {
    return { script, index: -1, reason: `A phase must be at least ${fmt(c.minLength)} s long.` };
  }
  if (start < -EPS || end > c.end + EPS) {
    return { script, index: -1, reason: `A phase must lie inside the clip (0-${fmt(c.end)} s).` };
  }
  const clash = script.phases.findIndex((p) => start < p.end - EPS && p.start < end - EPS);
  if (clash >= 0) return { script, index: -1, reason: `It would overlap ${phaseName(script.phases, clash)}.` };
  const phase = { start: clean(start), end: clean(end), text };
  const phases = ordered([...script.phases, phase]);
  return { script: withPhases(script, phases), index: phases.indexOf(phase), reason: null };
}

function neighbourLimits(script, i, c) {
  const phases = script.phases;
  const p = phases[i];
  const prev = phases[i - 1];
  const next = phases[i + 1];
  let lo = prev ? prev.end : 0;
  let hi = next ? next.start : c.end;
  const loReason = prev ? `Stopped at ${phaseName(phases, i - 1)}: phases cannot overlap.` : "Phases cannot start before 0 s.";
  const hiReason = next
    ? `Stopped at ${phaseName(phases, i + 1)}: phases cannot overlap.`
    : `Stopped at the end of the clip (${fmt(c.end)} s).`;
  // A script loaded with overlaps or out-of-clip phases: never force a phase to jump, only refuse to make it worse.
  lo = Math.min(lo, p.start);
  hi = Math.max(hi, p.end);
  return { lo, hi, loReason, hiReason };
}

/** Move phase i by dt seconds (its start snapped, length kept), clamped between its neighbours and the clip. */
export function movePhase(script, i, dt, ctx = {}) {
  const c = ctxOf(ctx);
  const p = script.phases[i];
  if (!p) return { script, index: -1, reason: null };
  const len = p.end - p.start;
  const { lo, hi, loReason, hiReason } = neighbourLimits(script, i, c);
  let start = snap(p.start + dt, c.step);
  let reason = null;
  if (start < lo - EPS) {
    start = lo;
    reason = loReason;
  } else if (start + len > hi + EPS) {
    start = hi - len;
    reason = hiReason;
  }
  start = clean(start);
  const end = clean(start + len);
  return replacePhase(script, i, { start, end, text: p.text }, reason);
}

/** Move one edge ("start" or "end") of phase i to time t (snapped), clamped; the phase keeps minLength. */
export function resizePhase(script, i, edge, t, ctx = {}) {
  const c = ctxOf(ctx);
  const p = script.phases[i];
  if (!p) return { script, index: -1, reason: null };
  const { lo, hi, loReason, hiReason } = neighbourLimits(script, i, c);
  let value = snap(t, c.step);
  let reason = null;
  let { start, end } = p;
  if (edge === "start") {
    const max = end - c.minLength;
    if (value < lo - EPS) {
      value = lo;
      reason = loReason;
    } else if (value > max + EPS) {
      value = Math.max(lo, max);
      reason = `A phase must be at least ${fmt(c.minLength)} s long.`;
    }
    start = clean(value);
  } else {
    const min = start + c.minLength;
    if (value > hi + EPS) {
      value = hi;
      reason = hiReason;
    } else if (value < min - EPS) {
      value = Math.min(hi, min);
      reason = `A phase must be at least ${fmt(c.minLength)} s long.`;
    }
    end = clean(value);
  }
  return replacePhase(script, i, { start, end, text: p.text }, reason);
}

/** Move phase i by one snapping step (direction -1 or +1; `steps` multiplies it, e.g. 10 with Shift). */
export function nudgePhase(script, i, direction, ctx = {}, steps = 1) {
  const c = ctxOf(ctx);
  const unit = c.step > 0 ? c.step : 0.01;
  const p = script.phases[i];
  if (!p) return { script, index: -1, reason: null };
  // Land on the grid: from an off-grid start, the first nudge goes to the neighbouring grid line.
  const target = direction > 0 ? Math.floor((p.start + EPS) / unit + steps) * unit : Math.ceil((p.start - EPS) / unit - steps) * unit;
  return movePhase(script, i, target - p.start, { ...ctx, step: c.step > 0 ? c.step : 0 });
}

function replacePhase(script, i, phase, reason) {
  const phases = script.phases.slice();
  phases[i] = phase;
  const sorted = ordered(phases);
  return { script: withPhases(script, sorted), index: sorted.indexOf(phase), reason };
}

export function deletePhase(script, i) {
  if (!script.phases[i]) return { script, index: -1, reason: null };
  return { script: withPhases(script, script.phases.filter((_, j) => j !== i)), index: -1, reason: null };
}

export function setPhaseText(script, i, text) {
  if (!script.phases[i]) return { script, index: -1, reason: null };
  const phases = script.phases.slice();
  phases[i] = { ...phases[i], text: String(text) };
  return { script: withPhases(script, phases), index: i, reason: null };
}

export function setBase(script, base) {
  return { base: String(base), negative: script.negative, phases: script.phases };
}

export function setNegative(script, negative) {
  return { base: script.base, negative: String(negative), phases: script.phases };
}

// ------------------------------------------------------------------------------------------ colours
// A phase's colour belongs to the phase, not to its position: adding a phase in front of others, deleting one or
// moving one leaves every other phase's colour as it was. Colours are slots (small integers the widget maps to its
// palette); the script itself carries no identities, so slots are carried from one script to the next by matching
// phases.

/** Number of distinct colour slots the timeline's palette has. */
export const COLOUR_SLOTS = 8;

function overlap(a, b) {
  return Math.min(a.end, b.end) - Math.max(a.start, b.start);
}

/**
 * Colour slots for `next`'s phases, carried from `prev` (whose phases had `prevSlots`).
 *
 * A phase of `next` takes the slot of the `prev` phase it continues: an identical phase (same times and text)
 * first, then one with the same text (moved or resized), then the most overlapping one (text edited). Phases
 * matching nothing (new ones) get the lowest slot no other phase uses, so a script seen for the first time is
 * coloured in time order and an undone delete gets its colour back. Returns one slot per phase of `next` (the
 * widget shows slot s in palette colour s % COLOUR_SLOTS).
 */
export function carryColours(prev, prevSlots, next) {
  const nextPhases = next?.phases ?? [];
  const prevPhases = prev?.phases ?? [];
  const usable = Array.isArray(prevSlots) && prevSlots.length === prevPhases.length;
  const out = new Array(nextPhases.length).fill(-1);
  if (usable) {
    const free = new Set(prevPhases.keys());
    const take = (matches) => {
      nextPhases.forEach((p, i) => {
        if (out[i] >= 0) return;
        let best = -1;
        let bestScore = 0;
        for (const j of free) {
          const score = matches(p, prevPhases[j]);
          if (score > bestScore) {
            best = j;
            bestScore = score;
          }
        }
        if (best >= 0) {
          out[i] = prevSlots[best];
          free.delete(best);
        }
      });
    };
    take((a, b) => (a.start === b.start && a.end === b.end && a.text === b.text ? 1 : 0));
    take((a, b) => (a.text === b.text ? 1 / (1 + Math.abs(a.start - b.start)) : 0));
    take((a, b) => Math.max(0, overlap(a, b)));
  }
  const used = new Set(out.filter((s) => s >= 0));
  for (let i = 0; i < out.length; i++) {
    if (out[i] >= 0) continue;
    let slot = 0;
    while (used.has(slot)) slot++;
    out[i] = slot;
    used.add(slot);
  }
  return out;
}

/** Whether `value` is a valid stored slot list for `script` (one distinct non-negative integer per phase). */
export function validColours(script, value) {
  const n = script?.phases?.length ?? -1;
  return (
    Array.isArray(value) &&
    value.length === n &&
    value.every((s) => Number.isInteger(s) && s >= 0) &&
    new Set(value).size === value.length
  );
}

/** The status line after deleting the phase at index i (0-based), as the timeline shows it. */
export function deletedMessage(i) {
  return `Phase ${i + 1} deleted (Ctrl+Z undoes).`;
}
