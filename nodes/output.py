"""Decode (LATENT -> IMAGE frames, in chunks) and Save Video (IMAGE + AUDIO -> H.264/AAC MP4 in the output folder)."""

from __future__ import annotations

import math

from actavatar_core import comfy_glue as glue
from actavatar_core.phases import DEFAULT_FPS

from . import comfy_bridge as bridge
from .values import VAE


class ActAvatarDecode:
    """Decode raw Wan2.2 latents (ActAvatar Sampler, or any Wan2.2 TI2V-5B sampler) to a frame batch, a few
    latent frames at a time so memory stays bounded; Cancel stops between chunks."""

    CATEGORY = "ActAvatar"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    DESCRIPTION = "Decodes the latents with the Wan2.2 VAE into video frames (IMAGE batch), chunk by chunk."
    REQUIRES = ("diffusers",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": (VAE,),
            "latent": ("LATENT",),
            "chunk_latent_frames": ("INT", {"default": 4, "min": 1, "max": 64,
                                            "tooltip": "Latent frames decoded at once (each is 4 video frames): "
                                                       "lower uses less VRAM."}),
        }}

    def decode(self, vae, latent: dict, chunk_latent_frames: int = 4):
        import torch

        from actavatar_core.vae import decode_stream

        out = bridge.intermediate_device()
        chunk = int(chunk_latent_frames)
        frames = []
        samples = latent["samples"]
        memory = glue.vae_decode_memory_bytes(samples.shape[-2], samples.shape[-1], vae.managed.dtype_bytes)
        with vae.managed.use(memory) as module:
            batch = glue.normalised_latents(samples, module)
            progress = bridge.progress_bar(int(batch.shape[0]) * math.ceil(int(batch.shape[2]) / chunk))
            done = 0
            for item in batch:
                for part in decode_stream(module, item[None], chunk, check_cancel=bridge.throw_if_interrupted):
                    frames.append(glue.frames_to_images(part, out))
                    done += 1
                    progress.update_absolute(done, None, None)
        return (torch.cat(frames, dim=0),)


class ActAvatarSaveVideo:
    """Write frames + speech as an H.264/AAC MP4 into ComfyUI's output folder (never outside it, whatever the
    prefix says), atomically (a cancelled or failed run leaves no file), with the workflow and prompt embedded like
    core's SaveVideo. Shows the video on the node and outputs it as VIDEO for core's video nodes."""

    CATEGORY = "ActAvatar"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    DESCRIPTION = "Saves the clip as an MP4 (H.264 + AAC) in the output folder, with the workflow embedded."
    REQUIRES = ("av",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames (ActAvatar Decode or VAE Decode)."}),
                "fps": ("FLOAT", {"default": DEFAULT_FPS, "min": 1.0, "max": 120.0, "step": 0.001,
                                  "tooltip": "Frame rate; connect the Sampler's fps output."}),
                "filename_prefix": ("STRING", {"default": "ActAvatar/ActAvatar",
                                               "tooltip": "File name prefix inside the output folder; may name "
                                                          "sub-folders and use %date-style% variables like "
                                                          "%year%-%month%-%day%."}),
                "crf": ("INT", {"default": 18, "min": 0, "max": 51, "tooltip": "H.264 quality: lower is better and "
                                                                                "larger (18 is visually lossless)."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "The speech (the Sampler's audio output is already fitted to the clip)."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, fps: float, filename_prefix: str = "ActAvatar/ActAvatar", crf: int = 18, audio=None,
             prompt=None, extra_pnginfo=None):
        from actavatar_core.errors import ImageInputError
        from actavatar_core.video import Mp4Writer

        problem = glue.even_size_problem(images)
        if problem:
            text, _, fix = problem.partition(" Fix: ")
            raise ImageInputError(text, fix)
        count, height, width = int(images.shape[0]), int(images.shape[-3]), int(images.shape[-2])
        path, filename, subfolder = glue.output_file(bridge.directory("output"), filename_prefix, width, height)
        metadata = None if bridge.metadata_disabled() else glue.video_metadata(prompt, extra_pnginfo)
        clip_audio = glue.fit_audio(audio, count, float(fps)) if audio is not None else None
        samples = clip_audio["waveform"][0].float().cpu().numpy() if clip_audio is not None else None
        rate = clip_audio["sample_rate"] if clip_audio is not None else None
        with Mp4Writer(path, float(fps), width, height, crf=int(crf), audio=samples, sample_rate=rate,
                       metadata=metadata, overwrite=False) as writer:
            for chunk in glue.images_to_frame_chunks(images):
                bridge.throw_if_interrupted()
                writer.add(chunk)
            writer.close()
        glue.make_readable(path)
        result = {"filename": filename, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [result], "animated": (True,)}, "result": (bridge.video_from_file(path),)}
