"""Property test over random phase scripts: phases.py (the contract) against web/js/phase_model.mjs (the timeline).

Seeded ``random`` builds JSON and compact scripts with unicode, huge numbers, NaN/Infinity, overlaps, touching
edges and empty texts. For every case:

* phases.py raises nothing but :class:`PhaseScriptError`, and ``problems()`` returns a list;
* both models give the same verdict; an accepted script gives the same canonical JSON and compact text in both,
  and its canonical JSON parses back to itself (Python and JS);
* the same problems are reported, word for word, whenever the input is one both JSON parsers read alike (the JS
  mirror promises byte-identical messages; only JSON syntax errors and numbers beyond a double differ);
* a refusal caused by a phase names the phase (its number, entry or segment).

All JS cases run through one ``node`` process.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from actavatar_core.errors import PhaseScriptError
from actavatar_core.phases import PhaseScript

ROOT = Path(__file__).resolve().parents[1]
CASES = 600
SEED = 20241206

_JS_RUNNER = r"""
import * as M from "%MODEL%";
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const out = [];
  for (const c of JSON.parse(input)) {
    let script;
    try {
      script = M.parseScript(c.value);
    } catch (err) {
      out.push(err instanceof M.PhaseScriptError ? { parsed: false, error: err.message } : { crash: String(err && err.stack || err) });
      continue;
    }
    try {
      const problems = M.problems(script, c.duration, c.fps);
      const dumps = M.dumps(script);
      out.push({ parsed: true, problems, dumps, compact: M.toCompact(script), again: M.dumps(M.parseScript(dumps)) });
    } catch (err) {
      out.push({ crash: String(err && err.stack || err) });
    }
  }
  process.stdout.write(JSON.stringify(out));
});
"""

_WORDS = ["a man", "waves", "points down", "Ein Mann winkt", "湖畔で話す", "🙂 smiles", "نعم", "x", "1990s-style",
          "3 tomatoes", "raises the left hand", "a\u00a0b", "tab\there", "e\u0301", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "quote \" and \\"]
_SPACES = ["", " ", "  ", "\t", "\u3000", "\u00a0", "\u2003"]


def _text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.08:
        return ""
    if roll < 0.14:
        return rng.choice(_SPACES[1:]) * rng.randint(1, 3)
    if roll < 0.18:
        return rng.choice("ab🙂語") * rng.choice([299, 300, 301, 2000, 2001])
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))


def _time(rng: random.Random, around: float) -> float | int:
    roll = rng.random()
    if roll < 0.5:
        return round(around + rng.choice([0, 0, 0.04, 0.16, 0.5, 1, 1.5, 2.25]), rng.choice([0, 1, 2, 3, 7]))
    if roll < 0.65:
        return rng.randint(0, 12)
    if roll < 0.75:
        return rng.uniform(-1, 12)
    return rng.choice([-0.0, 1e-7, 0.1 + 0.2, 1 / 3, 999_999_999.0, 1e9, 1e15, 2.5e-300, 5e-324, 123456.789])


_ODD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "1E2", "-0", "0.0000001",
                "true", "null", '"2"', "[1]", "{}"]


def _json_case(rng: random.Random) -> tuple[str, bool]:
    """(JSON text, whether both JSON parsers read it alike)."""
    phases = []
    t = rng.choice([0, 0, 0.5, 2])
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4, 8, 9])):
        start = _time(rng, t)
        end = _time(rng, float(start) + rng.choice([0.04, 0.5, 1, 2]) if rng.random() < 0.7 else t)
        if rng.random() < 0.3:  # touching edges
            end = float(start) + 1
        phases.append({"start": start, "end": end, "text": _text(rng)})
        t = float(end) if rng.random() < 0.6 else float(start)  # next one touches or overlaps
    rng.shuffle(phases) if rng.random() < 0.3 else None
    data: dict = {"version": 1, "base": _text(rng) if rng.random() < 0.9 else "a man", "phases": phases}
    if rng.random() < 0.3:
        data["negative"] = rng.choice(["", "blurry", None, 3, "n" * 2001])
    if rng.random() < 0.05:
        data["version"] = rng.choice([2, True, "1", 1.0])
    if rng.random() < 0.05:
        data[rng.choice(["phase", "Base", "extra"])] = 1
    if rng.random() < 0.05 and phases:
        rng.choice(phases)[rng.choice(["start_s", "txt"])] = 0
    if rng.random() < 0.05 and phases:
        del rng.choice(phases)[rng.choice(["start", "end", "text"])]
    if rng.random() < 0.04:
        data["phases"] = rng.choice([{}, "0-2s: waves", None, [1, 2]])
    text = json.dumps(data, ensure_ascii=rng.random() < 0.5)
    alike = True
    if rng.random() < 0.15 and phases and '"start": ' in text:
        odd = rng.choice(_ODD_NUMBERS)
        text = re.sub(r'"start": [^,}]+', lambda m: f'"start": {odd}', text, count=1)
        alike = odd not in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400)
    if rng.random() < 0.03:
        text = text[: rng.randint(0, len(text))]  # truncated JSON
        alike = False
    if rng.random() < 0.05:
        text = "\ufeff" + text
    return text, alike


def _anchor(rng: random.Random, start: float, end: float) -> str:
    def num(v: float) -> str:
        return rng.choice([f"{v:g}", f"{v}", f"{v:.3f}", f"{int(v)}." if v == int(v) else f"{v:g}"])

    sep = rng.choice(["-", "-", " - ", "\u2013", " to "])
    unit = rng.choice(["s", "", " s"])
    body = f"{num(start)}{unit if rng.random() < 0.5 else ''}{sep}{num(end)}{unit}"
    return f"[{body}]" if rng.random() < 0.1 else body


def _compact_case(rng: random.Random) -> str:
    parts = []
    if rng.random() < 0.85:
        parts.append(_text(rng))
    t = rng.choice([0.0, 0.5])
    for _ in range(rng.choice([0, 1, 2, 2, 3, 9])):
        start = max(0.0, t + rng.choice([0, 0, -0.5, 0.3]))
        end = start + rng.choice([0.04, 0.2, 1, 1.5, 2, 0])
        if rng.random() < 0.05:
            end = rng.choice([1e9, 99999999999.0, 1e20])
        parts.append(f"{_anchor(rng, start, end)}:{rng.choice(_SPACES)}{_text(rng)}")
        t = end
    if rng.random() < 0.1:
        parts.append(f"negative: {_text(rng)}")
    if rng.random() < 0.08:
        parts.insert(rng.randint(0, len(parts)), rng.choice(["2-: waves", "1.5s to", "[2 -", "-1-2s: x", "1-2"]))
    joiner = rng.choice([" | ", "|", "\n", " |\n "])
    return joiner.join(parts)


def _cases() -> list[dict]:
    rng = random.Random(SEED)
    out = []
    for i in range(CASES):
        if i % 2:
            value, alike = _json_case(rng)
        else:
            value, alike = _compact_case(rng), True
        duration = rng.choice([None, None, 1.0, 2.5, 4.08, 6, 10.0, 60.0, 0.0, -1.0, 1e9, 5e-324])
        fps = rng.choice([25.0, 25.0, 24.0, 16.0, 30.0, 8.0, 120.0, 23.976, 1e-300, 1e12, 1e300, 0.0, -25.0])
        out.append({"value": value, "duration": duration, "fps": fps, "alike": alike})
    return out


def _python(case: dict) -> dict:
    try:
        script = PhaseScript.parse(case["value"])
    except PhaseScriptError as exc:
        return {"parsed": False, "error": str(exc)}
    problems = script.problems(case["duration"], case["fps"])
    assert isinstance(problems, list)
    dumps = script.dumps()
    return {"parsed": True, "problems": problems, "dumps": dumps, "compact": script.to_compact(),
            "again": PhaseScript.parse(dumps).dumps()}


def _node() -> str:
    node = shutil.which("node") or ("/usr/bin/node" if Path("/usr/bin/node").exists() else None)
    if node is None:
        pytest.skip("node is not installed (the JS side of the fuzz test needs Node.js >= 18)")
    return node


def _names_a_phase(message: str) -> bool:
    return bool(re.search(r"[Pp]hase (entry )?\d+|[Ss]egment \d+|\"phases\"|phases; at most", message))


def _phase_caused(message: str) -> bool:
    """Whether a refusal is about one phase (rather than the base prompt, the version, unknown top-level fields or
    JSON syntax)."""
    general = ("base prompt", "negative prompt", "version", "Unknown phase script field", "not valid JSON",
               "must be a JSON object", '"base"', '"negative"', "frame rate")
    lines = [ln for ln in message.splitlines() if ln.strip() and ln.strip() != "The phase script has problems:"]
    return any(not any(g in ln for g in general) for ln in lines)


def test_fuzz_python_and_js_agree(tmp_path):
    node = _node()
    cases = _cases()
    crashes = []
    py = []
    for case in cases:
        try:
            py.append(_python(case))
        except Exception as exc:  # noqa: BLE001 - anything but a PhaseScriptError is a bug in phases.py
            crashes.append(f"{case['value'][:80]!r} (duration {case['duration']}, fps {case['fps']}): "
                           f"{type(exc).__name__}: {exc}")
            py.append(None)
    assert not crashes, "phases.py crashed:\n" + "\n".join(crashes[:10])

    runner = tmp_path / "fuzz_runner.mjs"
    runner.write_text(_JS_RUNNER.replace("%MODEL%", (ROOT / "web" / "js" / "phase_model.mjs").as_uri()))
    proc = subprocess.run([node, str(runner)], input=json.dumps(cases), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    js = json.loads(proc.stdout)
    assert len(js) == len(cases)

    accepted = refused = 0
    for case, p, j in zip(cases, py, js):
        where = f"case {case['value'][:120]!r} (duration {case['duration']}, fps {case['fps']})"
        assert "crash" not in j, f"phase_model.mjs crashed on {where}: {j.get('crash', '')[:500]}"
        p_ok = p["parsed"] and not p["problems"]
        j_ok = j["parsed"] and not j["problems"]
        assert p_ok == j_ok, f"verdicts differ on {where}:\n  py: {p}\n  js: {j}"
        if p_ok:
            accepted += 1
            assert p["again"] == p["dumps"] and j["again"] == j["dumps"], f"canonical form is not a fixed point: {where}"
            assert j["dumps"] == p["dumps"], f"canonical JSON differs on {where}:\n  py: {p['dumps']}\n  js: {j['dumps']}"
            assert j["compact"] == p["compact"], f"compact text differs on {where}"
            continue
        refused += 1
        message = p["error"] if not p["parsed"] else "\n".join(p["problems"])
        assert "Fix:" in message, f"refusal without a fix on {where}: {message}"
        if _phase_caused(message):
            assert _names_a_phase(message), f"the refusal does not name the phase on {where}: {message}"
        if case["alike"]:
            js_message = j["error"] if not j["parsed"] else "\n".join(j["problems"])
            if p["parsed"] == j["parsed"] and "not valid JSON" not in message:
                assert js_message == message, f"messages differ on {where}:\n  py: {message}\n  js: {js_message}"
    # the generator must exercise both outcomes in earnest
    assert accepted >= CASES // 10 and refused >= CASES // 4, (accepted, refused)


@pytest.mark.parametrize("value", [
    "a man | 0-99999999999s: waves",  # 3000 years: refused like the JSON form refuses it
    "a man | 1-2s: x | 99999999999999999999-199999999999999999999s: waves",
])
def test_compact_times_beyond_the_json_bound_are_refused_by_segment(value):
    with pytest.raises(PhaseScriptError, match=r"Segment \d+ .* beyond 1e\+09 s\. Fix:"):
        PhaseScript.parse(value)


@pytest.mark.parametrize("start, end", [(0, 999999999.5), (999999990.25, 999999999.5), (12.0, 12.04)])
def test_the_latent_frame_check_does_not_walk_the_whole_clip(start, end):
    import time

    script = PhaseScript.parse({"version": 1, "base": "a", "phases": [{"start": start, "end": end, "text": "x"}]})
    started = time.monotonic()
    problems = script.problems(None, 25.0)
    assert time.monotonic() - started < 1, "the 'too short' rule must not build a grid of every latent frame"
    holds = any(start - 1e-6 <= (0.0 if j == 0 else (4 * j - 1.5) / 25.0) < end - 1e-6
                for j in range(int(start * 25 / 4) - 2, int(start * 25 / 4) + 4) if j >= 0)
    assert (not problems) == holds, problems


@pytest.mark.parametrize("fps", [1e-300, 1e12, 1e300, 1.7e308])
def test_an_absurd_frame_rate_does_not_hang_the_check(fps):
    import time

    script = PhaseScript.parse("a man | 5-6s: waves | 999999-1000000s: points")
    started = time.monotonic()
    for duration in (None, 10.0, 1e6, math.inf):
        assert isinstance(script.problems(duration, fps), list)
    assert time.monotonic() - started < 1
