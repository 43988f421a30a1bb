"""The shipped native workflows' node chains in a real ComfyUI server (0.33.0 at ``COMFYUI_DIR``), to a written MP4.

Tiny files under the community names fill the server's ``models/`` folder: the Wan2.2 TI2V, S2V and Wan2.1 I2V
transformers go through core's own UNETLoader (core detects tiny Wan models from their tensors), InfiniteTalk's patch
through core's ModelPatchLoader, the Wan2.1 VAE through core's VAELoader. Core's CLIPLoader, its VAELoader for the
Wan2.2 VAE, its CLIPVisionLoader and its AudioEncoderLoader build the full-size umT5-XXL, Wan2.2 VAE, ViT-H and
wav2vec2 whatever the file holds, so the test-only pack ``tests/native_stub_pack`` stands in for those (core's CLIP,
VAE, CLIP vision and audio encoder objects, sizes from the file); every other node is the shipped one.

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


IT_FILES = {"unet": "wan2.1_i2v_480p_14B_fp8_scaled.safetensors", "patch": "wan2.1_infiniteTalk_single_fp16.safetensors",
            "vision": "clip_vision_h.safetensors", "audio": "wav2vec2-chinese-base_fp16.safetensors"}
S2V_FILES = {"unet": "wan2.2_s2v_14B_fp8_scaled.safetensors", "vae": "wan_2.1_vae.safetensors",
             "audio": "wav2vec2_large_english_fp16.safetensors"}


def _random_state(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.1 * torch.randn(v.shape, generator=g)) if "norm" in k and k.endswith(".weight")
            else torch.randn(v.shape, generator=g) / max(1.0, v.shape[-1] ** 0.5) for k, v in net.state_dict().items()}


def write_tiny_s2v_files(models: Path, comfy_dir: Path) -> None:
    """A tiny Wan2.2 S2V transformer from ComfyUI's ``WanModel_S2V`` (core's UNETLoader detects it; the audio parts
    at the sizes core's detection fixes), a tiny Wan2.1 VAE (core's VAELoader reads its width) and a small wav2vec2
    from ComfyUI's ``Wav2Vec2Model``: 1024 wide and 24 layers as S2V reads it, feed-forward 64 wide (100M weights,
    fp16 on disk)."""
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]  # ComfyUI's classes in this process, on the CPU
    if str(comfy_dir) not in sys.path:
        sys.path.append(str(comfy_dir))
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # another test module may have imported comfy_api (and the args) first
        import comfy.ops
    finally:
        sys.argv = argv
    import comfy.audio_encoders.wav2vec2 as w2v
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model
    from comfy.ldm.wan.model import WanModel_S2V
    from safetensors.torch import save_file

    original = w2v.TransformerEncoder  # core fixes wav2vec2's feed-forward at 4x the width; narrower here

    net = WanModel_S2V(dim=256, ffn_dim=128, num_heads=2, num_layers=1, text_dim=4096, in_dim=16, out_dim=16,
                       operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in _random_state(net, 41).items()},
              str(models / "diffusion_models" / S2V_FILES["unet"]))
    cc.write_comfy_wan21_vae(models / "vae" / S2V_FILES["vae"], dim=8, num_res_blocks=2)
    # InfiniteTalk: Wan2.1 I2V (dim 320: the patch's audio attention has 40 heads), its model patch (40 blocks, as
    # core's ModelPatchLoader builds it), CLIP vision (ViT-H's width) and the chinese base wav2vec2 (768 wide, 12 layers)
    from comfy.clip_model import CLIPVisionModelProjection
    from comfy.ldm.wan.model import WanModel
    from comfy_extras.nodes_model_patch import MultiTalkModelPatch

    i2v = WanModel(model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=256 + 64, ffn_dim=128, freq_dim=256,
                   text_dim=4096, out_dim=16, num_heads=2, num_layers=1, operations=comfy.ops.disable_weight_init,
                   dtype=torch.float32)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in _random_state(i2v, 43).items()},
              str(models / "diffusion_models" / IT_FILES["unet"]))
    patch = MultiTalkModelPatch(in_dim=320, out_dim=32, intermediate_dim=32, operations=comfy.ops.disable_weight_init)
    (models / "model_patches").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _random_state(patch, 44).items()},
              str(models / "model_patches" / IT_FILES["patch"]))
    vision = CLIPVisionModelProjection({"hidden_size": 1280, "intermediate_size": 64, "num_attention_heads": 16,
                                        "num_hidden_layers": 2, "image_size": 224, "patch_size": 14, "num_channels": 3,
                                        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
                                        "model_type": "clip_vision_model"},
                                       torch.float32, None, comfy.ops.disable_weight_init)
    (models / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _random_state(vision, 45).items()},
              str(models / "clip_vision" / IT_FILES["vision"]))
    w2v.TransformerEncoder = lambda *a, **cfg: original(*a, **{**cfg, "mlp_ratio": 1 / 12})
    try:
        base = Wav2Vec2Model(embed_dim=768, num_heads=12, num_layers=12, conv_norm=False, conv_bias=False,
                             do_normalize=False, do_stable_layer_norm=False, operations=comfy.ops.disable_weight_init,
                             dtype=torch.float32)
    finally:
        w2v.TransformerEncoder = original
    (models / "audio_encoders").mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in _random_state(base, 46).items()},
              str(models / "audio_encoders" / IT_FILES["audio"]))
    w2v.TransformerEncoder = lambda *a, **cfg: original(*a, **{**cfg, "mlp_ratio": 1 / 16})  # feed-forward 64 wide
    try:
        encoder = Wav2Vec2Model(embed_dim=1024, num_heads=16, num_layers=24, operations=comfy.ops.disable_weight_init,
                                dtype=torch.float32)
    finally:
        w2v.TransformerEncoder = original
    (models / "audio_encoders").mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in _random_state(encoder, 42).items()},
              str(models / "audio_encoders" / S2V_FILES["audio"]))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy_dir = require_comfy_dir()
    base = tmp_path_factory.mktemp("comfy-native")
    models = base / "models"
    cc.write_comfy_wan_transformer(models / "diffusion_models" / FILES["unet"], prefix=True, text_dim=4096,
                                   num_layers=1, dtype=torch.float32)
    cc.write_comfy_umt5(models / "text_encoders" / FILES["clip"], dtype=torch.float32, d_model=4096, num_layers=1)
    cc.write_comfy_wan22_vae(models / "vae" / FILES["vae"])
    write_tiny_s2v_files(models, comfy_dir)
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


def s2v_prompt() -> dict[str, Any]:
    """The shipped S2V API workflow at a tiny size (49 frames at 16 fps: the demo speech's length), with the test
    loaders in place of CLIPLoader and AudioEncoderLoader; core's UNETLoader and VAELoader load the tiny files."""
    prompt = json.loads((ROOT / "workflows" / "api" / "actavatar_native_s2v.json").read_text(encoding="utf-8"))
    assert (prompt["2"]["class_type"], prompt["4"]["class_type"]) == ("CLIPLoader", "AudioEncoderLoader")
    prompt["1"]["inputs"]["unet_name"] = S2V_FILES["unet"]
    prompt["2"] = {"class_type": "ActAvatarTestTinyWanCLIPLoader", "inputs": {"clip_name": FILES["clip"]}}
    prompt["3"]["inputs"]["vae_name"] = S2V_FILES["vae"]
    prompt["4"] = {"class_type": "ActAvatarTestTinyAudioEncoderLoader",
                   "inputs": {"audio_encoder_name": S2V_FILES["audio"]}}
    prompt["10"]["inputs"].update(width=SIZE, height=SIZE)
    prompt["15"]["inputs"]["steps"] = 2
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["17", 0], "filename_prefix": "latents/s2v"}}
    return prompt


def test_native_s2v_workflow_runs_in_a_real_server_and_writes_the_mp4_with_the_speech(server):
    from actavatar_core.video import probe_video

    prompt = s2v_prompt()
    path, latent = run(server, prompt)
    info = probe_video(path)
    frames = prompt["10"]["inputs"]["length"]
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac", info
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (frames, 16.0, SIZE, SIZE)
    assert abs(info["audio_duration"] - frames / 16.0) < 0.1  # the demo speech (3.08 s) under a 3.06 s video
    assert latent.shape[2] == (frames - 1) // 4 + 1
    assert "Requested to load WAN22_S2V" in server.log_tail(200_000)  # core's S2V model class sampled
    # the phases reached the model: without Phase Control (and phase guidance) the sampled latent differs
    prompt["13"]["inputs"]["phase_cfg"] = 0.0
    del prompt["12"]
    prompt["13"]["inputs"]["model"] = prompt["15"]["inputs"]["model"] = ["11", 0]
    _, plain = run(server, prompt)
    assert (latent - plain).abs().max() > 1e-4


def test_native_infinitetalk_workflow_runs_in_a_real_server_and_writes_the_mp4_with_the_speech(server):
    """The shipped InfiniteTalk workflow at 64x64 (81 frames at 25 fps): core's UNETLoader, ModelPatchLoader and
    VAELoader on tiny files, the test loaders for umT5, CLIP vision and wav2vec2; Phase Control after InfiniteTalk."""
    from actavatar_core.video import probe_video

    prompt = json.loads((ROOT / "workflows" / "api" / "actavatar_native_infinitetalk.json").read_text(encoding="utf-8"))
    prompt["1"]["inputs"]["unet_name"] = IT_FILES["unet"]
    prompt["2"] = {"class_type": "ActAvatarTestTinyWanCLIPLoader", "inputs": {"clip_name": FILES["clip"]}}
    prompt["3"]["inputs"]["vae_name"] = S2V_FILES["vae"]
    prompt["4"] = {"class_type": "ActAvatarTestTinyCLIPVisionLoader", "inputs": {"clip_name": IT_FILES["vision"]}}
    prompt["7"]["inputs"]["name"] = IT_FILES["patch"]
    prompt["8"] = {"class_type": "ActAvatarTestTinyAudioEncoderLoader",
                   "inputs": {"audio_encoder_name": IT_FILES["audio"]}}
    prompt["14"]["inputs"].update(width=SIZE, height=SIZE)
    prompt["18"]["inputs"]["steps"] = 2
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["20", 0], "filename_prefix": "latents/it"}}
    path, latent = run(server, prompt)
    info = probe_video(path)
    frames = prompt["14"]["inputs"]["length"]
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac", info
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (frames, 25.0, SIZE, SIZE)
    assert latent.shape[2] == (frames - 1) // 4 + 1
    log = server.log_tail(200_000)
    assert "Requested to load WAN21" in log and "MultiTalkModelPatch" in log, log[-3000:]
    # the phases reached the model: without Phase Control the sampled latent differs
    del prompt["15"]
    prompt["16"]["inputs"]["model"] = prompt["18"]["inputs"]["model"] = ["14", 0]
    _, plain = run(server, prompt)
    assert (latent - plain).abs().max() > 1e-4
