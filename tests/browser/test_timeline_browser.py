"""The timeline phase editor in a real browser against a real ComfyUI (issue 4).

Needs COMFYUI_DIR (a ComfyUI 0.33.0 or newer checkout), Chromium (apt-get install -y chromium; or CHROMIUM=/path) and the
playwright Python package (its bundled browsers are not used). Skips with the reason when one is missing.

ComfyUI runs on CPU from a temporary --base-directory with two packs symlinked into custom_nodes: this repository
(when it provides the real ActAvatarPhasePrompt node) and tests/browser/stub_pack, which adds an output node that
reports the phase script the engine received (and, until the real node exists, a stand-in ActAvatarPhasePrompt with
the contract's schema). Screenshots go to artifacts/browser/. With COMFYUI_FRONTEND_ROOT (see tests/comfy_server.py)
the same tests run on another frontend release, e.g. the newest comfyui-frontend-package.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import sys
import uuid
import wave
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from comfy_server import frontend_root_from_env, frontend_version, require_comfy_dir, running_comfy  # noqa: E402

from actavatar_core.phases import PhaseScript  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FIXTURE = ROOT / "tests" / "browser" / "fixtures" / "phase_prompt_minimal.json"
SHARED_WORKFLOW = ROOT / "workflows" / "actavatar_timeline.json"
STUB_PACK = ROOT / "tests" / "browser" / "stub_pack"
ARTIFACTS = ROOT / "artifacts" / "browser"
AUDIO_NAME = "actavatar_speech.wav"
AUDIO_SECONDS = 3.0
NODE_CLASS = "ActAvatarPhasePrompt"
# Messages from our code: its files in a location or stack, its "[ActAvatar]" log prefix, its extension name.
OUR_CODE = re.compile(r"actavatar_timeline\.js|phase_model\.mjs|\[ActAvatar\]|ActAvatar\.PhaseTimeline")


# ------------------------------------------------------------------------------------------------ environment
def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate:
            found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
            if found:
                return found
    return None


def _real_pack_present() -> bool:
    """The repository itself is a ComfyUI pack once the node engineer's __init__.py and node exist."""
    if os.environ.get("ACTAVATAR_TIMELINE_STUB") == "1":
        return False
    if not (ROOT / "__init__.py").is_file():
        return False
    sources = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]
    return any(NODE_CLASS in p.read_text(encoding="utf-8", errors="replace") for p in sources)


def _speech_like_wav(seconds: float = AUDIO_SECONDS, rate: int = 16000) -> bytes:
    """Two 'words' (0-0.75 s and 1.5-2.25 s) of a 220 Hz tone under a smooth envelope, near-silence between."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = bytearray()
        for i in range(int(seconds * rate)):
            t = i / rate
            env = math.sin(math.pi * (t % 0.75) / 0.75) ** 2 if (t % 1.5) < 0.75 else 0.03
            frames += struct.pack("<h", int(12000 * env * math.sin(2 * math.pi * 220 * t)))
        w.writeframes(bytes(frames))
    return buf.getvalue()


@pytest.fixture(scope="module")
def comfy():
    comfy_dir = require_comfy_dir()
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium, or set CHROMIUM=/path/to/chrome)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    packs = {"actavatar_test_stub": STUB_PACK}
    env = {}
    if _real_pack_present():
        packs["ComfyUI-ActAvatar"] = ROOT
    else:
        env["ACTAVATAR_STUB_PHASE_PROMPT"] = "1"
    with running_comfy(comfy_dir, custom_nodes=packs, env=env, input_files={AUDIO_NAME: _speech_like_wav()}) as server:
        info = server.get_json(f"/object_info/{NODE_CLASS}")
        assert NODE_CLASS in info, f"{NODE_CLASS} is not registered\n{server.log_tail()}"
        yield server


@pytest.fixture(scope="module")
def browser(comfy):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A ComfyUI tab with console capture and helpers for the timeline widget."""

    def __init__(self, browser, comfy):
        self.comfy = comfy
        # A fresh context per test: ComfyUI restores open workflow tabs from browser storage.
        self.context = browser.new_context(viewport={"width": 1500, "height": 1000})
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.page_errors.append(f"{e}\n{getattr(e, 'stack', '') or ''}"))
        self.page.goto(comfy.url)
        self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.extensionManager", timeout=90000)
        self.page.wait_for_function(
            f"!!LiteGraph.registered_node_types['{NODE_CLASS}']", timeout=30000
        )

    def _on_console(self, msg):
        if msg.type in ("error", "warning"):
            loc = msg.location or {}
            self.console.append(f"{msg.type}: {msg.text} @ {loc.get('url', '')}")

    # ---------------------------------------------------------------------------------------- graph
    def load(self, workflow: dict) -> None:
        self.page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
        self.settle()

    def settle(self, ms: int = 400) -> None:
        self.page.evaluate("() => app.graph.setDirtyCanvas(true, true)")
        self.page.wait_for_timeout(ms)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def value(self, node_id: int) -> str:
        return self.js(
            "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'phase_script').value", node_id
        )

    def phases(self, node_id: int) -> list[list]:
        return [[p["start"], p["end"], p["text"]] for p in json.loads(self.value(node_id))["phases"]]

    def api_prompt(self) -> dict:
        return self.js("async () => (await app.graphToPrompt()).output")

    def workflow(self) -> dict:
        # Through JSON, as a saved file would be (no undefined -> null conversions).
        return self.js("() => JSON.parse(JSON.stringify(app.graph.serialize()))")

    def set_widget(self, node_id: int, name: str, value) -> None:
        self.js(
            "([id, name, v]) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === name); w.value = v; w.callback?.(v); }",
            [node_id, name, value],
        )
        self.settle()

    def tracker(self) -> tuple[int, int]:
        return tuple(
            self.js(
                "() => { const t = app.extensionManager.workflow.activeWorkflow.changeTracker; return [t.undoQueue.length, t.redoQueue.length]; }"
            )
        )

    # ---------------------------------------------------------------------------------------- timeline
    def tl(self, node_id: int):
        return self.page.locator(f'.aa-tl[data-node-id="{node_id}"]')

    def wait_timeline(self, node_id: int) -> None:
        self.tl(node_id).wait_for(state="visible", timeout=15000)

    def x_of(self, node_id: int, t: float) -> tuple[float, float]:
        track = self.tl(node_id).locator(".aa-track")
        box = track.bounding_box()
        span = float(track.get_attribute("data-span"))
        return box["x"] + t / span * box["width"], box["y"] + box["height"] * 0.3

    def drag(self, node_id: int, t0: float, t1: float, *, x_offset0: float = 0.0) -> None:
        x0, y = self.x_of(node_id, t0)
        x1, _ = self.x_of(node_id, t1)
        x0 += x_offset0
        m = self.page.mouse
        m.move(x0, y)
        m.down()
        for k in range(1, 11):
            m.move(x0 + (x1 - x0) * k / 10, y)
        m.up()
        self.page.wait_for_timeout(100)

    def drag_edge(self, node_id: int, t_edge: float, t_to: float, side: str) -> None:
        self.drag(node_id, t_edge, t_to, x_offset0=-2.5 if side == "end" else 2.5)

    def click_at(self, node_id: int, t: float) -> None:
        x, y = self.x_of(node_id, t)
        self.page.mouse.click(x, y)
        self.page.wait_for_timeout(100)

    def status(self, node_id: int) -> str:
        return self.tl(node_id).locator(".aa-status").inner_text()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path

    def our_errors(self) -> list[str]:
        return [line for line in self.console + self.page_errors if OUR_CODE.search(line)]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(browser, comfy):
    comfy.set_setting("Comfy.ColorPalette", "dark")  # settings live on the server; a test may have changed it
    page = Page(browser, comfy)
    try:
        yield page
        assert page.our_errors() == [], "console errors from the ActAvatar extension:\n" + "\n".join(page.our_errors())
    finally:
        page.close()


def _fixture_workflow() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _phase_nodes(workflow: dict) -> list[int]:
    return [n["id"] for n in workflow["nodes"] if n["type"] == NODE_CLASS]


def _subgraph(prompt: dict, roots: list[str]) -> dict:
    """roots and everything they read from."""
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        keep.add(nid)
        for value in prompt[nid]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                todo.append(value[0])
    return {k: v for k, v in prompt.items() if k in keep}


def _queue_with_probes(ui: Page, prompt: dict, node_ids: list[int], workflow: dict) -> dict[int, str]:
    """POST /prompt: the Phase Prompt nodes, what they read, and a probe on each; return what each probe saw."""
    sub = _subgraph(prompt, [str(n) for n in node_ids])
    probes = {}
    for n in node_ids:
        probe_id = f"probe{n}"
        sub[probe_id] = {"class_type": "ActAvatarTestPhaseProbe", "inputs": {"phase_prompt": [str(n), 0]}}
        probes[n] = probe_id
    status, body = ui.comfy.post_json(
        "/prompt", {"prompt": sub, "client_id": uuid.uuid4().hex, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    )
    assert status == 200, f"POST /prompt was refused: {json.dumps(body)[:3000]}"
    assert body.get("node_errors") == {}, body
    entry = ui.comfy.wait_for_prompt(body["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return {n: entry["outputs"][probe_id]["phase_script"][0] for n, probe_id in probes.items()}


# ------------------------------------------------------------------------------------------------ tests
def test_mouse_editing_reaches_the_api_prompt_and_the_engine(ui: Page):
    """Create, move, resize and edit phases with the mouse; the API prompt and the engine get exactly that."""
    # The shared workflow needs the real pack's other nodes; the stand-in setup uses the minimal fixture.
    using_shared = SHARED_WORKFLOW.is_file() and _real_pack_present()
    workflow = json.loads(SHARED_WORKFLOW.read_text(encoding="utf-8")) if using_shared else _fixture_workflow()
    ui.load(workflow)
    # The frontend under test is the one asked for: COMFYUI_FRONTEND_ROOT's release, else the installed package.
    root = frontend_root_from_env()
    if root is not None:
        expected = frontend_version(root)
    else:
        from importlib.metadata import version

        expected = version("comfyui-frontend-package")
    assert ui.js("() => window.__COMFYUI_FRONTEND_VERSION__") == expected
    # The extension is one script (phase_model.mjs is imported by it, never listed as an extension of its own),
    # registered once even when the web folder is served under two names.
    ours = [e for e in ui.comfy.get_json("/extensions") if "actavatar" in e.lower() or "phase_model" in e]
    assert ours and all(e.endswith("/js/actavatar_timeline.js") for e in ours), ours
    assert ui.js("() => app.extensions.filter(e => e.name === 'ActAvatar.PhaseTimeline').length") == 1
    node = _phase_nodes(workflow)[0]
    ui.set_widget(node, "duration", 0)
    ui.set_widget(node, "fps", 25)
    ui.set_widget(node, "phase_script", PhaseScript(base="A woman in a red blazer talks to the camera").dumps())
    ui.wait_timeline(node)
    tl = ui.tl(node)

    audio_connected = ui.js(
        "(id) => { const n = app.graph.getNodeById(id); const i = n.inputs.find(i => i.name === 'audio'); "
        "return !!(i && i.link != null && n.getInputNode(n.inputs.indexOf(i))?.type === 'LoadAudio'); }",
        node,
    )
    if audio_connected:
        ui.set_widget(ui.js("(id) => { const n = app.graph.getNodeById(id); return n.getInputNode(n.inputs.findIndex(i => i.name === 'audio')).id; }", node), "audio", AUDIO_NAME)
        # The waveform of the connected LoadAudio file sets the clip length.
        tl.locator(".aa-clip").filter(has_text=f"Clip 3 s (audio '{AUDIO_NAME}')").wait_for(timeout=20000)
        lit = ui.js(
            """(id) => { const c = document.querySelector(`.aa-tl[data-node-id="${id}"] .aa-wave`);
                 const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return [n, c.width * c.height]; }""",
            node,
        )
        assert lit[0] > 0.02 * lit[1], f"no waveform drawn: {lit}"
        clip_end = AUDIO_SECONDS
    else:
        ui.set_widget(node, "duration", AUDIO_SECONDS)
        clip_end = AUDIO_SECONDS
    assert float(tl.locator(".aa-track").get_attribute("data-span")) == pytest.approx(clip_end)

    # create by dragging on empty time, then type the action
    ui.drag(node, 0.3, 1.2)
    assert tl.locator(".aa-text").evaluate("e => e === document.activeElement")
    ui.page.keyboard.type("waves with the right hand")
    ui.page.keyboard.press("Enter")
    assert ui.phases(node) == [[0.3, 1.2, "waves with the right hand"]]
    # move by dragging the block
    ui.drag(node, 0.75, 1.25)
    assert ui.phases(node) == [[0.8, 1.7, "waves with the right hand"]]
    # resize by its edges
    ui.drag_edge(node, 1.7, 2.2, "end")
    assert ui.phases(node) == [[0.8, 2.2, "waves with the right hand"]]
    ui.drag_edge(node, 0.8, 0.5, "start")
    assert ui.phases(node) == [[0.5, 2.2, "waves with the right hand"]]
    # a drag past the clip is clamped, and the user is told why
    ui.drag(node, 2.4, clip_end + 0.6)
    assert "end of the clip (3 s)" in ui.status(node)
    ui.page.keyboard.type("points down")
    ui.page.keyboard.press("Enter")
    assert ui.phases(node) == [[0.5, 2.2, "waves with the right hand"], [2.4, 3, "points down"]]
    # a move into the neighbour stops at it
    ui.drag(node, 2.7, 1.0)
    assert "Stopped at phase 1" in ui.status(node)
    assert ui.phases(node)[1][:2] == [2.2, 2.8]
    # select the first phase and change its text; change the base prompt
    ui.click_at(node, 1.0)
    text = tl.locator(".aa-text")
    assert text.input_value() == "waves with the right hand"
    text.fill("waves hello with the right hand")
    text.press("Enter")
    tl.locator(".aa-base").fill("A woman in a red blazer talks to the camera, studio light")
    tl.locator(".aa-base").blur()
    value = ui.value(node)
    expected = [[0.5, 2.2, "waves hello with the right hand"], [2.2, 2.8, "points down"]]
    assert ui.phases(node) == expected
    # the value is exactly the engine's phase-script JSON (PhaseScript.dumps form), valid for this clip
    script = PhaseScript.from_json(value)
    assert script.dumps() == value
    assert script.problems(clip_end, 25.0) == []
    assert script.base == "A woman in a red blazer talks to the camera, studio light"
    assert tl.locator(".aa-problems li").count() == 0
    ui.shot("edit_dark.png")

    # saved workflow (widgets_values) and API prompt carry the same string
    saved = ui.workflow()
    saved_node = next(n for n in saved["nodes"] if n["id"] == node)
    assert saved_node["widgets_values"][0] == value
    prompt = ui.api_prompt()
    assert prompt[str(node)]["inputs"]["phase_script"] == value

    # reload the saved workflow: same phases on the timeline and in the API prompt
    ui.load(saved)
    ui.wait_timeline(node)
    assert ui.value(node) == value
    assert ui.tl(node).locator(".aa-block").count() == 2
    assert ui.tl(node).locator(".aa-block .aa-label").all_inner_texts() == ["waves hello with the right hand", "points down"]
    prompt = ui.api_prompt()
    assert prompt[str(node)]["inputs"]["phase_script"] == value

    # queued through the API, the engine reads exactly these phases (and the hand-written node's phases)
    nodes = _phase_nodes(saved)
    seen = _queue_with_probes(ui, prompt, nodes, saved)
    assert seen[node] == value
    for other in nodes:
        if other != node:
            assert seen[other] == PhaseScript.parse(ui.value(other)).dumps()


def test_keyboard_undo_redo_and_engine_rejections_marked(ui: Page):
    """Nudge/delete with keys, undo/redo through ComfyUI's change tracker, and phases the engine would reject."""
    workflow = _fixture_workflow()
    ui.load(workflow)
    node = 4  # duration 8 s, 24 fps, hand-written compact value
    ui.wait_timeline(node)
    tl = ui.tl(node)
    compact = "A man in a grey suit talks to the camera | 0.5-2s: waves with the left hand | 3-4.2s: nods"
    assert ui.value(node) == compact, "a hand-written value must not be rewritten on load"
    assert tl.locator(".aa-block .aa-label").all_inner_texts() == ["waves with the left hand", "nods"]
    nodes_before = ui.js("() => app.graph.nodes.length")

    ui.click_at(node, 3.5)
    assert "Phase 2" in tl.locator(".aa-which").inner_text()
    ui.page.keyboard.press("ArrowRight")
    assert ui.phases(node)[1][:2] == [3.1, 4.3]
    ui.page.keyboard.press("Shift+ArrowRight")
    assert ui.phases(node)[1][:2] == [4.1, 5.3]
    undo_before = ui.tracker()[0]
    ui.page.keyboard.press("Delete")
    ui.page.wait_for_timeout(200)
    assert ui.phases(node) == [[0.5, 2, "waves with the left hand"]]
    assert ui.status(node) == "Phase 2 deleted (Ctrl+Z undoes)."
    assert ui.js("() => app.graph.nodes.length") == nodes_before, "Delete on the timeline must not delete the node"
    assert ui.tracker()[0] == undo_before + 1, "the delete must be one undo step"

    ui.page.keyboard.press("Control+z")
    ui.page.wait_for_timeout(600)
    assert [p[:2] for p in ui.phases(node)] == [[0.5, 2], [4.1, 5.3]]
    ui.page.keyboard.press("Control+z")
    ui.page.wait_for_timeout(600)
    assert [p[:2] for p in ui.phases(node)] == [[0.5, 2], [3.1, 4.3]]
    ui.page.keyboard.press("Control+y")
    ui.page.wait_for_timeout(600)
    assert [p[:2] for p in ui.phases(node)] == [[0.5, 2], [4.1, 5.3]]
    ui.wait_timeline(node)
    tl = ui.tl(node)

    # delete with the button
    ui.click_at(node, 4.5)
    tl.locator(".aa-delete").click()
    assert ui.phases(node) == [[0.5, 2, "waves with the left hand"]]
    assert ui.status(node) == "Phase 2 deleted (Ctrl+Z undoes)."
    ui.page.keyboard.press("Control+z")
    ui.page.wait_for_timeout(600)
    ui.wait_timeline(node)
    tl = ui.tl(node)
    assert len(ui.phases(node)) == 2

    # a drag into the neighbour is clamped and explained
    ui.drag(node, 1.0, 5.0)
    assert "Stopped at phase 2" in ui.status(node)
    assert ui.phases(node)[0][:2] == [2.6, 4.1]
    assert tl.locator(".aa-status.warn").count() == 1

    # phases the engine would reject are marked before queueing
    ui.set_widget(node, "duration", 4.5)  # phase 2 (4.1-5.3) now ends beyond the clip
    bad = tl.locator(".aa-block.bad")
    assert bad.count() == 1
    assert bad.get_attribute("data-problem") in ("after_clip_end", "start_after_clip")
    assert "beyond the clip" in bad.inner_text()
    assert "ends after the clip, which is 4.5 s long" in tl.locator(".aa-problems").inner_text()
    assert tl.locator(".aa-pin").count() == 1
    # a new phase without text, too short for a latent frame at 24 fps (frames at 2.27 s and 2.44 s): [2.3, 2.4)
    ui.set_widget(node, "duration", 8)
    ui.drag(node, 1.9, 2.4)  # lands in the gap before phase 1 (2.6-4.1)
    ui.page.keyboard.press("Escape")
    ui.drag_edge(node, 1.9, 2.3, "start")
    blocks = tl.locator(".aa-block")
    assert [p[:2] for p in ui.phases(node)][0] == [2.3, 2.4]
    first = blocks.nth(0)
    assert first.get_attribute("data-problem") == "text_empty"
    ui.click_at(node, 2.35)
    tl.locator(".aa-text").fill("blinks")
    tl.locator(".aa-text").press("Enter")
    assert tl.locator(".aa-block").nth(0).get_attribute("data-problem") == "too_short"
    problems = tl.locator(".aa-problems").inner_text()
    assert "is too short: no latent frame falls inside it at 24 fps" in problems
    # the same verdict as the engine
    engine = PhaseScript.parse(ui.value(node)).problems(8.0, 24.0)
    assert any("too short" in p for p in engine)
    assert [m.strip() for m in tl.locator(".aa-problems li").all_inner_texts()] == engine
    ui.shot("engine_rejections_dark.png")
    # and ComfyUI refuses it too: at queue time (the real node's VALIDATE_INPUTS) or when the node runs (stand-in)
    sub = _subgraph(ui.api_prompt(), [str(node)])
    sub["probe"] = {"class_type": "ActAvatarTestPhaseProbe", "inputs": {"phase_prompt": [str(node), 0]}}
    status, body = ui.comfy.post_json("/prompt", {"prompt": sub, "client_id": uuid.uuid4().hex})
    if status == 200:
        entry = ui.comfy.wait_for_prompt(body["prompt_id"], timeout=120)
        assert entry["status"]["status_str"] == "error"
        body = entry["status"]
    else:
        assert status == 400
    assert "too short" in json.dumps(body), json.dumps(body)[:3000]


def test_themes_zoom_resize_and_two_nodes(ui: Page):
    """Usable in the light theme, zoomed in, on a resized node; two Phase Prompt nodes stay independent."""
    workflow = _fixture_workflow()
    ui.load(workflow)
    a, b = 2, 4
    ui.wait_timeline(a)
    ui.wait_timeline(b)
    b_value = ui.value(b)
    ui.drag(a, 0.2, 1.0)
    ui.page.keyboard.type("nods")
    ui.page.keyboard.press("Enter")
    assert ui.phases(a) == [[0.2, 1.0, "nods"]]
    assert ui.value(b) == b_value, "editing one node must not touch the other"
    ui.shot("two_nodes_dark.png")

    ui.js("() => app.extensionManager.setting.set('Comfy.ColorPalette', 'light')")
    ui.page.wait_for_function("getComputedStyle(document.documentElement).getPropertyValue('--comfy-input-bg').trim().toUpperCase() === '#C9C9C9'")
    ui.settle(600)
    bg = ui.tl(a).locator(".aa-timeline").evaluate("e => getComputedStyle(e).backgroundColor")
    fg = ui.tl(a).locator(".aa-base").evaluate("e => getComputedStyle(e).color")
    assert bg == "rgb(201, 201, 201)", bg  # follows --comfy-input-bg
    assert fg == "rgb(34, 34, 34)", fg  # follows --input-text
    ui.shot("two_nodes_light.png")

    # zoomed in: drags still map to the right times
    ui.js("() => { app.canvas.ds.changeScale(1.4, [450, 150]); app.canvas.setDirty(true, true); }")
    ui.settle(600)
    box = ui.tl(a).locator(".aa-track").bounding_box()
    assert box["width"] > 600, f"the widget did not scale with the canvas: {box}"
    ui.drag(a, 1.5, 2.5)
    ui.page.keyboard.type("points at the viewer")
    ui.page.keyboard.press("Enter")
    assert ui.phases(a) == [[0.2, 1.0, "nods"], [1.5, 2.5, "points at the viewer"]]
    ui.shot("zoomed_light.png")

    # resized node: the timeline follows the new width
    ui.js("() => { app.canvas.ds.changeScale(1.0, [450, 150]); app.canvas.setDirty(true, true); }")
    ui.js("(id) => { const n = app.graph.getNodeById(id); n.setSize([900, 640]); n.onResize?.(n.size); app.graph.setDirtyCanvas(true, true); }", a)
    ui.settle(600)
    wide = ui.tl(a).locator(".aa-track").bounding_box()
    assert wide["width"] > 800, wide
    ui.drag(a, 1.5, 1.8)  # move phase 2 right by 0.3 s
    assert ui.phases(a)[1][:2] == [1.8, 2.8]
    ui.shot("resized_light.png")
    assert ui.value(b) == b_value

    # the snapping step is configurable per node (kept in the workflow, not in the API prompt)
    ui.tl(b).locator(".aa-snap").select_option("0.5")
    ui.drag(b, 5.1, 6.3)
    assert ui.phases(b)[-1][:2] == [5.0, 6.5]
    saved = next(n for n in ui.workflow()["nodes"] if n["id"] == b)
    assert saved["properties"]["actavatar_snap"] == 0.5
    assert "actavatar_snap" not in ui.api_prompt()[str(b)]["inputs"]

    # no audio and duration 0: the length is unknown, the timeline says so and spans the phases
    ui.set_widget(b, "duration", 0)
    assert "Duration unknown" in ui.tl(b).locator(".aa-clip").inner_text()
    assert float(ui.tl(b).locator(".aa-track").get_attribute("data-span")) == 10
    marks = [e.get_attribute("data-problem") for e in ui.tl(b).locator(".aa-block.bad").all()]
    assert marks == ["text_empty"], marks  # the new phase has no text; nothing is checked against the clip yet


def test_invalid_value_is_shown_and_kept(ui: Page):
    """A broken value is shown with its error and saved/sent unchanged until the user edits it."""
    workflow = _fixture_workflow()
    broken = '{"version": 1, "base": "x", "phases": [{"start": "2", "end": 3, "text": "a"}]}'
    not_json = '{"version": 1, "base": "A man talks", "phases": [{"start": 0, "end": 2, "text": "waves"}'
    for n in workflow["nodes"]:
        if n["id"] == 2:
            n["widgets_values"][0] = broken
        if n["id"] == 4:
            n["widgets_values"][0] = not_json
    ui.load(workflow)
    ui.wait_timeline(2)
    tl = ui.tl(2)
    assert "Phase entry 1 has start = '2', which is not a finite number of seconds." in tl.locator(".aa-problems").inner_text()
    assert "kept exactly as it is" in ui.status(2)
    assert not tl.locator(".aa-timeline").is_visible()
    assert tl.locator(".aa-raw").is_visible()
    assert tl.locator(".aa-raw").input_value() == broken
    assert "is not valid JSON" in ui.tl(4).locator(".aa-problems").inner_text()
    # looking at it (focus and leave the text view) changes nothing
    tl.locator(".aa-raw").click()
    ui.page.keyboard.press("End")
    tl.locator(".aa-raw").blur()
    assert ui.value(2) == broken
    assert ui.value(4) == not_json
    assert next(n for n in ui.workflow()["nodes"] if n["id"] == 2)["widgets_values"][0] == broken
    prompt = ui.api_prompt()
    assert prompt["2"]["inputs"]["phase_script"] == broken
    assert prompt["4"]["inputs"]["phase_script"] == not_json
    ui.shot("invalid_dark.png")

    # fixing the text brings the timeline back; the typed text is kept as typed
    fixed = not_json + "]}"
    raw = ui.tl(4).locator(".aa-raw")
    raw.fill(fixed)
    raw.blur()
    assert ui.value(4) == fixed
    assert ui.tl(4).locator(".aa-problems li").count() == 0
    ui.tl(4).locator(".aa-rawbtn").click()  # back from the text view to the timeline
    assert ui.tl(4).locator(".aa-timeline").is_visible()
    assert ui.tl(4).locator(".aa-block .aa-label").all_inner_texts() == ["waves"]
    assert ui.value(4) == fixed, "showing the timeline must not rewrite the value"
    # the first edit on the timeline writes the contract's canonical form
    ui.drag(4, 1.0, 1.5)
    assert ui.value(4) == json.dumps(
        {"version": 1, "base": "A man talks", "negative": "", "phases": [{"start": 0.5, "end": 2.5, "text": "waves"}]}
    )


def test_phase_colours_stay_with_their_phases(ui: Page):
    """Adding a phase in front of others, deleting one, undoing and reloading never recolours the other phases."""
    workflow = _fixture_workflow()
    ui.load(workflow)
    node = 4  # 0.5-2 s "waves with the left hand", 3-4.2 s "nods"; 8 s at 24 fps
    ui.wait_timeline(node)

    def colours() -> dict[str, tuple[str, str]]:
        """phase text -> (colour slot, the block's painted background)"""
        blocks = ui.tl(node).locator(".aa-block").evaluate_all(
            "bs => bs.map(b => [b.querySelector('.aa-label').innerText, b.dataset.colour, "
            "getComputedStyle(b).backgroundImage])")
        return {text: (slot, paint) for text, slot, paint in blocks}

    start = colours()
    assert list(start) == ["waves with the left hand", "nods"]
    assert start["waves with the left hand"][1] != start["nods"][1]

    ui.drag(node, 0.1, 0.4)  # a new first phase
    ui.page.keyboard.type("blinks")
    ui.page.keyboard.press("Enter")
    assert [p[2] for p in ui.phases(node)] == ["blinks", "waves with the left hand", "nods"]
    added = colours()
    assert {k: added[k] for k in start} == start
    assert added["blinks"][1] not in {v[1] for v in start.values()}
    ui.shot("colours_added_dark.png")

    ui.click_at(node, 1.0)  # delete the (now second) phase "waves..."
    ui.page.keyboard.press("Delete")
    ui.page.wait_for_timeout(200)
    assert ui.status(node) == "Phase 2 deleted (Ctrl+Z undoes)."
    assert colours() == {k: added[k] for k in ("blinks", "nods")}

    ui.page.keyboard.press("Control+z")
    ui.page.wait_for_timeout(600)
    ui.wait_timeline(node)
    assert colours() == added, "undo brings the deleted phase back in its own colour"

    ui.load(ui.workflow())  # saved and opened again
    ui.wait_timeline(node)
    assert colours() == added
