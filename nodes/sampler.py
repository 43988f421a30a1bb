"""Sampler: reference image + phase conditioning + speech -> LATENT (raw Wan2.2 latents), fps, and the clip's audio."""

from __future__ import annotations

import logging

from actavatar_core import comfy_glue as glue

from . import comfy_bridge as bridge
from .values import AUDIO_EMBEDS, CONDITIONING, MODEL, VAE

log = logging.getLogger("ActAvatar")

SAMPLERS = ["unipc", "euler"]
PACA_MODES = ["routed", "learned", "global"]
AUDIO_SCHEDULES = ["trained", "progressive", "uniform"]
MAX_SIZE = 4096
MAX_FRAMES = 4097


class ActAvatarSampler:
    """Generate the clip's latents: flow-matching sampling with the reference image as the clean first frame, PACA
    phase routing over time and separate text/audio guidance.

    Output LATENT["samples"] holds raw (un-normalised) Wan2.2 VAE latents, ComfyUI's convention, so both
    ActAvatar Decode and core's VAEDecode (with wan2.2_vae) decode it. Also outputs the frame rate (from the Phase
    Prompt) and the speech trimmed/padded to the clip, for Save Video or core's CreateVideo.
    """

    CATEGORY = "ActAvatar"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "FLOAT", "AUDIO")
    RETURN_NAMES = ("latent", "fps", "audio")
    OUTPUT_TOOLTIPS = ("Raw Wan2.2 latents (decode with ActAvatar Decode or VAEDecode + wan2.2_vae).",
                       "The clip's frame rate (set on the Phase Prompt).",
                       "The speech fitted to the clip's length.")
    DESCRIPTION = "Generates the talking, acting avatar clip (latents) from the reference image, phases and speech."
    REQUIRES = ("diffusers", "transformers")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": (MODEL,),
            "conditioning": (CONDITIONING,),
            "audio_embeds": (AUDIO_EMBEDS,),
            "image": ("IMAGE", {"tooltip": "The reference image (first frame of the clip); resized and centre-cropped."}),
            "vae": (VAE,),
            "width": ("INT", {"default": 704, "min": 32, "max": MAX_SIZE, "step": 32,
                              "tooltip": "Video width (multiple of 32)."}),
            "height": ("INT", {"default": 1280, "min": 32, "max": MAX_SIZE, "step": 32,
                               "tooltip": "Video height (multiple of 32)."}),
            "frames": ("INT", {"default": 0, "min": 0, "max": MAX_FRAMES, "step": 1,
                               "tooltip": "0 = follow the audio (or the Phase Prompt's duration). Otherwise 4k+1 "
                                          "frames (1, 5, 9, ..., 121): the speech is trimmed or padded with silence."}),
            "steps": ("INT", {"default": 40, "min": 1, "max": 1000}),
            "text_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                   "tooltip": "Text (phase prompt) guidance scale; 1 turns it off."}),
            "audio_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                    "tooltip": "Audio (lip sync) guidance scale; 1 turns it off."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.1, "round": 0.01,
                                "tooltip": "Flow-matching timestep shift (Wan2.2 TI2V uses 5)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "sampler": (SAMPLERS, {"default": "unipc"}),
            "paca_mode": (PACA_MODES, {"default": "learned", "tooltip": "learned: the paper's PACA (phase "
                                       "embeddings); routed: ours, each frame also sees only its active phases (use it "
                                       "for weights trained routed, as the bundled mini model, or never trained for "
                                       "phases); global: plain prompt."}),
            "feather": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 8.0, "step": 0.25,
                                  "tooltip": "Soft phase boundaries, in latent frames (0 = hard switch)."}),
            "audio_schedule": (AUDIO_SCHEDULES, {"default": "trained", "tooltip": "Depth schedule of the audio "
                                                 "cross-attention: as trained, progressive (l/L)^gamma, or uniform."}),
            "audio_gamma": ("FLOAT", {"default": 1.5, "min": 0.1, "max": 8.0, "step": 0.1,
                                      "tooltip": "gamma of the progressive schedule."}),
        }, "optional": {
            # Optional, so API prompts saved before it existed still validate (ComfyUI rejects a missing required input).
            "phase_cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                    "tooltip": "Phase guidance: an extra push towards the phases' actions, against the "
                                               "same prompt with its phases hidden. 0 turns it off; above 0 each step "
                                               "costs one more model pass. The bundled mini model uses 2."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None = None, height: int | None = None, frames: int | None = None):
        if width is None or height is None:  # linked: checked when the node runs
            return True
        if not (32 <= int(width) <= MAX_SIZE and 32 <= int(height) <= MAX_SIZE):
            return f"The size {width}x{height} is outside 32..{MAX_SIZE}. Fix: use e.g. 704x1280."
        if frames is not None and not 0 <= int(frames) <= MAX_FRAMES:
            return f"frames {frames} is outside 0..{MAX_FRAMES}. Fix: use 0 to follow the audio, or 4k+1 frames."
        problem = glue.check_sizes(width, height, frames or 0)
        return True if problem is None else problem

    def sample(self, model, conditioning, audio_embeds, image, vae, width: int, height: int, frames: int = 0,
               steps: int = 40, text_cfg: float = 5.0, audio_cfg: float = 5.0, shift: float = 5.0, seed: int = 0,
               sampler: str = "unipc", paca_mode: str = "learned", feather: float = 0.0,
               audio_schedule: str = "trained", audio_gamma: float = 1.5, phase_cfg: float = 0.0):
        from actavatar_core.phases import latent_frame_count
        from actavatar_core.sampling import Conditioning, SamplingOptions, build_routing, sample
        from actavatar_core.vae import check_size, encode_reference

        phase_prompt = conditioning.phase_prompt
        fps = phase_prompt.fps
        transformer = model.module
        config = transformer.config
        options = SamplingOptions(steps=int(steps), text_cfg=float(text_cfg), audio_cfg=float(audio_cfg),
                                  shift=float(shift), sampler=sampler, seed=int(seed), paca_mode=paca_mode,
                                  feather=float(feather), phase_cfg=float(phase_cfg))
        options.check()
        check_size(int(width), int(height))
        # Every input check before any model runs.
        num_frames = glue.clip_frames(int(frames), phase_prompt, audio_embeds.waveform)
        script = glue.validate_for_clip(phase_prompt, num_frames, config.max_phases)
        reference = glue.reference_from_images(image)
        num_latent = latent_frame_count(num_frames)

        embedding = audio_embeds.embedding(fps, num_frames, config.audio_window)
        glue.check_audio_features(embedding, config.audio_feature_dim, config.audio_num_layers, config.audio_window)
        bridge.throw_if_interrupted()
        with vae.managed.use(glue.vae_encode_memory_bytes(height, width, vae.managed.dtype_bytes)) as vae_module:
            first_latent = encode_reference(vae_module, reference, int(width), int(height))
        routing = build_routing(script, conditioning.prompt.block_ids, num_latent, fps, options.feather)
        cond = Conditioning(text=conditioning.prompt.embeds, phase_ids=conditioning.prompt.block_ids,
                            negative=conditioning.negative.embeds, audio=embedding.features, routing=routing)

        progress = bridge.progress_bar(options.steps)
        previewer = bridge.latent_previewer(model.managed.load_device)

        def on_step(info) -> None:
            preview = previewer(glue.preview_latent(info.denoised)) if previewer is not None else None
            progress.update_absolute(info.step, info.total, preview)

        memory = glue.sampling_memory_bytes(num_latent, first_latent.shape[-2], first_latent.shape[-1], config,
                                            model.managed.dtype_bytes)
        with model.managed.use(memory) as module:
            if audio_schedule != "trained":
                module.set_audio_schedule(audio_schedule, float(audio_gamma))
            try:
                latents = sample(module, cond, first_latent, num_latent, options, on_step=on_step,
                                 check_cancel=bridge.throw_if_interrupted)
            finally:
                module.set_audio_schedule(None)  # the model is shared: never leave an override behind
        samples = glue.raw_latents(latents, vae.module).to(bridge.intermediate_device())
        if audio_embeds.original is None:
            log.warning("ActAvatar Sampler: no AUDIO reached ActAvatar Audio Encode (only audio_encoder_output), so "
                        "the audio output is silence; connect the speech to Audio Encode's audio input too.")
        clip_audio = glue.fit_audio(audio_embeds.original, num_frames, fps)
        return ({"samples": samples}, fps, clip_audio)
