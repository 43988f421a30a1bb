"""Decode (LATENT -> IMAGE frames, in chunks) and Save Video (IMAGE + AUDIO -> H.264/AAC MP4 in the output folder)."""

from __future__ import annotations

import math
from typing import Any

from comfy_api.latest import io, ui

from actavatar_core.phases import DEFAULT_FPS

from . import comfy_bridge as bridge
from . import conventions as conv
from .values import Vae


class ActAvatarDecode(io.ComfyNode):
    """Decode raw Wan2.2 latents (ActAvatar Sampler, or any Wan2.2 TI2V-5B sampler) to a frame batch, a few
    latent frames at a time so memory stays bounded; Cancel stops between chunks."""

    REQUIRES = ("diffusers",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarDecode", display_name="ActAvatar Decode", category="ActAvatar",
            description="Decodes the latents with the Wan2.2 VAE into video frames (IMAGE batch), chunk by chunk.",
            inputs=[
                Vae.Input("vae"),
                io.Latent.Input("latent"),
                io.Int.Input("chunk_latent_frames", default=4, min=1, max=64,
                             tooltip="Latent frames decoded at once (each is 4 video frames): lower uses less VRAM."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, vae, latent: dict, chunk_latent_frames: int = 4) -> io.NodeOutput:
        import torch

        from actavatar_core.vae import decode_stream

        out = bridge.intermediate_device()
        chunk = int(chunk_latent_frames)
        frames = []
        samples = latent["samples"]
        memory = conv.vae_decode_memory_bytes(samples.shape[-2], samples.shape[-1], vae.managed.dtype_bytes)
        with vae.managed.use(memory) as module:
            batch = conv.normalised_latents(samples, module)
            progress = bridge.progress_bar(int(batch.shape[0]) * math.ceil(int(batch.shape[2]) / chunk))
            done = 0
            for item in batch:
                for part in decode_stream(module, item[None], chunk, check_cancel=bridge.throw_if_interrupted):
                    frames.append(conv.frames_to_images(part, out))
                    done += 1
                    progress.update_absolute(done, None, None)
        return io.NodeOutput(torch.cat(frames, dim=0))


class ActAvatarSaveVideo(io.ComfyNode):
    """Write frames + speech as an H.264/AAC MP4 into ComfyUI's output folder (never outside it, whatever the
    prefix says: a prefix leaving it is refused at queue time, before anything runs), atomically (a cancelled or
    failed run leaves no file), with the workflow and prompt embedded like core's SaveVideo. Shows the video on the
    node and outputs it as VIDEO for core's video nodes."""

    REQUIRES = ("av",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarSaveVideo", display_name="ActAvatar Save Video", category="ActAvatar",
            description="Saves the clip as an MP4 (H.264 + AAC) in the output folder, with the workflow embedded.",
            inputs=[
                io.Image.Input("images", tooltip="The frames (ActAvatar Decode or VAE Decode)."),
                io.Float.Input("fps", default=DEFAULT_FPS, min=1.0, max=120.0, step=0.001,
                               tooltip="Frame rate; connect the Sampler's fps output."),
                io.String.Input("filename_prefix", default="ActAvatar/ActAvatar",
                                tooltip="File name prefix inside the output folder; may name sub-folders and use "
                                        "%date-style% variables like %year%-%month%-%day%."),
                io.Int.Input("crf", default=18, min=0, max=51,
                             tooltip="H.264 quality: lower is better and larger (18 is visually lossless)."),
                io.Audio.Input("audio", optional=True,
                               tooltip="The speech (the Sampler's audio output is already fitted to the clip)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: Any = None) -> bool | str:
        """The prefix is checked at queue time (HTTP 400 from POST /prompt), not after the whole generation ran."""
        if filename_prefix is None:  # linked from another node: checked when it runs
            return True
        problem = conv.prefix_problem(bridge.directory("output"), filename_prefix)
        return True if problem is None else problem

    @classmethod
    def execute(cls, images, fps: float, filename_prefix: str = "ActAvatar/ActAvatar", crf: int = 18,
                audio=None) -> io.NodeOutput:
        from actavatar_core.errors import ImageInputError
        from actavatar_core.video import Mp4Writer

        problem = conv.even_size_problem(images)
        if problem:
            text, _, fix = problem.partition(" Fix: ")
            raise ImageInputError(text, fix)
        count, height, width = int(images.shape[0]), int(images.shape[-3]), int(images.shape[-2])
        path, filename, subfolder = conv.output_file(bridge.directory("output"), filename_prefix, width, height)
        hidden = cls.hidden
        prompt = getattr(hidden, "prompt", None) if hidden is not None else None
        extra_pnginfo = getattr(hidden, "extra_pnginfo", None) if hidden is not None else None
        metadata = None if bridge.metadata_disabled() else conv.video_metadata(prompt, extra_pnginfo)
        clip_audio = conv.fit_audio(audio, count, float(fps)) if audio is not None else None
        samples = clip_audio["waveform"][0].float().cpu().numpy() if clip_audio is not None else None
        rate = clip_audio["sample_rate"] if clip_audio is not None else None
        with Mp4Writer(path, float(fps), width, height, crf=int(crf), audio=samples, sample_rate=rate,
                       metadata=metadata, overwrite=False) as writer:
            for chunk in conv.images_to_frame_chunks(images):
                bridge.throw_if_interrupted()
                writer.add(chunk)
            writer.close()
        conv.make_readable(path)
        saved = ui.SavedResult(filename, subfolder, io.FolderType.output)
        return io.NodeOutput(bridge.video_from_file(path), ui=ui.PreviewVideo([saved]))
