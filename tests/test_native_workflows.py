"""The shipped native-model workflows (core's Wan2.2 TI2V-5B, the same in context windows for a long clip, S2V-14B and
InfiniteTalk chains + ActAvatar Phase Prompt, Phase Text Encode, Phase Control and Phase Guider): their UI and API files are what :func:`build` writes
(``python tests/test_native_workflows.py`` rewrites them), the native nodes' widget values pass their schemas, every
core node's inputs, widget order and output slots are those of a real ComfyUI 0.33, and ComfyUI's own
``validate_prompt`` accepts each API prompt with the pack loaded (``COMFYUI_DIR``; both in a subprocess, since
ComfyUI's ``nodes`` module and the pack's ``nodes`` package clash in one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = json.dumps({
    "version": 1,
    "base": "A woman with short dark hair in a green jacket stands in a sunny park and talks to the camera",
    "negative": "",
    "phases": [{"start": 0.5, "end": 2.0, "text": "raises her right hand and waves"},
               {"start": 2.5, "end": 4.5, "text": "points at the camera with her left hand"}],
})
NOTE = """ActAvatar on Wan2.2 TI2V-5B (ComfyUI's own model; no audio, no lip sync): timed actions from a photo.

Model files (community names, ComfyUI's model folders):
- diffusion_models/wan2.2_ti2v_5B_fp16.safetensors
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (or umt5_xxl_fp16.safetensors)
- vae/wan2.2_vae.safetensors

VRAM: the model makers (Wan2.2 README) run TI2V-5B at 720p on one 24 GB GPU (RTX 4090) with model offloading;
ComfyUI's own memory management may fit less. Not measured by ActAvatar.

Timing: 121 frames at 24 fps = 5.04 s. The Phase Prompt's fps must be the video's fps (24 here).
Phase Control routes each latent frame's text attention to the base prompt and the phases active at its time
(mode routed / feathered / relay); the Phase Guider adds phase guidance (phase_cfg, 0 = plain CFG)."""

#: id -> (type, title, [(widget name or None for a UI-only widget, value)], {input: (source id, slot)},
#:        [(output name, type)], pos, size). Widget values in the node's widget order.
TI2V: dict[int, tuple] = {
    1: ("UNETLoader", "Load Diffusion Model (Wan2.2 TI2V-5B)",
        [("unet_name", "wan2.2_ti2v_5B_fp16.safetensors"), ("weight_dtype", "default")], {}, [("MODEL", "MODEL")],
        (20, 40), (330, 90)),
    2: ("CLIPLoader", "Load CLIP (umT5)",
        [("clip_name", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("type", "wan"), ("device", "default")], {},
        [("CLIP", "CLIP")], (20, 170), (330, 110)),
    3: ("VAELoader", "Load VAE (Wan2.2)", [("vae_name", "wan2.2_vae.safetensors")], {}, [("VAE", "VAE")],
        (20, 320), (330, 60)),
    4: ("LoadImage", "Reference image", [("image", "actavatar_demo_reference.png"), (None, "image")], {},
        [("IMAGE", "IMAGE"), ("MASK", "MASK")], (20, 420), (330, 330)),
    5: ("ActAvatarPhasePrompt", "ActAvatar Phase Prompt",
        [("phase_script", SCRIPT), ("duration", 5.0), ("fps", 24.0)], {}, [("phase_prompt", "PHASE_PROMPT")],
        (400, 40), (520, 330)),
    6: ("ActAvatarPhaseTextEncode", "ActAvatar Phase Text Encode", [("negative", "")],
        {"clip": (2, 0), "phase_prompt": (5, 0)},
        [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], (980, 40), (330, 160)),
    7: ("ModelSamplingSD3", "ModelSamplingSD3", [("shift", 8.0)], {"model": (1, 0)}, [("MODEL", "MODEL")],
        (400, 420), (300, 60)),
    8: ("ActAvatarPhaseControl", "ActAvatar Phase Control",
        [("mode", "routed"), ("feather", 2.0), ("relay_width", 2.0), ("start_seconds", 0.0), ("clip_seconds", 0.0)],
        {"model": (7, 0)}, [("model", "MODEL")], (740, 420), (330, 180)),
    9: ("Wan22ImageToVideoLatent", "Wan22ImageToVideoLatent",
        [("width", 1280), ("height", 704), ("length", 121), ("batch_size", 1)], {"vae": (3, 0), "start_image": (4, 0)},
        [("LATENT", "LATENT")], (400, 520), (300, 150)),
    10: ("ActAvatarPhaseGuider", "ActAvatar Phase Guider", [("cfg", 5.0), ("phase_cfg", 0.0)],
         {"model": (8, 0), "positive": (6, 0), "negative": (6, 1)}, [("guider", "GUIDER")], (1120, 260), (300, 130)),
    11: ("KSamplerSelect", "KSamplerSelect", [("sampler_name", "uni_pc")], {}, [("SAMPLER", "SAMPLER")],
         (1120, 420), (300, 60)),
    12: ("BasicScheduler", "BasicScheduler", [("scheduler", "simple"), ("steps", 20), ("denoise", 1.0)],
         {"model": (8, 0)}, [("SIGMAS", "SIGMAS")], (1120, 520), (300, 110)),
    13: ("RandomNoise", "RandomNoise", [("noise_seed", 42), (None, "fixed")], {}, [("NOISE", "NOISE")],
         (1120, 670), (300, 90)),
    14: ("SamplerCustomAdvanced", "SamplerCustomAdvanced", [],
         {"noise": (13, 0), "guider": (10, 0), "sampler": (11, 0), "sigmas": (12, 0), "latent_image": (9, 0)},
         [("output", "LATENT"), ("denoised_output", "LATENT")], (1460, 260), (300, 130)),
    15: ("VAEDecode", "VAE Decode", [], {"samples": (14, 0), "vae": (3, 0)}, [("IMAGE", "IMAGE")],
         (1460, 440), (220, 50)),
    16: ("CreateVideo", "Create Video", [("fps", 24.0), ("bit_depth", 8)], {"images": (15, 0)},
         [("VIDEO", "VIDEO")], (1720, 260), (300, 100)),
    17: ("SaveVideo", "Save Video",
         [("filename_prefix", "video/ActAvatar_native"), ("format", "auto"), ("format.codec", "auto"),
          ("codec", "auto")], {"video": (16, 0)}, [("video", "VIDEO")], (1720, 420), (400, 400)),
}
S2V_SCRIPT = json.dumps({
    "version": 1,
    "base": "A person with tan skin, a red shirt and long brown hair on a blue background talks",
    "negative": "",
    "phases": [{"start": 0.3, "end": 1.3, "text": "raises the left hand"},
               {"start": 1.6, "end": 2.9, "text": "waves the right hand"}],
})
S2V_NOTE = """ActAvatar on Wan2.2 S2V-14B (ComfyUI's own speech-to-video model: real lip sync) with timed actions.

Model files (community names, ComfyUI's model folders):
- diffusion_models/wan2.2_s2v_14B_fp8_scaled.safetensors (or _bf16)
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
- audio_encoders/wav2vec2_large_english_fp16.safetensors
- vae/wan_2.1_vae.safetensors (S2V uses the Wan2.1 VAE)

VRAM: the model makers' README runs S2V-14B on one GPU with at least 80 GB (their full-precision command);
ComfyUI's fp8 file with its offloading needs less. Not measured by ActAvatar.

Timing: 49 frames at 16 fps = 3.06 s, the demo speech's length (3.08 s). S2V runs at 16 fps: the Phase Prompt's
fps is 16; its duration 0 follows the connected speech. For a longer clip chain WanSoundImageToVideoExtend and set
Phase Control's start_seconds (and clip_seconds) so phases keep the clip's timing."""

S2V: dict[int, tuple] = {
    1: ("UNETLoader", "Load Diffusion Model (Wan2.2 S2V-14B)",
        [("unet_name", "wan2.2_s2v_14B_fp8_scaled.safetensors"), ("weight_dtype", "default")], {},
        [("MODEL", "MODEL")], (20, 40), (330, 90)),
    2: ("CLIPLoader", "Load CLIP (umT5)",
        [("clip_name", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("type", "wan"), ("device", "default")], {},
        [("CLIP", "CLIP")], (20, 170), (330, 110)),
    3: ("VAELoader", "Load VAE (Wan2.1)", [("vae_name", "wan_2.1_vae.safetensors")], {}, [("VAE", "VAE")],
        (20, 320), (330, 60)),
    4: ("AudioEncoderLoader", "Load Audio Encoder (wav2vec2)",
        [("audio_encoder_name", "wav2vec2_large_english_fp16.safetensors")], {},
        [("AUDIO_ENCODER", "AUDIO_ENCODER")], (20, 420), (330, 60)),
    5: ("LoadImage", "Reference image", [("image", "actavatar_demo_reference.png"), (None, "image")], {},
        [("IMAGE", "IMAGE"), ("MASK", "MASK")], (20, 520), (330, 330)),
    6: ("LoadAudio", "Speech", [("audio", "actavatar_demo_speech.wav"), (None, None), (None, None)], {},
        [("AUDIO", "AUDIO")], (20, 890), (330, 140)),
    7: ("AudioEncoderEncode", "Audio Encoder Encode", [], {"audio_encoder": (4, 0), "audio": (6, 0)},
        [("AUDIO_ENCODER_OUTPUT", "AUDIO_ENCODER_OUTPUT")], (400, 890), (300, 60)),
    8: ("ActAvatarPhasePrompt", "ActAvatar Phase Prompt",
        [("phase_script", S2V_SCRIPT), ("duration", 0.0), ("fps", 16.0)], {"audio": (6, 0)},
        [("phase_prompt", "PHASE_PROMPT")], (400, 40), (520, 330)),
    9: ("ActAvatarPhaseTextEncode", "ActAvatar Phase Text Encode", [("negative", "")],
        {"clip": (2, 0), "phase_prompt": (8, 0)},
        [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], (980, 40), (330, 160)),
    10: ("WanSoundImageToVideo", "WanSoundImageToVideo",
         [("width", 640), ("height", 640), ("length", 49), ("batch_size", 1)],
         {"positive": (9, 0), "negative": (9, 1), "vae": (3, 0), "audio_encoder_output": (7, 0), "ref_image": (5, 0)},
         [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")], (980, 260), (330, 250)),
    11: ("ModelSamplingSD3", "ModelSamplingSD3", [("shift", 8.0)], {"model": (1, 0)}, [("MODEL", "MODEL")],
         (400, 420), (300, 60)),
    12: ("ActAvatarPhaseControl", "ActAvatar Phase Control",
         [("mode", "routed"), ("feather", 2.0), ("relay_width", 2.0), ("start_seconds", 0.0), ("clip_seconds", 0.0)],
         {"model": (11, 0)}, [("model", "MODEL")], (400, 520), (330, 180)),
    13: ("ActAvatarPhaseGuider", "ActAvatar Phase Guider", [("cfg", 6.0), ("phase_cfg", 0.0)],
         {"model": (12, 0), "positive": (10, 0), "negative": (10, 1)}, [("guider", "GUIDER")], (1360, 40), (300, 130)),
    14: ("KSamplerSelect", "KSamplerSelect", [("sampler_name", "uni_pc")], {}, [("SAMPLER", "SAMPLER")],
         (1360, 220), (300, 60)),
    15: ("BasicScheduler", "BasicScheduler", [("scheduler", "simple"), ("steps", 20), ("denoise", 1.0)],
         {"model": (12, 0)}, [("SIGMAS", "SIGMAS")], (1360, 320), (300, 110)),
    16: ("RandomNoise", "RandomNoise", [("noise_seed", 42), (None, "fixed")], {}, [("NOISE", "NOISE")],
         (1360, 470), (300, 90)),
    17: ("SamplerCustomAdvanced", "SamplerCustomAdvanced", [],
         {"noise": (16, 0), "guider": (13, 0), "sampler": (14, 0), "sigmas": (15, 0), "latent_image": (10, 2)},
         [("output", "LATENT"), ("denoised_output", "LATENT")], (1700, 40), (300, 130)),
    18: ("VAEDecode", "VAE Decode", [], {"samples": (17, 0), "vae": (3, 0)}, [("IMAGE", "IMAGE")],
         (1700, 220), (220, 50)),
    19: ("CreateVideo", "Create Video", [("fps", 16.0), ("bit_depth", 8)], {"images": (18, 0), "audio": (6, 0)},
         [("VIDEO", "VIDEO")], (1700, 320), (300, 100)),
    20: ("SaveVideo", "Save Video",
         [("filename_prefix", "video/ActAvatar_native_s2v"), ("format", "auto"), ("format.codec", "auto"),
          ("codec", "auto")], {"video": (19, 0)}, [("video", "VIDEO")], (1700, 470), (400, 400)),
}

LONG_SCRIPT = json.dumps({
    "version": 1,
    "base": "A woman with short dark hair in a green jacket stands in a sunny park and talks to the camera",
    "negative": "",
    "phases": [{"start": 1.0, "end": 4.0, "text": "raises her right hand and waves"},
               {"start": 4.5, "end": 6.5, "text": "points at the camera with her left hand"},
               {"start": 7.5, "end": 9.5, "text": "crosses her arms"}],
})
LONG_NOTE = """ActAvatar on Wan2.2 TI2V-5B, a 10 s clip in ComfyUI's context windows: timed actions across the windows.

Model files (community names, ComfyUI's model folders):
- diffusion_models/wan2.2_ti2v_5B_fp16.safetensors
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (or umt5_xxl_fp16.safetensors)
- vae/wan2.2_vae.safetensors

VRAM: as the 5 s TI2V workflow (the model makers run TI2V-5B at 720p on one 24 GB GPU with offloading): each
context window samples 121 frames at a time; the whole latent is kept. Not measured by ActAvatar.

Timing: 241 frames at 24 fps = 10.04 s in windows of 121 frames overlapping by 30. Phase Control sits before
WanContextWindowsManual and routes every window's frames by the clip's absolute time, so a phase that starts in one
window and ends in the next keeps its timing (the Phase Prompt's fps must be the video's fps, 24 here)."""
LONG = {nid: node for nid, node in TI2V.items()}
LONG[5] = (*TI2V[5][:2], [("phase_script", LONG_SCRIPT), ("duration", 10.0), ("fps", 24.0)], *TI2V[5][3:])
LONG[9] = (*TI2V[9][:2], [("width", 1280), ("height", 704), ("length", 241), ("batch_size", 1)], *TI2V[9][3:])
LONG[10] = (*TI2V[10][:3], {**TI2V[10][3], "model": (18, 0)}, *TI2V[10][4:])
LONG[12] = (*TI2V[12][:3], {"model": (18, 0)}, *TI2V[12][4:])
LONG[17] = (*TI2V[17][:2], [("filename_prefix", "video/ActAvatar_native_long"), *TI2V[17][2][1:]], *TI2V[17][3:])
LONG[18] = ("WanContextWindowsManual", "WanContextWindowsManual",
            [("context_length", 121), ("context_overlap", 30), ("context_schedule", "standard_static"),
             ("context_stride", 1), ("closed_loop", False), ("fuse_method", "pyramid"), ("freenoise", True),
             ("retain_first_frame", False), ("split_conds_to_windows", False)],
            {"model": (8, 0)}, [("MODEL", "MODEL")], (740, 640), (330, 270))

IT_NOTE = """ActAvatar on InfiniteTalk (Wan2.1 I2V-14B with core's InfiniteTalk patch: real lip sync) with timed actions.

Model files (community names, ComfyUI's model folders):
- diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors
- model_patches/wan2.1_infiniteTalk_single_fp16.safetensors
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
- clip_vision/clip_vision_h.safetensors
- audio_encoders/wav2vec2-chinese-base_fp16.safetensors
- vae/wan_2.1_vae.safetensors

VRAM: not measured by ActAvatar, and no figure of the model makers is quoted here: the 14B model's fp8 file alone
is about 16 GB, so on smaller cards ComfyUI offloads part of it (slower).

Timing: 81 frames at 25 fps = 3.24 s (InfiniteTalk runs at 25 fps: the Phase Prompt's fps is 25; its duration 0
follows the connected speech). Phase Control comes after WanInfiniteTalkToVideo: InfiniteTalk's audio attention
(its attn2 patch) runs after the routed text cross-attention in every block.
CFG 1 and phase_cfg 0: core's InfiniteTalk patch (ComfyUI 0.33) takes one pass per model call, and a CFG above 1 or
phase guidance batches passes together, which it refuses (a shape error). The timing comes from Phase Control. For the next chunk (previous_frames),
set Phase Control's start_seconds to the time of the chunk's first motion frame and clip_seconds to the whole clip."""

IT: dict[int, tuple] = {
    1: ("UNETLoader", "Load Diffusion Model (Wan2.1 I2V-14B 480p)",
        [("unet_name", "wan2.1_i2v_480p_14B_fp8_scaled.safetensors"), ("weight_dtype", "default")], {},
        [("MODEL", "MODEL")], (20, 40), (330, 90)),
    2: ("CLIPLoader", "Load CLIP (umT5)",
        [("clip_name", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("type", "wan"), ("device", "default")], {},
        [("CLIP", "CLIP")], (20, 170), (330, 110)),
    3: ("VAELoader", "Load VAE (Wan2.1)", [("vae_name", "wan_2.1_vae.safetensors")], {}, [("VAE", "VAE")],
        (20, 320), (330, 60)),
    4: ("CLIPVisionLoader", "Load CLIP Vision", [("clip_name", "clip_vision_h.safetensors")], {},
        [("CLIP_VISION", "CLIP_VISION")], (20, 420), (330, 60)),
    5: ("LoadImage", "Reference image", [("image", "actavatar_demo_reference.png"), (None, "image")], {},
        [("IMAGE", "IMAGE"), ("MASK", "MASK")], (20, 520), (330, 330)),
    6: ("CLIPVisionEncode", "CLIP Vision Encode", [("crop", "none")], {"clip_vision": (4, 0), "image": (5, 0)},
        [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], (400, 620), (300, 80)),
    7: ("ModelPatchLoader", "Load InfiniteTalk patch", [("name", "wan2.1_infiniteTalk_single_fp16.safetensors")],
        {}, [("MODEL_PATCH", "MODEL_PATCH")], (20, 890), (330, 60)),
    8: ("AudioEncoderLoader", "Load Audio Encoder (wav2vec2 chinese base)",
        [("audio_encoder_name", "wav2vec2-chinese-base_fp16.safetensors")], {},
        [("AUDIO_ENCODER", "AUDIO_ENCODER")], (20, 990), (330, 60)),
    9: ("LoadAudio", "Speech", [("audio", "actavatar_demo_speech.wav"), (None, None), (None, None)], {},
        [("AUDIO", "AUDIO")], (20, 1090), (330, 140)),
    10: ("AudioEncoderEncode", "Audio Encoder Encode", [], {"audio_encoder": (8, 0), "audio": (9, 0)},
         [("AUDIO_ENCODER_OUTPUT", "AUDIO_ENCODER_OUTPUT")], (400, 1090), (300, 60)),
    11: ("ActAvatarPhasePrompt", "ActAvatar Phase Prompt",
         [("phase_script", S2V_SCRIPT), ("duration", 0.0), ("fps", 25.0)], {"audio": (9, 0)},
         [("phase_prompt", "PHASE_PROMPT")], (400, 40), (520, 330)),
    12: ("ActAvatarPhaseTextEncode", "ActAvatar Phase Text Encode", [("negative", "")],
         {"clip": (2, 0), "phase_prompt": (11, 0)},
         [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], (980, 40), (330, 160)),
    13: ("ModelSamplingSD3", "ModelSamplingSD3", [("shift", 8.0)], {"model": (1, 0)}, [("MODEL", "MODEL")],
         (400, 420), (300, 60)),
    14: ("WanInfiniteTalkToVideo", "WanInfiniteTalkToVideo",
         [("mode", "single_speaker"), ("width", 832), ("height", 480), ("length", 81), ("motion_frame_count", 9),
          ("audio_scale", 1.0)],
         {"model": (13, 0), "model_patch": (7, 0), "positive": (12, 0), "negative": (12, 1), "vae": (3, 0),
          "clip_vision_output": (6, 0), "start_image": (5, 0), "audio_encoder_output_1": (10, 0)},
         [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
          ("trim_image", "INT")], (980, 260), (330, 330)),
    15: ("ActAvatarPhaseControl", "ActAvatar Phase Control",
         [("mode", "routed"), ("feather", 2.0), ("relay_width", 2.0), ("start_seconds", 0.0), ("clip_seconds", 0.0)],
         {"model": (14, 0)}, [("model", "MODEL")], (1340, 40), (330, 180)),
    16: ("ActAvatarPhaseGuider", "ActAvatar Phase Guider", [("cfg", 1.0), ("phase_cfg", 0.0)],
         {"model": (15, 0), "positive": (14, 1), "negative": (14, 2)}, [("guider", "GUIDER")], (1340, 260),
         (300, 130)),
    17: ("KSamplerSelect", "KSamplerSelect", [("sampler_name", "uni_pc")], {}, [("SAMPLER", "SAMPLER")],
         (1340, 420), (300, 60)),
    18: ("BasicScheduler", "BasicScheduler", [("scheduler", "simple"), ("steps", 20), ("denoise", 1.0)],
         {"model": (15, 0)}, [("SIGMAS", "SIGMAS")], (1340, 520), (300, 110)),
    19: ("RandomNoise", "RandomNoise", [("noise_seed", 42), (None, "fixed")], {}, [("NOISE", "NOISE")],
         (1340, 670), (300, 90)),
    20: ("SamplerCustomAdvanced", "SamplerCustomAdvanced", [],
         {"noise": (19, 0), "guider": (16, 0), "sampler": (17, 0), "sigmas": (18, 0), "latent_image": (14, 3)},
         [("output", "LATENT"), ("denoised_output", "LATENT")], (1700, 260), (300, 130)),
    21: ("VAEDecode", "VAE Decode", [], {"samples": (20, 0), "vae": (3, 0)}, [("IMAGE", "IMAGE")],
         (1700, 440), (220, 50)),
    22: ("CreateVideo", "Create Video", [("fps", 25.0), ("bit_depth", 8)], {"images": (21, 0), "audio": (9, 0)},
         [("VIDEO", "VIDEO")], (1960, 260), (300, 100)),
    23: ("SaveVideo", "Save Video",
         [("filename_prefix", "video/ActAvatar_native_infinitetalk"), ("format", "auto"), ("format.codec", "auto"),
          ("codec", "auto")], {"video": (22, 0)}, [("video", "VIDEO")], (1960, 420), (400, 400)),
}

#: name -> (graph, link inputs that are optional in their schema (drawn with the optional shape), unlinked optional
#: link inputs the UI shows, the note's text, the phase script and clip length it must fit, its output node)
WORKFLOWS = {
    "actavatar_native_ti2v": (TI2V, {(9, "start_image")}, {5: [("audio", "AUDIO")], 16: [("audio", "AUDIO")]},
                              NOTE, SCRIPT, 121 / 24.0, 24.0, "17"),
    "actavatar_native_s2v": (S2V, {(8, "audio"), (10, "audio_encoder_output"), (10, "ref_image"), (19, "audio")},
                             {10: [("control_video", "IMAGE"), ("ref_motion", "IMAGE")]}, S2V_NOTE, S2V_SCRIPT,
                             49 / 16.0, 16.0, "20"),
    "actavatar_native_infinitetalk": (IT, {(11, "audio"), (14, "clip_vision_output"), (14, "start_image"),
                                           (22, "audio")}, {14: [("previous_frames", "IMAGE")]}, IT_NOTE, S2V_SCRIPT,
                                      81 / 25.0, 25.0, "23"),
    "actavatar_native_ti2v_long": (LONG, {(9, "start_image")}, {5: [("audio", "AUDIO")], 16: [("audio", "AUDIO")]},
                                   LONG_NOTE, LONG_SCRIPT, 241 / 24.0, 24.0, "17"),
}
OURS = {"ActAvatarPhasePrompt", "ActAvatarPhaseTextEncode", "ActAvatarPhaseControl", "ActAvatarPhaseGuider"}


def _files(name: str) -> tuple[Path, Path]:
    return ROOT / "workflows" / f"{name}.json", ROOT / "workflows" / "api" / f"{name}.json"


def _input_type(graph: dict, node_id: int, name: str) -> str:
    src, slot = graph[node_id][3][name]
    return graph[src][4][slot][1]


def _order(graph: dict) -> dict[int, int]:
    done: list[int] = []
    while len(done) < len(graph):
        for nid, node in graph.items():
            if nid not in done and all(src in done for src, _ in node[3].values()):
                done.append(nid)
    return {nid: i for i, nid in enumerate(done)}


def build(name: str) -> tuple[dict, dict]:
    """(UI workflow, API prompt) of one shipped workflow."""
    graph, optional_inputs, free_inputs, note = WORKFLOWS[name][:4]
    workflow_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"actavatar/{name}"))
    links, link_of = [], {}
    for nid, node in graph.items():
        for name, (src, slot) in node[3].items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, nid, None, _input_type(graph, nid, name)])
            link_of[(nid, name)] = link_id
    order = _order(graph)
    nodes = []
    for nid, (kind, title, widgets, inputs, outputs, pos, size) in graph.items():
        ins = []
        for name in inputs:
            entry = {"name": name, "type": _input_type(graph, nid, name), "link": link_of[(nid, name)]}
            if (nid, name) in optional_inputs:
                entry = {"name": name, "shape": 7, "type": entry["type"], "link": entry["link"]}
            ins.append(entry)
        for name, kind_ in free_inputs.get(nid, []):
            ins.append({"name": name, "shape": 7, "type": kind_, "link": None})
        for slot, (name, _) in enumerate(inputs.items()):
            links[link_of[(nid, name)] - 1][4] = [i["name"] for i in ins].index(name)
        outs = []
        for slot, (name, kind_) in enumerate(outputs):
            targets = [link[0] for link in links if link[1] == nid and link[2] == slot]
            outs.append({"name": name, "type": kind_, "slot_index": slot, "links": targets or None})
        nodes.append({"id": nid, "type": kind, "pos": list(pos), "size": list(size), "flags": {}, "order": order[nid],
                      "mode": 0, "inputs": ins, "outputs": outs, "title": title,
                      "properties": {"cnr_id": "actavatar" if kind in OURS else "comfy-core",
                                     "ver": "0.1.0" if kind in OURS else "0.33.0", "Node name for S&R": kind},
                      "widgets_values": [value for _, value in widgets]})
    note_id = max(graph) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [20, 800], "size": [900, 330], "flags": {},
                  "order": len(graph), "mode": 0, "inputs": [], "outputs": [], "title": "Read me: models, VRAM, timing",
                  "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    ui = {"id": workflow_id, "revision": 0, "last_node_id": note_id,
          "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {},
          "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": "1.49.6"}, "version": 0.4}
    api = {}
    for nid, (kind, title, widgets, inputs, _, _, _) in graph.items():
        values = {name: value for name, value in widgets if name is not None}
        values.update({name: [str(src), slot] for name, (src, slot) in inputs.items()})
        api[str(nid)] = {"class_type": kind, "inputs": values, "_meta": {"title": title}}
    return ui, api


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write() -> None:
    for name in WORKFLOWS:
        ui, api = build(name)
        ui_file, api_file = _files(name)
        ui_file.write_text(_dump(ui))
        api_file.write_text(_dump(api))


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_committed_files_are_what_build_writes(name):
    ui, api = build(name)
    ui_file, api_file = _files(name)
    assert ui_file.read_text() == _dump(ui), f"run: python {Path(__file__).relative_to(ROOT)}"
    assert api_file.read_text() == _dump(api), f"run: python {Path(__file__).relative_to(ROOT)}"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_link_joins_matching_types(name):
    ui, api = build(name)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:
        assert by_id[src]["outputs"][slot]["type"] == kind == by_id[dst]["inputs"][dst_slot]["type"]
        assert link_id in by_id[src]["outputs"][slot]["links"] and by_id[dst]["inputs"][dst_slot]["link"] == link_id
    assert {n["class_type"] for n in api.values()} >= OURS
    guider = next(k for k, n in api.items() if n["class_type"] == "ActAvatarPhaseGuider")
    control = next(k for k, n in api.items() if n["class_type"] == "ActAvatarPhaseControl")
    # the guider's model is Phase Control's, directly or through core's model patches after it (context windows)
    src = api[guider]["inputs"]["model"][0]
    while src != control and "model" in api[src]["inputs"]:
        src = api[src]["inputs"]["model"][0]
    assert src == control


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_our_nodes_values_pass_their_schemas(name):
    from comfy_doubles import require_comfy_api

    require_comfy_api()
    import importlib.util

    spec = importlib.util.spec_from_file_location("actavatar_native_phase_nodes", ROOT / "nodes" / "native_phase.py")
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    from actavatar_core.phases import PhaseScript

    graph, _, _, _, script, seconds, fps, _ = WORKFLOWS[name]
    classes = {cls.GET_SCHEMA().node_id: cls for cls in native.NODES}
    _, api = build(name)
    for nid, node in api.items():
        cls = classes.get(node["class_type"])
        if cls is None:
            continue
        types = cls.INPUT_TYPES()
        declared = {**types.get("required", {}), **types.get("optional", {})}
        assert set(types.get("required", {})) <= set(node["inputs"]) <= set(declared), node["class_type"]
        widgets = [n for n, value in graph[int(nid)][2]]
        assert widgets == [n for n, v in declared.items() if v[0] in ("INT", "FLOAT", "STRING", "COMBO", "BOOLEAN")]
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                continue
            kind, opts = declared[key][0], (declared[key][1] if len(declared[key]) > 1 else {})
            if kind == "COMBO":
                assert value in opts["options"], (key, value)
            elif kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), (key, value)
    prompt = next(n for n in api.values() if n["class_type"] == "ActAvatarPhasePrompt")["inputs"]
    assert prompt["fps"] == fps
    assert PhaseScript.parse(script).problems(duration=seconds, fps=fps) == []  # the script fits the clip


def _core_schemas(types: list[str]) -> dict:
    code = f"""
import asyncio, json, sys
sys.argv = [sys.argv[0], "--cpu"]; sys.path.insert(0, {os.environ.get("COMFYUI_DIR", "")!r})
import comfy.options; comfy.options.enable_args_parsing()
import nodes
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
out = {{}}
for name in {types!r}:
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    it = cls.INPUT_TYPES()
    def kind(v):
        return "COMBO" if isinstance(v[0], list) else v[0]
    out[name] = {{"inputs": [[n, kind(v), group, bool(len(v) > 1 and isinstance(v[1], dict) and v[1].get("control_after_generate"))]
                             for group in ("required", "optional") for n, v in it.get(group, {{}}).items()],
                 "outputs": list(cls.RETURN_TYPES)}}
print("SCHEMAS" + json.dumps(out))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("SCHEMAS")]
    assert line, out.stderr[-2000:]
    return json.loads(line[0][len("SCHEMAS"):])


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_core_nodes_match_a_real_comfyui(name):
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set: point it at a copy of ComfyUI 0.33.0 to check the core nodes' schemas")
    graph = WORKFLOWS[name][0]
    core = sorted({node[0] for node in graph.values()} - OURS)
    schemas = _core_schemas(core)
    links = ("MODEL", "CLIP", "VAE", "IMAGE", "LATENT", "NOISE", "GUIDER", "SAMPLER", "SIGMAS", "VIDEO", "AUDIO",
             "CONDITIONING", "AUDIO_ENCODER", "AUDIO_ENCODER_OUTPUT", "CLIP_VISION", "CLIP_VISION_OUTPUT",
             "MODEL_PATCH", "MASK")
    for nid, (kind, _, widgets, inputs, outputs, _, _) in graph.items():
        if kind in OURS:
            continue
        schema = schemas[kind]
        assert [k for _, k in outputs] == schema["outputs"], kind
        declared = {n: (k, group) for n, k, group, _ in schema["inputs"]}
        for key in inputs:
            assert declared[key][0] == _input_type(graph, nid, key), (kind, key)
        required_links = {n for n, (k, group) in declared.items() if group == "required" and k in links}
        assert required_links <= set(inputs), (kind, required_links - set(inputs))
        expected = []
        for n, k, _, control in schema["inputs"]:
            if k in links:
                continue
            expected.append(n)
            if control:
                expected.append(None)  # the UI's control_after_generate value
        if kind == "LoadImage":
            expected.append(None)  # the upload widget
        if kind == "LoadAudio":
            expected += [None, None]  # the upload and preview widgets
        if kind == "SaveVideo":  # format is a dynamic combo whose codec option sits right after it
            expected.insert(expected.index("format") + 1, "format.codec")
        assert [n for n, _ in widgets] == expected, kind


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_comfyui_validates_the_api_prompt_with_the_pack_loaded(tmp_path, name):
    """ComfyUI's own ``execution.validate_prompt`` (types, links, combo values, ranges, our VALIDATE_INPUTS) on the
    API prompt, with the pack loaded as a custom node and empty model files of the community names in place."""
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set: point it at a copy of ComfyUI 0.33.0 to validate the prompt")
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    (custom / "actavatar").symlink_to(ROOT)
    _, api = build(name)
    api_file = _files(name)[1]
    wanted = {"UNETLoader": ("diffusion_models", "unet_name"), "CLIPLoader": ("text_encoders", "clip_name"),
              "VAELoader": ("vae", "vae_name"), "AudioEncoderLoader": ("audio_encoders", "audio_encoder_name"),
              "CLIPVisionLoader": ("clip_vision", "clip_name"), "ModelPatchLoader": ("model_patches", "name")}
    files = {wanted[n["class_type"]][0]: n["inputs"][wanted[n["class_type"]][1]] for n in api.values()
             if n["class_type"] in wanted}
    for folder, file_name in files.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / file_name).write_bytes(b"")
    (tmp_path / "input").mkdir()
    import numpy as np
    from PIL import Image

    for node in api.values():
        if node["class_type"] == "LoadImage":
            Image.new("RGB", (64, 64)).save(tmp_path / "input" / node["inputs"]["image"])
        if node["class_type"] == "LoadAudio":
            import wave

            with wave.open(str(tmp_path / "input" / node["inputs"]["audio"]), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(16000)
                out.writeframes((np.sin(np.arange(16000 * 3) / 10) * 8000).astype("<i2").tobytes())
    code = f"""
import asyncio, json, sys
sys.argv = [sys.argv[0], "--cpu"]; sys.path.insert(0, {os.environ["COMFYUI_DIR"]!r})
import comfy.options; comfy.options.enable_args_parsing()
import folder_paths
for folder in {sorted(files)!r}:
    folder_paths.add_model_folder_path(folder, {str(tmp_path)!r} + "/" + folder, is_default=True)
folder_paths.set_input_directory({str(tmp_path / "input")!r})
folder_paths.add_model_folder_path("custom_nodes", {str(custom)!r}, is_default=True)
import nodes, execution
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
prompt = json.load(open({str(api_file)!r}))
valid = asyncio.run(execution.validate_prompt("test", prompt, None))
print("VALID" + json.dumps([valid[0], valid[1], valid[2], {{k: v for k, v in valid[3].items()}}], default=str))
"""
    env = {**os.environ, "ACTAVATAR_NO_DEMO_INPUTS": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("VALID")]
    assert line, out.stderr[-3000:]
    ok, error, outputs, node_errors = json.loads(line[0][len("VALID"):])
    assert ok, (error, node_errors)
    assert outputs == [WORKFLOWS[name][7]]


if __name__ == "__main__":
    write()
