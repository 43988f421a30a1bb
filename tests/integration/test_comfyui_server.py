"""The pack inside a real ComfyUI server (0.33.0 or newer at COMFYUI_DIR), driven over HTTP and the WebSocket.

One ComfyUI (module-scoped) runs on the CPU in a temporary base directory: the repository is symlinked into its
custom_nodes, its models/ folder holds tiny checkpoints in the community layouts (the real file names), and
nothing is written to COMFYUI_DIR. The shipped API workflows are queued with the tiny files' names substituted;
the UI workflows are converted with the server's own /object_info and by ComfyUI's own frontend in Chromium, and
compared with them. The workflows as shipped before the nodes moved to the V3 schema
(``tests/fixtures/workflows_pre_v3``) still load in that frontend without a missing node or a lost widget value,
and their API prompts still run.

Run: COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python -m pytest -m integration tests/integration/test_comfyui_server.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
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
PRE_V3 = ROOT / "tests" / "fixtures" / "workflows_pre_v3"
NAMES = ["actavatar_timeline", "actavatar_core_video"]
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


def api_workflow(name: str, names: dict[str, str], folder: Path = WORKFLOWS, **sampler: Any) -> dict[str, Any]:
    """A shipped API workflow (from ``folder``) with the tiny files' names and small sizes substituted."""
    prompt = json.loads((folder / "api" / f"{name}.json").read_text(encoding="utf-8"))
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
def _declared_schemas() -> dict[str, dict[str, Any]]:
    """What each node class declares (display name, category, input names by section, output types), read in this
    process through ComfyUI's comfy_api with the test doubles standing in for the running server's parts."""
    from comfy_doubles import install

    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as scratch:
        doubles = install(patch)
        doubles.set_directory("output", Path(scratch) / "output")
        doubles.set_directory("models", Path(scratch) / "models")
        from nodes import NODES
        from nodes.model_folders import register_model_folders

        register_model_folders()
        out = {}
        for node_id, (cls, display) in NODES.items():
            types = cls.INPUT_TYPES()
            out[node_id] = {"display": display, "category": cls.CATEGORY, "outputs": list(cls.RETURN_TYPES),
                            "inputs": {s: list(types.get(s, {})) for s in ("required", "optional")}}
        return out


def _options(spec: list) -> list:
    """The choices of a combo input as /object_info lists it (V1: a list first; V3: COMBO with options)."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_pack_loads_with_every_node(comfy):
    server, names = comfy
    log = server.log_tail(200_000)
    assert "Cannot import" not in log and "ActAvatar: missing" not in log and "ActAvatar: not loaded" not in log, \
        log[-3000:]
    info = server.get_json("/object_info")
    declared = _declared_schemas()
    assert len(declared) >= 10
    for node_id, want in declared.items():
        assert node_id in info, f"{node_id} is not registered\n{log[-3000:]}"
        entry = info[node_id]
        assert entry["display_name"] == want["display"] and entry["category"] == want["category"]
        for section in ("required", "optional"):
            assert list(entry["input"].get(section, {})) == want["inputs"][section], (node_id, section)
        assert list(entry["output"]) == want["outputs"]
    assert info["ActAvatarSaveVideo"]["output_node"] is True
    loader = info["ActAvatarModelLoader"]["input"]["required"]
    assert names["diffusion_models"] in _options(loader["model_name"])
    weights = _options(loader["actavatar_weights"])
    assert weights[0] == "none" and names["actavatar"] in weights  # models/actavatar
    assert server.get_json("/system_stats")["devices"][0]["type"] == "cpu"
    extensions = server.get_json("/extensions")
    assert any(e.endswith("actavatar_timeline.js") for e in extensions), extensions
    for demo in ("actavatar_demo_reference.png", "actavatar_demo_speech.wav"):  # copied on first load
        assert (server.base_dir / "input" / demo).is_file()


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _widgets_of(name: str, spec: list) -> list[str | None]:
    """The widgets the frontend makes for one input (None: a UI-only widget value). A dynamic combo (core's
    SaveVideo format) is followed by the inputs of its first option (the default), named "<combo>.<input>"."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    out: list[str | None] = []
    if kind == DYNAMIC_COMBO:
        out.append(name)
        first = options["options"][0]["inputs"]
        for section in ("required", "optional"):
            for child, child_spec in first.get(section, {}).items():
                out += [w if w is None else f"{name}.{w}" for w in _widgets_of(child, child_spec)]
    elif isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
        out.append(name)
        if options.get("control_after_generate"):
            out.append(None)
        if options.get("image_upload"):
            out.append(None)  # the upload button's value
        if options.get("audio_upload"):
            out += [None, None]  # the upload button and the audio player
    return out


def _widget_names(entry: dict) -> list[str | None]:
    """Widget order of a node as the frontend builds it from /object_info (None: UI-only widget values)."""
    out: list[str | None] = []
    for section in ("required", "optional"):
        for name in entry["input_order"].get(section, []):
            out += _widgets_of(name, entry["input"][section][name])
    return out


def _declared_default(entry: dict, key: str, inputs: dict[str, Any]) -> Any:
    """The default value of input ``key`` of a node (a "<combo>.<input>" key: of the combo's chosen option)."""
    specs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
    parent, _, child = key.partition(".")
    spec = specs[parent]
    if child:
        option = next(o for o in spec[1]["options"] if o["key"] == inputs[parent])
        spec = {**option["inputs"].get("required", {}), **option["inputs"].get("optional", {})}[child]
    options = spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    if spec[0] == DYNAMIC_COMBO:
        return options["options"][0]["key"]
    return _options(spec)[0] if spec[0] == "COMBO" or isinstance(spec[0], list) else None


@pytest.mark.parametrize("name", NAMES)
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
    # The bundled model at its own settings: seconds on an idle machine, minutes on a busy shared one.
    assert ws.wait_done(prompt_id, server, timeout=900) == "execution_success", server.log_tail()
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
    assert server.get_json("/queue") == before  # nothing was queued
    # A width off the 32-pixel grid passes ComfyUI's range check; the Sampler refuses it before it samples.
    prompt = api_workflow("actavatar_timeline", names, width=70)
    status, answer = server.post_json("/prompt", {"prompt": prompt})
    if status == 400:
        assert "multiple of 32" in json.dumps(answer["node_errors"][SAMPLER])
    else:
        entry = server.wait_for_prompt(answer["prompt_id"], timeout=300)
        assert entry["status"]["status_str"] == "error"
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0]["node_id"] == SAMPLER and "multiple of 32" in errors[0]["exception_message"]
        assert "Fix:" in errors[0]["exception_message"]


def test_interrupt_mid_sampling_leaves_no_file_and_comfyui_healthy(comfy, ws):
    server, names = comfy
    before = output_files(server)
    long_run = queue(server, api_workflow("actavatar_timeline", names, steps=1000, sampler="euler", seed=11),
                     ws.client_id)
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


# ============================================================================================ saved before V3
@pytest.mark.parametrize("name", NAMES)
def test_pre_v3_api_prompts_still_run(comfy, ws, name):
    """The API prompts saved before the V3 port queue unchanged (tiny model names and sizes aside) and write the
    video."""
    server, names = comfy
    prompt = api_workflow(name, names, folder=PRE_V3, seed=5)
    before = output_files(server)
    prompt_id = queue(server, prompt, ws.client_id)
    assert ws.wait_done(prompt_id, server) == "execution_success", server.log_tail()
    new = [p for p in output_files(server) - before if p.suffix == ".mp4"]
    assert len(new) == 1, new
    check_mp4(new[0], expected_frames(server, prompt), 25.0)


# ============================================================================================ the real frontend
def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


@pytest.fixture(scope="module")
def frontend(comfy):
    """ComfyUI's own frontend in headless Chromium, on the module's server: (page, page errors)."""
    server, _ = comfy
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
            yield page, errors
        finally:
            browser.close()


def _load_in_frontend(page, ui: dict) -> tuple[dict, dict]:
    """Load a UI workflow in the frontend, check that every node type is known and no missing-nodes or
    missing-models dialog opened; return (the graph as the frontend saves it, the API prompt it queues)."""
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", ui)
    page.wait_for_timeout(500)
    types = page.evaluate("() => app.graph.nodes.map(n => [n.type, !!LiteGraph.registered_node_types[n.type]])")
    assert sorted(t for t, _ in types) == sorted(n["type"] for n in ui["nodes"])
    assert all(known for _, known in types), types
    dialogs = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText)")
    assert not [d for d in dialogs if "missing" in d.lower()], dialogs
    saved = page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
    return saved, page.evaluate("async () => (await app.graphToPrompt()).output")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflows_load_in_the_frontend_and_queue_as_the_api_files(comfy, frontend, name):
    """ComfyUI's own frontend loads each shipped UI workflow with every node type known and no missing-nodes or
    missing-models dialog, and its UI -> API conversion (graphToPrompt) gives exactly the API file."""
    page, errors = frontend
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    saved, output = _load_in_frontend(page, ui)
    assert {k: v["class_type"] for k, v in output.items()} == {k: v["class_type"] for k, v in api.items()}
    for node_id, node in api.items():
        assert output[node_id]["inputs"] == node["inputs"], (name, node["class_type"])
    # Saved again by this frontend, the file keeps every widget value (the upload buttons' and players' aside).
    for old, new in zip(ui["nodes"], saved["nodes"]):
        was, now = old.get("widgets_values", []), new.get("widgets_values", [])
        kept = [(o, n) for o, n in zip(was, now) if o is not None]
        assert all(o == n for o, n in kept) and len(now) == len(was), (old["type"], was, now)
    assert errors == [], errors


@pytest.mark.parametrize("name", NAMES)
def test_pre_v3_ui_workflows_load_in_the_frontend_without_lost_values(comfy, frontend, name):
    """The UI workflows as shipped before the V3 port load with no missing node, every saved widget value stays on
    its widget, and the prompt the frontend queues carries every input of the API file saved with them; inputs
    added since (optional ones at the end: core's CreateVideo bit_depth, SaveVideo's format options, the Sampler's
    relay_width) come at their defaults."""
    server, _ = comfy
    page, errors = frontend
    info = server.get_json("/object_info")
    ui = json.loads((PRE_V3 / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((PRE_V3 / "api" / f"{name}.json").read_text(encoding="utf-8"))
    saved, output = _load_in_frontend(page, ui)
    assert {k: v["class_type"] for k, v in output.items()} == {k: v["class_type"] for k, v in api.items()}
    ours = 0
    for old, new in zip(ui["nodes"], saved["nodes"]):
        assert old["id"] == new["id"]
        was, now = old.get("widgets_values", []), new.get("widgets_values", [])
        values = [(o, n) for o, n in zip(was, now) if o is not None]
        assert all(o == n for o, n in values), (old["type"], was, now)
        assert len(now) >= len(was), old["type"]
        if old["type"].startswith("ActAvatar"):  # the pack's own nodes: the saved widgets first, in their order
            assert now[:len(was)] == was, old["type"]
            ours += 1
    assert ours >= 9
    for node_id, node in api.items():
        sent = output[node_id]["inputs"]
        for key, value in node["inputs"].items():
            assert sent.get(key) == value, (name, node["class_type"], key)
        for key in sent.keys() - node["inputs"].keys():
            assert sent[key] == _declared_default(info[node["class_type"]], key, sent), (node["class_type"], key)
    assert errors == [], errors
