"""The shipped native workflows' node chains in a real ComfyUI server (0.33.0 at ``COMFYUI_DIR``), to a written MP4.

Tiny files under the community names fill the server's ``models/`` folder: the Wan2.2 TI2V transformer goes through
core's own UNETLoader (core detects tiny Wan models from their tensors). Core's CLIPLoader and VAELoader build the
full-size umT5-XXL and Wan2.2 VAE whatever the file holds, so the test-only pack ``tests/native_stub_pack`` stands in
for those two loaders (core's CLIP and VAE objects, widths from the file); every other node is the shipped one.

Run: COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python -m pytest -m integration tests/integration/test_native_server.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import community_checkpoints as cc  # noqa: E402
from comfy_server import ComfyServer, require_comfy_dir, start_comfy  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = {"unet": "wan2.2_ti2v_5B_fp16.safetensors", "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
         "vae": "wan2.2_vae.safetensors"}
SIZE, LENGTH, FPS = 64, 17, 24.0  # 17 video frames = 5 latent frames at 24 fps: 0.71 s
SCRIPT = {"version": 1, "base": "A woman talks to the camera", "negative": "",
          "phases": [{"start": 0.0, "end": 0.3, "text": "raises her right hand"},
                     {"start": 0.35, "end": 0.7, "text": "points at the camera"}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy_dir = require_comfy_dir()
    base = tmp_path_factory.mktemp("comfy-native")
    models = base / "models"
    cc.write_comfy_wan_transformer(models / "diffusion_models" / FILES["unet"], prefix=True, text_dim=4096,
                                   num_layers=1, dtype=torch.float32)
    cc.write_comfy_umt5(models / "text_encoders" / FILES["clip"], dtype=torch.float32, d_model=4096, num_layers=1)
    cc.write_comfy_wan22_vae(models / "vae" / FILES["vae"])
    srv = start_comfy(comfy_dir, base_dir=base, custom_nodes={"ComfyUI-ActAvatar": ROOT,
                                                               "actavatar_native_stub": TESTS / "native_stub_pack"})
    try:
        yield srv
    finally:
        srv.stop()


def ti2v_prompt(script: dict[str, Any] = SCRIPT, *, mode: str = "routed", phase_cfg: float = 2.0,
                phase_control: bool = True) -> dict[str, Any]:
    """The shipped TI2V API workflow at a tiny size, with the two test loaders in place of CLIPLoader / VAELoader."""
    prompt = json.loads((ROOT / "workflows" / "api" / "actavatar_native_ti2v.json").read_text(encoding="utf-8"))
    assert (prompt["2"]["class_type"], prompt["3"]["class_type"]) == ("CLIPLoader", "VAELoader")
    prompt["2"] = {"class_type": "ActAvatarTestTinyWanCLIPLoader", "inputs": {"clip_name": FILES["clip"]}}
    prompt["3"] = {"class_type": "ActAvatarTestTinyWanVAELoader", "inputs": {"vae_name": FILES["vae"]}}
    prompt["5"]["inputs"].update(phase_script=json.dumps(script), duration=round(LENGTH / FPS, 3), fps=FPS)
    prompt["8"]["inputs"]["mode"] = mode
    prompt["9"]["inputs"].update(width=SIZE, height=SIZE, length=LENGTH)
    prompt["10"]["inputs"]["phase_cfg"] = phase_cfg
    prompt["12"]["inputs"]["steps"] = 2
    prompt["16"]["inputs"]["fps"] = FPS
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": "latents/native"}}
    if not phase_control:  # the guider and scheduler take the model straight from ModelSamplingSD3
        del prompt["8"]
        prompt["10"]["inputs"]["model"] = prompt["12"]["inputs"]["model"] = ["7", 0]
    return prompt


def long_prompt() -> dict[str, Any]:
    """The shipped long-clip workflow (TI2V in core's context windows) at a tiny size: 33 frames (1.38 s) in windows
    of 17 overlapping by 8, three phases, two of them across a window boundary."""
    prompt = json.loads((ROOT / "workflows" / "api" / "actavatar_native_ti2v_long.json").read_text(encoding="utf-8"))
    short = ti2v_prompt()
    for nid in ("2", "3", "90"):
        prompt[nid] = short[nid]
    script = {**SCRIPT, "phases": [{"start": 0.1, "end": 0.6, "text": "waves"}, {"start": 0.6, "end": 1.0,
                                                                                  "text": "points"},
                                   {"start": 1.1, "end": 1.35, "text": "nods"}]}
    prompt["5"]["inputs"].update(phase_script=json.dumps(script), duration=1.375, fps=FPS)
    prompt["9"]["inputs"].update(width=SIZE, height=SIZE, length=33)
    prompt["12"]["inputs"]["steps"] = 2
    prompt["18"]["inputs"].update(context_length=17, context_overlap=8)
    assert prompt["10"]["inputs"]["model"] == ["18", 0] and prompt["18"]["inputs"]["model"] == ["8", 0]
    return prompt


def run(server: ComfyServer, prompt: dict[str, Any]) -> tuple[Path, torch.Tensor]:
    """Queue a prompt, wait for it; the one MP4 it wrote and the sampled latent (core's SaveLatent file)."""
    from safetensors.torch import load_file

    before = set((server.base_dir / "output").rglob("*"))
    status, answer = server.post_json("/prompt", {"prompt": prompt})
    assert status == 200 and answer["node_errors"] == {}, answer
    entry = server.wait_for_prompt(answer["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
    new = set((server.base_dir / "output").rglob("*")) - before
    videos, latents = [p for p in new if p.suffix == ".mp4"], [p for p in new if p.suffix == ".latent"]
    assert len(videos) == 1 and len(latents) == 1, new
    return videos[0], load_file(str(latents[0]))["latent_tensor"]


def test_native_ti2v_workflow_runs_in_a_real_server_and_writes_the_mp4(server):
    from actavatar_core.video import probe_video

    path, latent = run(server, ti2v_prompt())
    info = probe_video(path)
    assert info["video_codec"] == "h264", info
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (LENGTH, FPS, SIZE, SIZE)
    log = server.log_tail(200_000)
    assert "Requested to load WAN22" in log, log[-3000:]  # core's Wan2.2 model class ran the sampling
    assert latent.shape == (1, 48, (LENGTH - 1) // 4 + 1, SIZE // 16, SIZE // 16)
    # the phases reached the model: the same workflow without Phase Control (and no phase guidance) differs
    _, plain = run(server, ti2v_prompt(phase_cfg=0.0, phase_control=False))
    assert (latent - plain).abs().max() > 1e-4


def test_one_phase_over_the_whole_clip_writes_the_unpatched_models_video(server):
    """Phase Control with nothing to route (one phase spanning the clip, no phase guidance) is the plain model, bit
    for bit, through the whole server chain (the sampled latents; the MP4's H.264 encoding is lossy)."""
    whole = {**SCRIPT, "phases": [{"start": 0.0, "end": round(LENGTH / FPS, 3), "text": "raises her right hand"}]}
    _, patched = run(server, ti2v_prompt(whole, phase_cfg=0.0))
    _, plain = run(server, ti2v_prompt(whole, phase_cfg=0.0, phase_control=False))
    assert torch.equal(patched, plain)
    _, guided = run(server, ti2v_prompt(whole, phase_cfg=2.0))  # one phase over the clip: the phase term is not 0
    assert (guided - plain).abs().max() > 1e-4


def test_long_clip_workflow_runs_its_context_windows_to_the_mp4(server):
    from actavatar_core.video import probe_video

    prompt = long_prompt()
    path, latent = run(server, prompt)
    info = probe_video(path)
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (33, FPS, SIZE, SIZE)
    assert latent.shape[2] == 9
    # the windows did run (one pass over all 9 latent frames gives another result)
    del prompt["18"]
    prompt["10"]["inputs"]["model"] = prompt["12"]["inputs"]["model"] = ["8", 0]
    _, whole = run(server, prompt)
    assert (latent - whole).abs().max() > 1e-4
