// Unit tests of web/js/phase_model.mjs: `node --test web/tests/` (also run by tests/test_js_unit.py).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as M from "../js/phase_model.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const vectors = JSON.parse(readFileSync(join(here, "../../tests/vectors/phase_scripts.json"), "utf8"));

function run(vector) {
  const fps = typeof vector.fps === "string" ? Number(vector.fps) : vector.fps;
  let script;
  try {
    script = M.parseScript(vector.script);
  } catch (err) {
    assert.ok(err instanceof M.PhaseScriptError, `${vector.name}: parse raised ${err}`);
    return { script: null, errors: [err.message] };
  }
  return { script, errors: M.problems(script, vector.duration, fps) };
}

describe("shared vectors (tests/vectors/phase_scripts.json)", () => {
  test("the vector file has cases", () => {
    assert.ok(vectors.cases.length >= 50);
    assert.equal(new Set(vectors.cases.map((c) => c.name)).size, vectors.cases.length, "names are unique");
  });
  for (const vector of vectors.cases) {
    test(vector.name, () => {
      const { script, errors } = run(vector);
      const text = errors.join("\n");
      assert.equal(errors.length === 0, vector.valid, `verdict; errors: ${text}`);
      for (const part of vector.errors_contain) assert.ok(text.includes(part), `missing ${JSON.stringify(part)} in:\n${text}`);
      if (vector.errors_exact) assert.deepEqual(errors, vector.errors_exact);
      if (vector.canonical !== undefined) {
        assert.ok(script, "a canonical form needs a parsed script");
        assert.equal(M.dumps(script), vector.canonical);
        // The canonical string is a fixed point.
        assert.equal(M.dumps(M.parseScript(vector.canonical)), vector.canonical);
      }
    });
  }
});

describe("Python look-alikes", () => {
  test("format(round(x, 3), 'g') like phases.py _fmt", () => {
    const cases = [
      [2, "2"], [2.5, "2.5"], [0.1, "0.1"], [1234567, "1.23457e+06"], [0.0001, "0"], [0.0625, "0.062"],
      [0.0635, "0.064"], [2.675, "2.675"], [1.0005, "1"], [-0.5, "-0.5"], [-0.0, "-0"], [100000.5, "100000"],
      [999999.5, "1e+06"], [4 / 24, "0.167"], [0.16, "0.16"], [23.976, "23.976"], [1e21, "1e+21"],
    ];
    for (const [x, want] of cases) assert.equal(M.fmt(x), want, `fmt(${x})`);
  });
  test("repr(float)", () => {
    const cases = [
      [0, "0.0"], [-25, "-25.0"], [2.5, "2.5"], [1e-5, "1e-05"], [0.0001, "0.0001"], [1e16, "1e+16"],
      [1234567, "1234567.0"], [0.30000000000000004, "0.30000000000000004"], [NaN, "nan"], [Infinity, "inf"],
    ];
    for (const [x, want] of cases) assert.equal(M.pyFloatRepr(x), want, `repr(${x})`);
  });
  test("round(x, n) ties to even on the exact binary value", () => {
    assert.equal(M.pyRound(0.0625, 3), 0.062);
    assert.equal(M.pyRound(0.0635, 3), 0.064); // 0.0635 is stored as 0.06350000000000000199
    assert.equal(M.pyRound(2.675, 2), 2.67); // stored as 2.67499999999999982236431605997495353221893310546875
    assert.equal(M.pyRound(9.9996, 3), 10);
    assert.equal(M.pyRound(-1.23456789, 6), -1.234568);
  });
  test("strip and len follow Python, not JS", () => {
    assert.equal(M.pyStrip("\x1c a \u3000"), "a");
    assert.equal(M.pyStrip("\ufeff"), "\ufeff");
    assert.equal(M.pyLen("\u{1F44B}\u{1F44B}"), 2);
  });
});

describe("latent-frame grid", () => {
  test("t_0 = 0 and t_j = (4j - 1.5)/fps", () => {
    assert.deepEqual(M.latentFrameTimes(3, 25), [0, 2.5 / 25, 6.5 / 25]);
  });
  test("frames for a duration are 4k+1 and cover it", () => {
    assert.equal(M.framesForDuration(5, 25), 125);
    assert.equal(M.framesForDuration(5.01, 25), 129);
    assert.equal(M.framesForDuration(0.04, 25), 1);
  });
  test("a long clip does not need the whole grid to validate a late phase", () => {
    // Latent frames near the end stand for 3599.94 s and 3600.1 s: nothing falls in [3599.95, 3599.99).
    const script = { base: "x", negative: "", phases: [{ start: 3599.95, end: 3599.99, text: "blink" }] };
    const out = M.problems(script, 3600, 25);
    assert.equal(out.length, 1);
    assert.match(out[0], /too short/);
    const ok = { base: "x", negative: "", phases: [{ start: 3599.8, end: 3600, text: "bow" }] };
    assert.deepEqual(M.problems(ok, 3600, 25), []);
  });
});

describe("validate() for the timeline", () => {
  const script = M.parseScript({
    base: "A man",
    phases: [
      { start: 0, end: 2.5, text: "waves" },
      { start: 2, end: 3, text: "" },
      { start: 4, end: 6, text: "nods" },
    ],
  });
  test("issues name the phases they concern", () => {
    const issues = M.validate(script, { duration: 5, fps: 25 });
    const byKind = Object.fromEntries(issues.map((i) => [i.kind, i.phases]));
    assert.deepEqual(byKind.text_empty, [1]);
    assert.deepEqual(byKind.after_clip_end, [2]);
    assert.deepEqual(byKind.overlap, [0, 1]);
    assert.deepEqual(issues.map((i) => i.message), M.problems(script, 5, 25));
  });
  test("with all: too-short phases are marked even while other problems exist", () => {
    const s = M.parseScript({ base: "", phases: [{ start: 0.02, end: 0.1, text: "blink" }] });
    assert.deepEqual(M.problems(s, 1, 25).length, 1);
    const all = M.validate(s, { duration: 1, fps: 25, all: true });
    const short = all.find((i) => i.kind === "too_short");
    assert.ok(short && short.deferred);
    assert.deepEqual(short.phases, [0]);
  });
  test("check() keeps the parse error", () => {
    const r = M.check("{oops", { duration: 5 });
    assert.equal(r.ok, false);
    assert.equal(r.script, null);
    assert.match(r.parseError, /not valid JSON/);
  });
});

describe("editing", () => {
  const base = () =>
    M.parseScript({
      base: "A man talks",
      phases: [
        { start: 1, end: 2, text: "waves" },
        { start: 3, end: 4, text: "nods" },
      ],
    });
  const ctx = { end: 5, step: 0.1 };

  test("snap rounds to the step and cleans float noise", () => {
    assert.equal(M.snap(0.26, 0.1), 0.3);
    assert.equal(M.snap(0.1 + 0.2, 0.1), 0.3);
    assert.equal(M.snap(1.234, 0.25), 1.25);
    assert.equal(M.snap(1.2345678, 0), 1.234568);
  });

  test("create in a gap, snapped", () => {
    const span = M.createSpan(base(), 2.23, 2.71, ctx);
    assert.deepEqual([span.start, span.end, span.reason], [2.2, 2.7, null]);
    const added = M.addPhase(base(), span.start, span.end, "", ctx);
    assert.equal(added.index, 1);
    assert.deepEqual(added.script.phases.map((p) => [p.start, p.end]), [[1, 2], [2.2, 2.7], [3, 4]]);
  });

  test("create is clamped at a neighbour and says why", () => {
    const span = M.createSpan(base(), 2.5, 3.6, ctx);
    assert.deepEqual([span.start, span.end], [2.5, 3]);
    assert.match(span.reason, /Stopped at phase 2 \(3-4 s\): phases cannot overlap/);
    const left = M.createSpan(base(), 2.5, 0.2, ctx);
    assert.deepEqual([left.start, left.end], [2, 2.5]);
    assert.match(left.reason, /phase 1/);
  });

  test("create is clamped at the clip end and at 0", () => {
    const span = M.createSpan(base(), 4.5, 7, ctx);
    assert.deepEqual([span.start, span.end], [4.5, 5]);
    assert.match(span.reason, /end of the clip \(5 s\)/);
    const s = M.parseScript({ base: "x", phases: [] });
    const z = M.createSpan(s, 0.5, -3, ctx);
    assert.deepEqual([z.start, z.end], [0, 0.5]);
    assert.match(z.reason, /before 0 s/);
  });

  test("no create inside a phase, nor beyond 8 phases", () => {
    assert.equal(M.createSpan(base(), 1.5, 2.5, ctx).start, null);
    const full = M.parseScript({ base: "x", phases: Array.from({ length: 8 }, (_, i) => ({ start: i * 0.5, end: i * 0.5 + 0.5, text: "a" })) });
    const r = M.createSpan(full, 4.5, 4.8, { end: 5 });
    assert.equal(r.start, null);
    assert.match(r.reason, /At most 8 phases/);
    assert.equal(M.addPhase(full, 4.5, 4.8, "a", { end: 5 }).index, -1);
  });

  test("a drag shorter than the step is flagged, not created", () => {
    const r = M.createSpan(base(), 2.5, 2.52, ctx);
    assert.ok(r.tooShort || r.end - r.start < 0.1);
    assert.equal(M.addPhase(base(), 2.5, 2.5, "", ctx).index, -1);
  });

  test("addPhase refuses overlaps and out-of-clip phases", () => {
    assert.match(M.addPhase(base(), 1.5, 2.5, "", ctx).reason, /overlap phase 1/);
    assert.match(M.addPhase(base(), 4.5, 5.5, "", ctx).reason, /inside the clip/);
  });

  test("move keeps the length and is clamped between neighbours", () => {
    const m = M.movePhase(base(), 0, 0.43, ctx);
    assert.deepEqual([m.script.phases[0].start, m.script.phases[0].end, m.reason], [1.4, 2.4, null]);
    const far = M.movePhase(base(), 0, 5, ctx);
    assert.deepEqual([far.script.phases[0].start, far.script.phases[0].end], [2, 3]);
    assert.match(far.reason, /Stopped at phase 2/);
    const back = M.movePhase(base(), 0, -5, ctx);
    assert.deepEqual([back.script.phases[0].start, back.script.phases[0].end], [0, 1]);
    assert.match(back.reason, /before 0 s/);
    const end = M.movePhase(base(), 1, 3, ctx);
    assert.deepEqual([end.script.phases[1].start, end.script.phases[1].end], [4, 5]);
    assert.match(end.reason, /end of the clip/);
  });

  test("resize each edge, clamped, keeping a minimum length", () => {
    const r1 = M.resizePhase(base(), 0, "end", 2.66, ctx);
    assert.deepEqual([r1.script.phases[0].start, r1.script.phases[0].end], [1, 2.7]);
    const r2 = M.resizePhase(base(), 0, "end", 3.5, ctx);
    assert.equal(r2.script.phases[0].end, 3);
    assert.match(r2.reason, /phase 2/);
    const r3 = M.resizePhase(base(), 0, "start", 1.95, ctx);
    assert.deepEqual([r3.script.phases[0].start, r3.script.phases[0].end], [1.9, 2]);
    assert.match(r3.reason, /at least 0.1 s/);
    const r4 = M.resizePhase(base(), 1, "end", 9, ctx);
    assert.equal(r4.script.phases[1].end, 5);
    assert.match(r4.reason, /end of the clip/);
    const r5 = M.resizePhase(base(), 1, "start", 0.5, ctx);
    assert.equal(r5.script.phases[1].start, 2);
  });

  test("nudge moves by one step, onto the grid, and is clamped", () => {
    const n = M.nudgePhase(base(), 0, +1, ctx);
    assert.deepEqual([n.script.phases[0].start, n.script.phases[0].end], [1.1, 2.1]);
    const off = M.parseScript({ base: "x", phases: [{ start: 1.03, end: 2, text: "a" }] });
    assert.equal(M.nudgePhase(off, 0, -1, ctx).script.phases[0].start, 1);
    assert.equal(M.nudgePhase(off, 0, +1, ctx).script.phases[0].start, 1.1);
    const big = M.nudgePhase(base(), 1, +1, ctx, 10);
    assert.deepEqual([big.script.phases[1].start, big.script.phases[1].end, big.reason], [4, 5, null]);
    const over = M.nudgePhase(base(), 1, +1, ctx, 20);
    assert.equal(over.script.phases[1].start, 4);
    assert.match(over.reason, /end of the clip/);
  });

  test("a loaded overlap is not forced apart by an edit", () => {
    const bad = M.parseScript({ base: "x", phases: [{ start: 0, end: 2.5, text: "a" }, { start: 2, end: 3, text: "b" }] });
    const m = M.movePhase(bad, 1, 0.5, { end: 5 });
    assert.deepEqual([m.script.phases[1].start, m.script.phases[1].end], [2.5, 3.5]);
    const stay = M.movePhase(bad, 1, -0.5, { end: 5 });
    assert.equal(stay.script.phases[1].start, 2);
  });

  test("delete, text, base and negative edits are immutable", () => {
    const s = base();
    const d = M.deletePhase(s, 0);
    assert.equal(d.script.phases.length, 1);
    assert.equal(s.phases.length, 2);
    const t = M.setPhaseText(s, 1, "smiles");
    assert.equal(t.script.phases[1].text, "smiles");
    assert.equal(s.phases[1].text, "nods");
    assert.equal(M.setBase(s, "B").base, "B");
    assert.equal(M.setNegative(s, "N").negative, "N");
  });

  test("an edited script serialises to the contract and parses back", () => {
    let s = base();
    s = M.addPhase(s, 2.2, 2.7, "points down", ctx).script;
    s = M.movePhase(s, 0, 0.1, ctx).script;
    const text = M.dumps(s);
    const back = M.parseScript(text);
    assert.deepEqual(back, s);
    assert.deepEqual(M.problems(back, 5, 25), []);
    assert.deepEqual(JSON.parse(text), {
      version: 1,
      base: "A man talks",
      negative: "",
      phases: [
        { start: 1.1, end: 2.1, text: "waves" },
        { start: 2.2, end: 2.7, text: "points down" },
        { start: 3, end: 4, text: "nods" },
      ],
    });
  });

  test("phaseAt uses half-open windows", () => {
    assert.equal(M.phaseAt(base(), 2), -1);
    assert.equal(M.phaseAt(base(), 1.999), 0);
    assert.equal(M.phaseAt(base(), 3), 1);
  });
});

describe("phase colours follow the phase, not its position", () => {
  const two = () =>
    M.parseScript({
      base: "A man talks",
      phases: [
        { start: 1, end: 2, text: "waves" },
        { start: 3, end: 4, text: "nods" },
      ],
    });
  const ctx = { end: 8, step: 0.1 };

  test("a script seen for the first time is coloured in time order", () => {
    assert.deepEqual(M.carryColours(null, [], two()), [0, 1]);
    assert.deepEqual(M.carryColours(two(), undefined, two()), [0, 1]);
  });

  test("adding a phase in front keeps the others' colours and gives it a new one", () => {
    const s = two();
    const slots = M.carryColours(null, [], s);
    const r = M.addPhase(s, 0.2, 0.8, "", ctx);
    assert.equal(r.index, 0);
    const after = M.carryColours(s, slots, r.script);
    assert.deepEqual(after, [2, 0, 1]);
    // typing its text, then adding another phase between the others
    const typed = M.setPhaseText(r.script, 0, "blinks").script;
    const typedSlots = M.carryColours(r.script, after, typed);
    assert.deepEqual(typedSlots, [2, 0, 1]);
    const mid = M.addPhase(typed, 2.2, 2.8, "smiles", ctx);
    assert.deepEqual(M.carryColours(typed, typedSlots, mid.script), [2, 0, 3, 1]);
  });

  test("delete frees the colour; an undone delete gets it back", () => {
    const s = M.addPhase(two(), 5, 6, "points", ctx).script;
    const slots = [0, 1, 2];
    const d = M.deletePhase(s, 1).script;
    const left = M.carryColours(s, slots, d);
    assert.deepEqual(left, [0, 2]);
    assert.deepEqual(M.carryColours(d, left, s), [0, 1, 2]);
  });

  test("moving or resizing keeps the colour, also across a phase with the same text", () => {
    const s = M.parseScript({
      base: "x",
      phases: [
        { start: 1, end: 2, text: "nods" },
        { start: 3, end: 4, text: "nods" },
      ],
    });
    const slots = [5, 2];
    const moved = M.movePhase(s, 1, 1.5, ctx);
    assert.deepEqual(M.carryColours(s, slots, moved.script), [5, 2]);
    const resized = M.resizePhase(s, 0, "start", 0.2, ctx);
    assert.deepEqual(M.carryColours(s, slots, resized.script), [5, 2]);
  });

  test("a reordering edit carries each colour with its phase", () => {
    const s = two();
    // the second phase's value changed by hand so that it now comes first
    const swapped = M.parseScript({
      base: "A man talks",
      phases: [
        { start: 1, end: 2, text: "waves" },
        { start: 0, end: 0.5, text: "nods" },
      ],
    });
    assert.deepEqual(swapped.phases.map((p) => p.text), ["nods", "waves"]);
    assert.deepEqual(M.carryColours(s, [0, 1], swapped), [1, 0]);
  });

  test("stored colours are checked against the script", () => {
    const s = two();
    assert.ok(M.validColours(s, [3, 0]));
    assert.ok(!M.validColours(s, [0]));
    assert.ok(!M.validColours(s, [1, 1]));
    assert.ok(!M.validColours(s, [0, -1]));
    assert.ok(!M.validColours(s, [0, 0.5]));
    assert.ok(!M.validColours(s, "0,1"));
  });

  test("the delete message names the phase by its number", () => {
    assert.equal(M.deletedMessage(1), "Phase 2 deleted (Ctrl+Z undoes).");
  });
});
