"""The pack inside a real ComfyUI server (v0.8.0 at COMFYUI_DIR), driven over HTTP and the WebSocket.

One ComfyUI (module-scoped) runs on the CPU in a temporary base directory: the repository is symlinked into its
custom_nodes, its models/ folder holds tiny checkpoints in the community layouts (the real file names), and
nothing is written to COMFYUI_DIR. The shipped API workflows are queued with the tiny files' names substituted;
the UI workflows are converted with the server's own /object_info and compared with them.

Run: COMFYUI_DIR=/work/ComfyUI pytest tests/integration/test_comfyui_server.py
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from comfy_server import ComfyServer, require_comfy_dir, start_comfy  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKFLOWS = ROOT / "workflows"
PACK = "ComfyUI-ActAvatar"
STEPS = 3
#: node id of the sampler / phase prompt / save node in both shipped workflows
SAMPLER, PHASE, LOADERS = "10", "7", ("1", "2", "3", "4")


# ============================================================================================ WebSocket
class WsListener:
    """Collects the server's WebSocket messages (JSON, and a count of binary preview frames) in a thread, using
    aiohttp (ComfyUI's own dependency)."""

    def __init__(self, server: ComfyServer):
        import aiohttp  # noqa: F401 - checked before the thread starts

        self.client_id = uuid.uuid4().hex
        self.url = f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}"
        self.messages: list[dict[str, Any]] = []
        self.binary = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._ws = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError(f"WebSocket did not connect: {self._error!r}")

    async def _run(self) -> None:
        import aiohttp

        try:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url, max_msg_size=0) as ws:
                    self._ws = ws
                    self._ready.set()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(msg.data))
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            self.binary += 1
        except BaseException as exc:  # noqa: BLE001 - reported by wait_for
            self._error = exc
            self._ready.set()

    def of(self, kind: str, prompt_id: str | None = None) -> list[dict[str, Any]]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind
                and (prompt_id is None or m.get("data", {}).get("prompt_id") == prompt_id)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, server: ComfyServer) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self._error is not None:
                raise RuntimeError(f"WebSocket failed: {self._error!r}")
            server.check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"no matching WebSocket message in {timeout} s; last: {self.messages[-5:]}\n"
                           f"{server.log_tail()}")

    def wait_done(self, prompt_id: str, server: ComfyServer, timeout: float = 180) -> str:
        """'execution_success', 'execution_error' or 'execution_interrupted' for the prompt."""
        kinds = ("execution_success", "execution_error", "execution_interrupted")
        return self.wait_for(lambda: next((k for k in kinds if self.of(k, prompt_id)), None), timeout, server)

    def close(self) -> None:
        if self._ws is not None:
            asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(10)
        self._thread.join(10)


# ============================================================================================ fixtures
@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """(server, {model folder: tiny file name}) for the whole module: one ComfyUI start."""
    comfy_dir = require_comfy_dir()
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI requirement) is needed for the WebSocket")
    from test_nodes import write_tiny_comfy_models

    from nodes.model_folders import MINI_FILES

    base = tmp_path_factory.mktemp("comfy-base")
    names = write_tiny_comfy_models(base / "models")
    # The same tiny files under the bundled mini model's names too, so the shipped workflows run unmodified (as
    # they do once the mini model is installed).
    for folder, mini in MINI_FILES.items():
        (base / "models" / folder / mini).hardlink_to(base / "models" / folder / names[folder])
    server = start_comfy(comfy_dir, base_dir=base, custom_nodes={PACK: ROOT},
                         extra_args=["--preview-method", "latent2rgb"])
    try:
        yield server, names
    finally:
        server.stop()


@pytest.fixture
def ws(comfy):
    listener = WsListener(comfy[0])
    yield listener
    listener.close()


def api_workflow(name: str, names: dict[str, str], **sampler: Any) -> dict[str, Any]:
    """A shipped API workflow with the tiny files' names and small sizes substituted."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    prompt["1"]["inputs"].update(model_name=names["diffusion_models"], actavatar_weights=names["actavatar"])
    prompt["2"]["inputs"]["text_encoder_name"] = names["text_encoders"]
    prompt["3"]["inputs"]["vae_name"] = names["vae"]
    prompt["4"]["inputs"]["audio_encoder_name"] = names["audio_encoders"]
    prompt[SAMPLER]["inputs"].update({"width": 64, "height": 64, "steps": STEPS, **sampler})
    return prompt


def queue(server: ComfyServer, prompt: dict, client_id: str | None = None, workflow: dict | None = None) -> str:
    body: dict[str, Any] = {"prompt": prompt}
    if client_id:
        body["client_id"] = client_id
    if workflow is not None:
        body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
    status, answer = server.post_json("/prompt", body)
    assert status == 200, answer
    assert answer["node_errors"] == {}
    return answer["prompt_id"]


def output_files(server: ComfyServer) -> set[Path]:
    return {p for p in (server.base_dir / "output").rglob("*") if p.is_file()}


def expected_frames(server: ComfyServer, prompt: dict) -> int:
    from actavatar_core.audio import load_waveform
    from actavatar_core.phases import frames_for_duration

    speech = load_waveform(str(server.base_dir / "input" / prompt["6"]["inputs"]["audio"]))
    return frames_for_duration(speech.duration, prompt[PHASE]["inputs"]["fps"])


def check_mp4(path: Path, frames: int, fps: float, metadata: tuple[str, ...] = (), size: int = 64) -> dict:
    from actavatar_core.video import probe_video

    info = probe_video(path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac", info
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (frames, fps, size, size)
    assert abs(info["audio_duration"] - frames / fps) < 0.06
    for key in metadata:
        assert key in info["metadata"], (key, list(info["metadata"]))
    return info


# ============================================================================================ tests
def test_pack_loads_with_every_node(comfy):
    server, names = comfy
    from nodes import NODES

    log = server.log_tail(200_000)
    assert "Cannot import" not in log and "ActAvatar: missing" not in log, log[-3000:]
    info = server.get_json("/object_info")
    for node_id, (cls, display) in NODES.items():
        assert node_id in info, f"{node_id} is not registered\n{log[-3000:]}"
        entry = info[node_id]
        assert entry["display_name"] == display and entry["category"] == cls.CATEGORY
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert list(entry["input"].get(section, {})) == list(types.get(section, {})), (node_id, section)
        assert list(entry["output"]) == list(cls.RETURN_TYPES)
    assert info["ActAvatarSaveVideo"]["output_node"] is True
    loader = info["ActAvatarModelLoader"]["input"]["required"]
    assert names["diffusion_models"] in loader["model_name"][0]
    assert loader["actavatar_weights"][0][0] == "none" and names["actavatar"] in loader["actavatar_weights"][0]  # models/actavatar
    assert server.get_json("/system_stats")["devices"][0]["type"] == "cpu"
    extensions = server.get_json("/extensions")
    assert any(e.endswith("actavatar_timeline.js") for e in extensions), extensions
    for demo in ("actavatar_demo_reference.png", "actavatar_demo_speech.wav"):  # copied on first load
        assert (server.base_dir / "input" / demo).is_file()


def _widget_names(entry: dict) -> list[str | None]:
    """Widget order of a node as the frontend builds it from /object_info (None: UI-only widget values)."""
    out: list[str | None] = []
    for section in ("required", "optional"):
        for name in entry["input_order"].get(section, []):
            spec = entry["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append(name)
                if options.get("control_after_generate"):
                    out.append(None)
                if options.get("image_upload"):
                    out.append(None)  # the upload button's value
                if options.get("audio_upload"):
                    out += [None, None]  # the upload button and the audio player
    return out


@pytest.mark.parametrize("name", ["actavatar_timeline", "actavatar_core_video"])
def test_ui_workflow_has_no_missing_nodes_and_matches_the_api_file(comfy, name):
    server, _ = comfy
    info = server.get_json("/object_info")
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    links = {link[0]: link for link in ui["links"]}
    missing = sorted({n["type"] for n in ui["nodes"]} - set(info))
    assert missing == []
    for node in ui["nodes"]:
        entry = info[node["type"]]
        widgets = _widget_names(entry)
        assert len(widgets) == len(node["widgets_values"]), node["type"]
        inputs = {w: v for w, v in zip(widgets, node["widgets_values"]) if w is not None}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
                assert slot["name"] in {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        assert inputs == api[str(node["id"])]["inputs"], node["type"]
        for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
            if dst == node["id"]:
                source = next(n for n in ui["nodes"] if n["id"] == src)
                assert info[source["type"]]["output"][src_slot] == kind


def test_shipped_timeline_workflow_runs_unmodified_with_progress_and_writes_the_mp4(comfy, ws):
    """The API file exactly as shipped (bundled mini model names, example inputs, 128x128, 20 steps)."""
    server, _ = comfy
    prompt = json.loads((WORKFLOWS / "api" / "actavatar_timeline.json").read_text(encoding="utf-8"))
    steps = prompt[SAMPLER]["inputs"]["steps"]
    ui = json.loads((WORKFLOWS / "actavatar_timeline.json").read_text(encoding="utf-8"))
    prompt_id = queue(server, prompt, ws.client_id, workflow=ui)
    assert ws.wait_done(prompt_id, server) == "execution_success", server.log_tail()
    ticks = [(p["value"], p["max"]) for p in ws.of("progress", prompt_id) if p["node"] == SAMPLER]
    assert ticks[:steps] == [(i, steps) for i in range(1, steps + 1)]
    assert ws.binary >= 1  # latent previews (--preview-method latent2rgb)
    executed = [m for m in ws.of("executed", prompt_id) if m["node"] == "12"]
    saved = executed[0]["output"]["images"][0]
    assert saved["type"] == "output" and saved["subfolder"] == "ActAvatar" and saved["filename"].endswith(".mp4")
    path = server.base_dir / "output" / saved["subfolder"] / saved["filename"]
    info = check_mp4(path, expected_frames(server, prompt), 25.0, metadata=("prompt", "workflow"),
                     size=prompt[SAMPLER]["inputs"]["width"])
    assert json.loads(info["metadata"]["prompt"])[SAMPLER]["class_type"] == "ActAvatarSampler"
    status, body = server.request("GET", f"/view?filename={saved['filename']}&subfolder=ActAvatar&type=output")
    assert status == 200 and body == path.read_bytes()
    # Our models went through ComfyUI's model management (ModelPatcher + load_models_gpu).
    log = server.log_tail(200_000)
    assert "Requested to load ActAvatarTransformer" in log and "Requested to load ActAvatarAutoencoderKLWan" in log


def test_core_video_workflow_runs_and_requeue_reuses_the_loaded_models(comfy, ws):
    server, names = comfy
    prompt = api_workflow("actavatar_core_video", names, seed=7)
    prompt["3"]["inputs"]["device"] = "offload_after_use"  # the VAE goes back to RAM after each use
    first = queue(server, prompt, ws.client_id)
    assert ws.wait_done(first, server) == "execution_success", server.log_tail()
    saved = [m for m in ws.of("executed", first) if m["node"] == "13"][0]["output"]["images"][0]
    path = server.base_dir / "output" / saved["subfolder"] / saved["filename"]
    check_mp4(path, expected_frames(server, api_workflow("actavatar_core_video", names)), 25.0)
    prompt["10"]["inputs"]["seed"] = 8
    del prompt["10"]["inputs"]["phase_cfg"]  # as API prompts saved before phase guidance existed: still valid
    again = queue(server, prompt, ws.client_id)
    assert ws.wait_done(again, server) == "execution_success", server.log_tail()
    cached = set(ws.of("execution_cached", again)[0]["nodes"])
    assert set(LOADERS) | {PHASE, "8", "9"} <= cached and SAMPLER not in cached


def test_bad_phase_script_is_refused_at_queue_time(comfy):
    server, names = comfy
    before = server.get_json("/queue")
    prompt = api_workflow("actavatar_timeline", names)
    prompt[PHASE]["inputs"]["phase_script"] = ("A man talks | 0-2s: raises the left hand | 1-2.5s: waves the right "
                                               "hand")
    status, answer = server.post_json("/prompt", {"prompt": prompt})
    assert status == 400
    details = " ".join(e["details"] for e in answer["node_errors"][PHASE]["errors"])
    assert "overlap" in details and "Fix:" in details and "phase_script" in details
    assert answer["node_errors"][PHASE]["class_type"] == "ActAvatarPhasePrompt"
    prompt = api_workflow("actavatar_timeline", names, width=70)
    status, answer = server.post_json("/prompt", {"prompt": prompt})
    assert status == 400 and "multiple of 32" in json.dumps(answer["node_errors"][SAMPLER])
    assert server.get_json("/queue") == before  # nothing was queued


def test_interrupt_mid_sampling_leaves_no_file_and_comfyui_healthy(comfy, ws):
    server, names = comfy
    before = output_files(server)
    long_run = queue(server, api_workflow("actavatar_timeline", names, steps=1000, seed=11), ws.client_id)
    ws.wait_for(lambda: [p for p in ws.of("progress", long_run) if p["node"] == SAMPLER], 120, server)
    status, _ = server.request("POST", "/interrupt", {})
    assert status == 200
    assert ws.wait_done(long_run, server, timeout=60) == "execution_interrupted", server.log_tail()
    steps_done = max(p["value"] for p in ws.of("progress", long_run) if p["node"] == SAMPLER)
    assert steps_done < 1000
    assert output_files(server) == before  # no video and no temporary file
    # ComfyUI stays healthy: the next prompt runs to the end.
    follow_up = queue(server, api_workflow("actavatar_timeline", names, seed=12), ws.client_id)
    assert ws.wait_done(follow_up, server) == "execution_success", server.log_tail()
    new = output_files(server) - before
    assert len(new) == 1 and next(iter(new)).suffix == ".mp4"


# ============================================================================================ the real frontend
def _chromium() -> str | None:
    import os
    import shutil

    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


def test_ui_workflows_load_in_the_frontend_and_queue_as_the_api_files(comfy):
    """ComfyUI's own frontend (1.35.9) loads each UI workflow with every node type known and no missing-nodes or
    missing-models dialog, and its UI -> API conversion (graphToPrompt) gives exactly the API file."""
    server, _ = comfy
    info = server.get_json("/object_info")
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium, or set CHROMIUM=/path)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90000)
            page.wait_for_function("!!LiteGraph.registered_node_types['ActAvatarSampler']", timeout=30000)
            for name in ("actavatar_timeline", "actavatar_core_video"):
                ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
                api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
                page.evaluate("async (wf) => { await app.loadGraphData(wf); }", ui)
                page.wait_for_timeout(500)
                types = page.evaluate("() => app.graph.nodes.map(n => [n.type, !!LiteGraph.registered_node_types[n.type]])")
                assert sorted(t for t, _ in types) == sorted(n["type"] for n in ui["nodes"])
                assert all(known for _, known in types), types
                dialogs = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText)")
                assert not [d for d in dialogs if "missing" in d.lower()], dialogs
                output = page.evaluate("async () => (await app.graphToPrompt()).output")
                assert {k: v["class_type"] for k, v in output.items()} == {k: v["class_type"] for k, v in api.items()}
                for node_id, node in api.items():
                    declared = info[node["class_type"]]["input"]
                    declared = {**declared.get("required", {}), **declared.get("optional", {})}
                    # The frontend also sends values of UI-only widgets (LoadAudio's player: audioUI), which the
                    # server ignores; compare what the node declares.
                    sent = {k: v for k, v in output[node_id]["inputs"].items() if k in declared}
                    assert sent == node["inputs"], (name, node["class_type"])
            assert errors == [], errors
        finally:
            browser.close()
