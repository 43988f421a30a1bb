"""Sampler: reference image + phase conditioning + speech -> LATENT (raw Wan2.2 latents), fps, and the clip's audio."""

from __future__ import annotations

import logging
from typing import Any

from comfy_api.latest import io

from actavatar_core.attention import PACA_MODES
from actavatar_core.limits import MAX_FRAMES
from actavatar_core.sampling import SAMPLERS

from . import comfy_bridge as bridge
from . import conventions as conv
from .values import AudioEmbeds, ConditioningType, Model, Vae

log = logging.getLogger("ActAvatar")

AUDIO_SCHEDULES = ["trained", "progressive", "uniform"]
SIZE_STEP = 32  # pixels per transformer token side of Wan2.2 TI2V-5B (VAE stride 16 x patch 2)
SEED_MAX = 0xFFFFFFFFFFFFFFFF


class ActAvatarSampler(io.ComfyNode):
    """Generate the clip's latents: flow-matching sampling with the reference image as the clean first frame, PACA
    phase routing over time and separate text/audio guidance.

    Output LATENT["samples"] holds raw (un-normalised) Wan2.2 VAE latents, ComfyUI's convention, so both
    ActAvatar Decode and core's VAEDecode (with wan2.2_vae) decode it. Also outputs the frame rate (from the Phase
    Prompt) and the speech trimmed/padded to the clip, for Save Video or core's CreateVideo.
    """

    REQUIRES = ("diffusers", "transformers")

    @classmethod
    def define_schema(cls) -> io.Schema:
        max_size = bridge.max_resolution()
        return io.Schema(
            node_id="ActAvatarSampler", display_name="ActAvatar Sampler", category="ActAvatar",
            description="Generates the talking, acting avatar clip (latents) from the reference image, phases and speech.",
            inputs=[
                Model.Input("model"),
                ConditioningType.Input("conditioning"),
                AudioEmbeds.Input("audio_embeds", tooltip="The speech's features (ActAvatar Audio Encode, which "
                                                          "also takes core's AUDIO_ENCODER_OUTPUT)."),
                io.Image.Input("image", tooltip="The reference image (first frame of the clip); resized and "
                                                "centre-cropped."),
                Vae.Input("vae"),
                io.Int.Input("width", default=704, min=SIZE_STEP, max=max_size, step=SIZE_STEP,
                             tooltip=f"Video width (multiple of {SIZE_STEP})."),
                io.Int.Input("height", default=1280, min=SIZE_STEP, max=max_size, step=SIZE_STEP,
                             tooltip=f"Video height (multiple of {SIZE_STEP})."),
                io.Int.Input("frames", default=0, min=1, max=MAX_FRAMES, step=4,
                             tooltip="0 (the default) = follow the audio (or the Phase Prompt's duration). Otherwise "
                                     f"4k+1 frames (1, 5, 9, ..., 121, ... {MAX_FRAMES}, the most the model's rotary "
                                     "table holds): the speech is trimmed or padded with silence."),
                io.Int.Input("steps", default=40, min=1, max=1000),
                io.Float.Input("text_cfg", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Text (phase prompt) guidance scale; 1 turns it off."),
                io.Float.Input("audio_cfg", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Audio (lip sync) guidance scale; 1 turns it off."),
                io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.1, round=0.01,
                               tooltip="Flow-matching timestep shift (Wan2.2 TI2V uses 5)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True),
                io.Combo.Input("sampler", options=list(SAMPLERS), default="unipc"),
                io.Combo.Input("paca_mode", options=list(PACA_MODES), default="learned",
                               tooltip="learned: the paper's PACA (phase embeddings); routed: ours, each frame also "
                                       "sees only its active phases (use it for weights trained routed, as the "
                                       "bundled mini model); relay: every phase stays visible, fading with the "
                                       "distance from its window (relay_width); global: plain prompt. On weights "
                                       "never trained for phases no mode timed the actions (docs/RESULTS.md)."),
                io.Float.Input("feather", default=0.0, min=0.0, max=8.0, step=0.25,
                               tooltip="Soft phase boundaries, in latent frames (0 = hard switch)."),
                io.Combo.Input("audio_schedule", options=AUDIO_SCHEDULES, default="trained",
                               tooltip="Depth schedule of the audio cross-attention: as trained, progressive "
                                       "(l/L)^gamma, or uniform."),
                io.Float.Input("audio_gamma", default=1.5, min=0.1, max=8.0, step=0.1,
                               tooltip="gamma of the progressive schedule."),
                # Optional, so API prompts saved before it existed still validate (ComfyUI rejects a missing
                # required input).
                io.Float.Input("phase_cfg", default=0.0, min=0.0, max=30.0, step=0.1, round=0.01, optional=True,
                               tooltip="Phase guidance: an extra push towards the phases' actions, against the "
                                       "same prompt with its phases hidden. 0 turns it off; above 0 each step "
                                       "costs one more model pass. The bundled mini model uses 2."),
                io.Float.Input("relay_width", default=2.0, min=0.05, max=64.0, step=0.25, optional=True,
                               tooltip="relay mode: how far, in latent frames, a phase's words still reach outside "
                                       "its window (Gaussian penalty; small is close to routed, large to learned)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="Raw Wan2.2 latents (decode with ActAvatar Decode or VAEDecode + wan2.2_vae)."),
                io.Float.Output(display_name="fps", tooltip="The clip's frame rate (set on the Phase Prompt)."),
                io.Audio.Output(display_name="audio", tooltip="The speech fitted to the clip's length."),
            ],
        )

    @classmethod
    def validate_inputs(cls, frames: Any = 0) -> bool | str:
        """Queue-time check of the clip length (only ``frames``, so the message shows once, on that input; width
        and height keep ComfyUI's own range check, and their multiple of 32 is checked before anything runs)."""
        if frames is None or conv.left_unconverted(frames):
            return True  # linked, or not a number (ComfyUI reports that on the input itself)
        problem = conv.frames_problem(frames)
        return True if problem is None else problem

    @classmethod
    def execute(cls, model, conditioning, audio_embeds, image, vae, width: int, height: int, frames: int = 0,
                steps: int = 40, text_cfg: float = 5.0, audio_cfg: float = 5.0, shift: float = 5.0, seed: int = 0,
                sampler: str = "unipc", paca_mode: str = "learned", feather: float = 0.0,
                audio_schedule: str = "trained", audio_gamma: float = 1.5, phase_cfg: float = 0.0,
                relay_width: float = 2.0) -> io.NodeOutput:
        from actavatar_core.limits import check_clip, limits_of
        from actavatar_core.phases import latent_frame_count
        from actavatar_core.pipeline import check_speech_features, generate_clip_latents
        from actavatar_core.sampling import SamplingOptions
        from actavatar_core.vae import check_size, encode_reference

        phase_prompt = conditioning.phase_prompt
        fps = phase_prompt.fps
        transformer = model.module
        config = transformer.config
        options = SamplingOptions(steps=int(steps), text_cfg=float(text_cfg), audio_cfg=float(audio_cfg),
                                  shift=float(shift), sampler=sampler, seed=int(seed), paca_mode=paca_mode,
                                  feather=float(feather), phase_cfg=float(phase_cfg), relay_width=float(relay_width))
        options.check()
        check_size(int(width), int(height))
        # Every input check before any model runs.
        speech, original = conv.speech_from_encoder_output(audio_embeds)
        num_frames = conv.clip_frames(int(frames), phase_prompt, speech)
        check_clip(fps=fps, num_frames=num_frames, limits=limits_of(_Models(transformer, vae.module)))
        script = conv.validate_for_clip(phase_prompt, num_frames, config.max_phases)
        check_speech_features(speech.features, config)
        reference = conv.reference_from_images(image)
        num_latent = latent_frame_count(num_frames)
        bridge.throw_if_interrupted()
        with vae.managed.use(conv.vae_encode_memory_bytes(height, width, vae.managed.dtype_bytes)) as vae_module:
            first_latent = encode_reference(vae_module, reference, int(width), int(height))

        progress = bridge.progress_bar(options.steps)
        previewer = bridge.latent_previewer(model.managed.load_device)

        def on_step(info) -> None:
            preview = previewer(conv.preview_latent(info.denoised)) if previewer is not None else None
            progress.update_absolute(info.step, info.total, preview)

        memory = conv.sampling_memory_bytes(num_latent, first_latent.shape[-2], first_latent.shape[-1], config,
                                            model.managed.dtype_bytes)
        with model.managed.use(memory) as module:
            if audio_schedule != "trained":
                module.set_audio_schedule(audio_schedule, float(audio_gamma))
            try:
                clip = generate_clip_latents(module, prompt=conditioning.prompt, negative=conditioning.negative,
                                             speech=speech, reference_latent=first_latent, script=script, fps=fps,
                                             num_frames=num_frames, options=options, on_step=on_step,
                                             check_cancel=bridge.throw_if_interrupted)
            finally:
                module.set_audio_schedule(None)  # the model is shared: never leave an override behind
        samples = conv.raw_latents(clip.latents, vae.module).to(bridge.intermediate_device())
        if original is None:
            log.warning("ActAvatar Sampler: the speech came without its AUDIO (core's AUDIO_ENCODER_OUTPUT only), so "
                        "the audio output is silence; connect the speech to ActAvatar Audio Encode's audio input.")
        clip_audio = conv.fit_audio(original, num_frames, fps)
        return io.NodeOutput({"samples": samples}, fps, clip_audio)


class _Models:
    """The transformer and VAE of a run, as :func:`actavatar_core.limits.limits_of` reads them."""

    def __init__(self, transformer: Any, vae: Any):
        self.transformer, self.vae = transformer, vae
