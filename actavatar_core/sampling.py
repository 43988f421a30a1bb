"""Flow-matching sampling with TI2V first-frame conditioning, PACA routing and separate text/audio guidance.

Guidance (the paper gives text 5.0 and audio 5.0 but not how they combine; ours follows MultiTalk's nesting)::

    v = v(-, -) + s_audio * (v(-, A) - v(-, -)) + s_text * (v(T, A) - v(-, A)) + s_phase * (v(T, A) - v(B, A))

where ``T`` is the phase prompt, ``-`` in the text slot the negative prompt, ``A`` the audio and ``-`` in the audio
slot the all-zero "no audio" features. With both scales 1 only ``v(T, A)`` is computed; with ``s_audio = 1`` the
``v(-, -)`` pass is skipped, with ``s_text = 1`` nothing changes (the ``v(-, A)`` pass is still needed).

Phase guidance (ours, ``s_phase`` > 0, off by default) adds one pass, ``v(B, A)``: the same prompt with every phase
block hidden from every frame, i.e. what the clip looks like with no action asked for. Text guidance pushes towards
the whole prompt (identity, background, talking, actions at once); ``v(T, A) - v(B, A)`` is only the actions, and only
where and when a phase is active, so it can be raised without pushing everything else as hard. In ``relay`` mode
``T`` attends through the soft relay bias (width ``relay_width``) and ``B`` stays the hard base-only routing.

The reference image's latent is the clean first latent frame: its tokens get timestep 0 and it is written back into
the model input at every step, as in Wan2.2 TI2V (``expand_timesteps``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import PACA_MODES, PhaseRouting, RelayRouting
from .errors import ActAvatarError, GenerationCancelled
from .phases import PhaseScript, latent_frame_times

SAMPLERS = ("unipc", "euler")


@dataclass
class SamplingOptions:
    steps: int = 40
    text_cfg: float = 5.0
    audio_cfg: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"
    seed: int = 0
    paca_mode: str = "learned"  # the paper's PACA; "routed" is our opt-in extension, "relay" its soft form
    feather: float = 0.0
    relay_width: float = 2.0  # relay mode: Gaussian width of the penalty, in latent frames from a phase's window
    audio_strength: float = 1.0
    phase_cfg: float = 0.0  # extra guidance towards the phase blocks (0: off; one more model pass per step)

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.paca_mode not in PACA_MODES:
            raise ValueError(f"unknown PACA mode {self.paca_mode!r}; choose one of {', '.join(PACA_MODES)}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        check_schedule(self.sampler, self.shift, self.steps)
        if self.phase_cfg < 0:
            raise ValueError(f"phase guidance must be >= 0 (0 turns it off), got {self.phase_cfg}")
        if self.feather < 0:
            raise ValueError(f"feather must be >= 0 latent frames, got {self.feather}")
        if not 0 < self.relay_width < math.inf:
            raise ActAvatarError(f"relay_width must be a positive number of latent frames, got {self.relay_width}.",
                                 "Use e.g. 2; routed mode is the width-0 limit, learned mode the infinite one.")
        if self.paca_mode == "relay" and self.feather > 0:
            raise ActAvatarError(f"feather {self.feather} applies to routed mode only; relay softens the phase "
                                 "boundaries with relay_width.", "Set feather to 0 in relay mode.")


def mode_options(spec: str) -> dict[str, Any]:
    """SamplingOptions fields of a PACA mode written as one word, as ``bench method --modes`` lists them: a mode
    (``learned``, ``routed``, ``relay``, ...), ``relay=W`` (relay at width W latent frames) or ``feather=N`` (routed
    with N latent frames of feather)."""
    name, sep, value = spec.strip().partition("=")
    fields = {"relay": "relay_width", "feather": "feather"}
    if not sep and name in PACA_MODES:
        return {"paca_mode": name}
    if sep and name in fields:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        options = SamplingOptions(paca_mode="relay" if name == "relay" else "routed", **{fields[name]: number})
        try:
            options.check()
        except ValueError as err:
            detail = err.problem if isinstance(err, ActAvatarError) else str(err)
            raise ActAvatarError(f"The PACA mode {spec!r} has a bad value: {detail.rstrip('.')}.",
                                 "Use e.g. relay=2 or feather=1.") from None
        return {"paca_mode": options.paca_mode, fields[name]: number}
    raise ActAvatarError(f"Unknown PACA mode {spec!r}.",
                         f"Use one of {', '.join(PACA_MODES)}, relay=WIDTH or feather=FRAMES (latent frames).")


@dataclass
class StepInfo:
    step: int  # 1-based
    total: int
    timestep: float
    denoised: torch.Tensor  # current estimate of the clean latents (1, C, F, h, w), normalised


@functools.lru_cache(maxsize=64)
def check_schedule(sampler: str, shift: float, steps: int) -> None:
    """Run the scheduler's whole step loop on a tiny tensor (milliseconds), so a step count that diffusers'
    scheduler cannot finish is refused before any model runs. UniPC fails on its last steps when the shift squeezes
    its timesteps together: at shift 5 from 201 steps on, at shift 20 from 51."""
    scheduler = make_scheduler(sampler, shift, steps)
    sample = torch.zeros(1, 4)
    try:
        for t in scheduler.timesteps:
            sample = scheduler.step(torch.zeros(1, 4), t, sample, return_dict=False)[0]
    except (AssertionError, IndexError):
        raise ActAvatarError(f"The {sampler} sampler cannot take {steps} steps at shift {shift:g}: diffusers' "
                             "scheduler fails before its last step.",
                             "Use fewer steps (40 is the paper's), a smaller shift, or the euler sampler.") from None


def make_scheduler(sampler: str, shift: float, steps: int, device: Any = None):
    """diffusers' flow-matching schedulers, configured as Wan2.2 TI2V configures them."""
    if sampler == "unipc":
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=shift)
    elif sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def build_routing(script: PhaseScript, block_ids: torch.Tensor, num_latent_frames: int, fps: float,
                  feather: float = 0.0) -> PhaseRouting:
    """Frame-to-phase routing of a phase script on the latent grid of a clip."""
    active = script.active_phases(num_latent_frames, fps)
    boundaries = sorted({t for p in script.phases for t in (p.start, p.end)})
    return PhaseRouting.build(block_ids, active, frame_times=latent_frame_times(num_latent_frames, fps),
                              boundaries=boundaries, feather=feather, frame_step=4.0 / fps)


def initial_noise(shape: tuple[int, ...], seed: int, device: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded noise drawn on the CPU, so a seed gives the same start on every device."""
    generator = torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


@dataclass
class Conditioning:
    """Everything the transformer is conditioned on for one clip."""

    text: torch.Tensor  # (1, S, text_dim) phase prompt
    phase_ids: torch.Tensor  # (1, S)
    negative: torch.Tensor  # (1, S, text_dim)
    audio: torch.Tensor | None  # (1, F, W, L, C) or None
    routing: PhaseRouting | None = None
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def sample(transformer: Any, cond: Conditioning, first_latent: torch.Tensor, num_latent_frames: int,
           options: SamplingOptions, *, on_step: Callable[[StepInfo], None] | None = None,
           check_cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Denoise from seeded noise to normalised latents (1, C, F, h, w); the first latent frame is the reference."""
    options.check()
    from .memory import execution_device
    from .model import compute_dtype

    device, dtype = execution_device(transformer), compute_dtype(transformer)  # offloaded weights wait on the CPU
    _, channels, _, h, w = first_latent.shape
    p_t, p_h, p_w = transformer.config.patch_size
    if h % p_h or w % p_w:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p_h}x{p_w}")
    shape = (1, channels, num_latent_frames, h, w)
    latents = initial_noise(shape, options.seed, device)
    condition = first_latent.to(device, torch.float32)
    mask = torch.ones(shape, device=device)
    mask[:, :, 0] = 0.0
    token_mask = mask[0, 0, :, ::p_h, ::p_w].flatten()  # 0 for the reference frame's tokens
    scheduler = make_scheduler(options.sampler, options.shift, options.steps, device)

    text = cond.text.to(device, dtype)
    negative = cond.negative.to(device, dtype)
    phase_ids = cond.phase_ids.to(device)
    audio = cond.audio.to(device, dtype) if cond.audio is not None else None
    null_audio = torch.zeros_like(audio) if audio is not None else None
    use_text_cfg = options.text_cfg != 1.0
    use_audio_cfg = audio is not None and options.audio_cfg != 1.0
    has_phases = cond.routing is not None and bool((cond.routing.block_ids > 0).any())
    base_routing = cond.routing.base_only() if options.phase_cfg > 0 and has_phases else None
    routing = cond.routing
    if options.paca_mode == "relay" and routing is not None:
        routing = RelayRouting(routing, options.relay_width)

    def velocity(x, t, ctx, ids, feats, routing, mode=options.paca_mode):
        return transformer(x, t, ctx, phase_ids=ids, audio_features=feats, routing=routing, paca_mode=mode,
                           audio_strength=options.audio_strength, return_dict=False)[0].float()

    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if check_cancel is not None:
            check_cancel()
        model_input = ((1 - mask) * condition + mask * latents).to(dtype)
        timestep = (token_mask * t).unsqueeze(0).to(device)
        v_full = velocity(model_input, timestep, text, phase_ids, audio, routing)
        if use_text_cfg or use_audio_cfg:
            v_text_off = velocity(model_input, timestep, negative, None, audio, None)
            v = v_text_off + options.text_cfg * (v_full - v_text_off)
            if use_audio_cfg:
                v_none = velocity(model_input, timestep, negative, None, null_audio, None)
                v = v + (options.audio_cfg - 1.0) * (v_text_off - v_none)
        else:
            v = v_full
        if base_routing is not None:
            # The same prompt with its phase blocks hidden from every frame (routed attention does the hiding, in
            # relay mode too: B asks for no action anywhere, which a finite relay width would not give).
            v_base = velocity(model_input, timestep, text, phase_ids, audio, base_routing, "routed")
            v = v + options.phase_cfg * (v_full - v_base)
        sigma = float(t) / 1000.0
        if on_step is not None:
            denoised = (1 - mask) * condition + mask * (latents - sigma * v)
            on_step(StepInfo(i + 1, total, float(t), denoised))
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return (1 - mask) * condition + mask * latents


def cancel_check(flag: Callable[[], bool] | None) -> Callable[[], None] | None:
    """Turn a 'should I stop?' predicate into a check that raises :class:`GenerationCancelled`."""
    if flag is None:
        return None

    def check() -> None:
        if flag():
            raise GenerationCancelled("Generation was cancelled; no file was written.")

    return check
