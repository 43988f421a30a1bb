"""Phase control for the text cross-attention of Wan models run by another framework (ComfyUI's native Wan).

The framework hands over, per cross-attention call, its projected ``q`` (B, L, H*D) and ``k``/``v`` (B, S, H*D),
the latent grid of the video tokens and which chunks of the batch are conditional passes carrying a phase script
(phase guidance's extra pass carries it with every phase hidden).
Everything here is plain torch: routing reuses :class:`~actavatar_core.attention.PhaseRouting` and
:func:`~actavatar_core.attention.phase_attention` (run-wise routed attention, relay's biased attention), exactly what
the engine's PACA processor runs.

Frames map by the clip's absolute time: a context window passes its frames' indices in the sampled latent, an
extension its start in the clip (``start_seconds``). Tokens outside the video grid (S2V's reference and motion
latents after it, a reference image put before it, frames concatenated in time) are not frames of the clip: they
see every text token, as in the unpatched model. A frame that may see every token also
runs plain attention, so a script without phases (or one phase over the whole clip) changes nothing at all.

Modes:

* ``routed``    - each latent frame sees the base block and only the phases active at its time (hard).
* ``feathered`` - as ``routed``, and frames within ``feather / 2`` latent frames of a boundary blend the sets on
  both sides with a linear ramp.
* ``relay``     - Prompt Relay's soft penalty (:func:`~actavatar_core.attention.relay_attention`): every token stays
  visible, a frame's logits on phase k's tokens get ``-d**2 / (2 * width**2)`` for its distance ``d`` in latent
  frames to k's window, measured over the whole clip (a window's frames too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .attention import PhaseRouting, RelayRouting, frame_mixtures, phase_attention
from .errors import ActAvatarError
from .phases import VAE_TEMPORAL_STRIDE, PhaseScript, latent_frame_times, pixel_frame_count

#: Key of the phase spans in a conditioning's options dict (ComfyUI: ``cond[1][PHASE_SPANS_KEY]``).
PHASE_SPANS_KEY = "actavatar_phase_spans"
#: Key of the per-sampling {cond uuid: spans} map in ``transformer_options``.
SPECS_KEY = "actavatar_phase_specs"
#: Key of the per-forward :class:`CallPlan` in ``transformer_options``.
PLAN_KEY = "actavatar_phase_plan"
#: Key of the clip's latent frame count (the sampled latent) in ``transformer_options``.
FRAMES_KEY = "actavatar_phase_clip_frames"
NATIVE_MODES = ("routed", "feathered", "relay")

#: attend(q, k, v) on (B, S, H*D) tensors -> (B, L, H*D): the framework's own attention (ComfyUI's optimized one).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: attend_heads(q, k, v, mask) on (B, S, H, D) tensors -> (B, L, H, D), ``mask`` None, boolean (True: visible) or an
#: additive float bias broadcasting to (B, H, L, S): the framework's attention for the routed runs, so its backend
#: choice (sage, flash, ...) applies to them too. None: the engine's own (diffusers' dispatcher).
HeadsAttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class PhaseSpans:
    """What a phase-encoded conditioning carries: the script, its frame rate and the block of every text token.

    ``block_ids`` is (S,) long: 0 for base, end and padding tokens, k for the tokens of phase k (1-based).
    ``hide_phases`` marks phase guidance's extra pass: the same prompt with every phase block hidden from every frame.
    """

    script: PhaseScript
    fps: float
    block_ids: torch.Tensor
    hide_phases: bool = False

    def hidden(self) -> "PhaseSpans":
        """The spans of phase guidance's base pass (every frame sees the base block only)."""
        return dataclasses.replace(self, hide_phases=True)

    @property
    def num_phases(self) -> int:
        return len(self.script.phases)

    def token_spans(self) -> list[tuple[int, int]]:
        """[first, end) token range of every phase block, in phase order (empty range for a phase with no tokens)."""
        out = []
        for k in range(1, self.num_phases + 1):
            idx = (self.block_ids == k).nonzero().flatten()
            out.append((int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0))
        return out

    def latent_offset(self, seconds: float) -> int:
        """Latent frames from the clip's start to a sampling that starts ``seconds`` into it (4 video frames each)."""
        return int(round(seconds * self.fps / VAE_TEMPORAL_STRIDE))

    def clip_latent_frames(self, settings: "PhaseControlSettings", sampled_frames: int) -> int:
        """Latent frames of the whole clip: ``clip_seconds`` when set, else up to the end of this sampling."""
        if settings.clip_seconds > 0:
            return (max(1, math.ceil(settings.clip_seconds * self.fps - 1e-6)) - 1) // VAE_TEMPORAL_STRIDE + 1
        return self.latent_offset(settings.start_seconds) + sampled_frames

    def check_clip(self, settings: "PhaseControlSettings", sampled_frames: int) -> None:
        """Refuse a script that does not fit the clip (before sampling): the clip is ``clip_seconds`` long when set,
        else it ends with the ``sampled_frames`` latent frames sampled from ``start_seconds`` on."""
        if settings.clip_seconds > 0:
            duration = settings.clip_seconds
        else:
            duration = settings.start_seconds + pixel_frame_count(sampled_frames) / self.fps
        self.script.validate(duration, self.fps)


@dataclass(frozen=True)
class PhaseControlSettings:
    """The node's widgets: ``mode`` (see :data:`NATIVE_MODES`), ``feather`` (ramp width) and ``relay_width``
    (Prompt Relay's width), both in latent frames; ``start_seconds``, where in the clip this sampling starts (an
    extension that continues a clip: S2V Extend, InfiniteTalk's next chunk), and ``clip_seconds``, the whole clip's
    length when the script runs past this sampling (0: it ends with this sampling)."""

    mode: str = "routed"
    feather: float = 2.0
    relay_width: float = 2.0
    start_seconds: float = 0.0
    clip_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in NATIVE_MODES:
            raise ActAvatarError(f"Unknown phase control mode {self.mode!r}.", f"Use one of {', '.join(NATIVE_MODES)}.")
        if self.mode == "feathered" and not self.feather > 0:
            raise ActAvatarError(f"Feathered mode needs a ramp wider than 0 latent frames (got {self.feather}).",
                                 "Set feather to 1 or more, or use routed mode.")
        if self.mode == "relay" and not self.relay_width > 0:
            raise ActAvatarError(f"Relay mode needs a width above 0 latent frames (got {self.relay_width}).",
                                 "Set relay_width to e.g. 2, or use routed mode for a hard switch.")
        if not (math.isfinite(self.start_seconds) and self.start_seconds >= 0):
            raise ActAvatarError(f"start_seconds must be 0 or more (got {self.start_seconds}).",
                                 "Set it to where this sampling starts in the clip, 0 for the first part.")
        if not (math.isfinite(self.clip_seconds) and self.clip_seconds >= 0):
            raise ActAvatarError(f"clip_seconds must be 0 or more (got {self.clip_seconds}).",
                                 "Set it to the whole clip's length, or 0 when the clip ends with this sampling.")


def specs_from_conds(conds: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[Any, PhaseSpans]:
    """{cond uuid: spans} over the conds of a guider's groups that carry spans, except its ``negative`` group: only
    conditional passes are routed. (A batched call's ``cond_or_uncond`` is a position in the guider's list of
    groups, which is not the same group in every guider, so the groups' names decide.)"""
    return {c["uuid"]: c[PHASE_SPANS_KEY] for name, group in conds.items() if name != "negative" for c in group
            if c.get(PHASE_SPANS_KEY) is not None and "uuid" in c}


def check_before_sampling(specs: Mapping[Any, PhaseSpans], num_latent_frames: int,
                          settings: PhaseControlSettings = PhaseControlSettings()) -> None:
    """The checks that need the clip: some cond carries spans, and every script fits the clip
    (:meth:`PhaseSpans.check_clip`); ``num_latent_frames`` are the latent frames this sampling makes."""
    if not specs:
        raise ActAvatarError(
            "ActAvatar Phase Control is on the model, but no conditioning carries phase spans.",
            "Encode the positive prompt with 'ActAvatar Phase Text Encode' (from an ActAvatar Phase Prompt), or "
            "remove the Phase Control node.")
    for spans in specs.values():
        spans.check_clip(settings, num_latent_frames)


def clip_frame_indices(num_local_frames: int, window_indices: Sequence[int] | None = None,
                       anchor_index: int | None = None) -> list[int | None]:
    """Absolute latent index of each local latent frame; None for a local frame that is not a clip frame.

    ``window_indices`` are a context window's frame indices in the whole clip (None: the local frames are the clip);
    ``anchor_index`` a frame the window prepends before them.
    """
    if window_indices is None:
        return list(range(num_local_frames))
    absolute: list[int | None] = ([anchor_index] if anchor_index is not None else []) + [int(i) for i in window_indices]
    absolute = absolute[:num_local_frames]
    return absolute + [None] * (num_local_frames - len(absolute))


def build_routing(spans: PhaseSpans, settings: PhaseControlSettings, frames: Sequence[int], text_len: int,
                  sampled_frames: int = 0) -> tuple[PhaseRouting | RelayRouting | None, list[int]]:
    """Routing over the whole clip's latent frames, and the clip's latent index of each of ``frames``.

    ``frames`` are indices into this sampling's latent (a context window's indices, say), which starts
    ``settings.start_seconds`` into the clip. The routing is None when every one of them may see every token: plain
    attention is then exactly what routing computes.
    """
    offset = spans.latent_offset(settings.start_seconds)
    frames = [f + offset for f in frames]
    block_ids = spans.block_ids.reshape(-1)
    if text_len != block_ids.numel():
        if text_len % block_ids.numel():
            raise ActAvatarError(
                f"The text context has {text_len} tokens but the phase spans describe {block_ids.numel()}.",
                "Connect the conditioning of 'ActAvatar Phase Text Encode' directly (do not concatenate or combine it).")
        block_ids = block_ids.repeat(text_len // block_ids.numel())  # ComfyUI repeats a shorter context to batch it
    every = frozenset(range(1, spans.num_phases + 1))
    if not every or not frames:
        return None, frames
    total = max(max(frames) + 1, spans.clip_latent_frames(settings, sampled_frames))
    if spans.hide_phases:  # phase guidance's base pass: hard base-only routing in every mode, as the engine's
        return PhaseRouting(block_ids[None], [((frozenset(), 1.0),)] * total), frames
    active = spans.script.active_phases(total, spans.fps)
    feather = settings.feather if settings.mode == "feathered" else 0.0
    boundaries = sorted({t for p in spans.script.phases for t in (p.start, p.end)})
    mixtures = frame_mixtures(active, latent_frame_times(total, spans.fps), boundaries, feather,
                              VAE_TEMPORAL_STRIDE / spans.fps)
    full = ((every, 1.0),)
    if all(mixtures[f] == full for f in frames):
        return None, frames
    routing = PhaseRouting(block_ids[None], mixtures)
    return (RelayRouting(routing, settings.relay_width) if settings.mode == "relay" else routing), frames


@dataclass
class ChunkRouting:
    """The routing of one conditional batch chunk and the clip's latent index of each local clip frame."""

    routing: PhaseRouting | RelayRouting
    frames: list[int]
    _token_frames: dict = field(default_factory=dict, repr=False)

    def token_frame(self, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
        """(N,) clip latent frame of each clip token (cached, so the routing's run cache hits in every block)."""
        key = (tokens_per_frame, str(device))
        if key not in self._token_frames:
            frames = torch.tensor(self.frames, dtype=torch.long, device=device)
            self._token_frames[key] = frames.repeat_interleave(tokens_per_frame)
        return self._token_frames[key]


@dataclass
class CallPlan:
    """Routing of one model call: per batch chunk (one cond or uncond each) a :class:`ChunkRouting` or None (plain
    attention).

    The clip's tokens are ``num_frames * tokens_per_frame`` tokens after ``lead_tokens`` tokens that are not clip
    frames (a reference image put in front); tokens before and after them (reference and motion latents, frames
    that are not the clip's) attend unrouted.
    """

    routings: list[ChunkRouting | None]
    num_frames: int
    tokens_per_frame: int
    lead_tokens: int = 0

    @property
    def routes(self) -> bool:
        return any(r is not None for r in self.routings)

    @property
    def clip_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame


def plan_call(specs: Mapping[Any, PhaseSpans], settings: PhaseControlSettings, *, uuids: Sequence[Any],
              grid: Sequence[int], text_len: int,
              window_indices: Sequence[int] | None = None, anchor_index: int | None = None,
              sampled_frames: int = 0, lead_tokens: int = 0) -> CallPlan | None:
    """Which chunks of a batched call (one per entry of ``uuids``) are routed and how: those whose cond carries spans
    (:func:`specs_from_conds`); None when nothing is. ``sampled_frames`` is the latent frame count of the whole
    sampling (a context window's call sees only some of them)."""
    local = clip_frame_indices(int(grid[0]), window_indices, anchor_index)
    frames = []
    for f in local:  # clip frames come first; the first non-clip frame ends them
        if f is None:
            break
        frames.append(f)
    routings: list[ChunkRouting | None] = []
    for uid in uuids:
        spans = specs.get(uid)
        if spans is None:
            routings.append(None)
            continue
        routing, absolute = build_routing(spans, settings, frames, text_len, max(sampled_frames, int(grid[0])))
        routings.append(None if routing is None else ChunkRouting(routing, absolute))
    plan = CallPlan(routings, len(frames), int(grid[1]) * int(grid[2]), lead_tokens)
    return plan if plan.routes else None


def phase_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, plan: CallPlan,
                          attend: AttendFn, attend_heads: HeadsAttendFn | None = None) -> torch.Tensor:
    """Text cross-attention of a batched call, (B, L, H*D) in and out. Chunks without routing go through
    ``attend`` unchanged; in routed chunks the clip's tokens run the engine's
    :func:`~actavatar_core.attention.phase_attention` (run-wise routed attention, or relay's biased attention; each
    attention call through ``attend_heads`` when given), and the tokens after them (not clip frames) go through
    ``attend`` with every text token."""
    chunks = len(plan.routings)
    if q.shape[0] % chunks:
        raise ActAvatarError(f"A batch of {q.shape[0]} does not split into {chunks} conditioning chunks.",
                             "Report this layout; ActAvatar Phase Control cannot route it.")
    first, end = plan.lead_tokens, plan.lead_tokens + plan.clip_tokens
    if q.shape[1] < end:
        raise ActAvatarError(f"The attention sees {q.shape[1]} video tokens, fewer than the latent grid's {end}.",
                             "This model's token layout is not supported by ActAvatar Phase Control.")
    rows = q.shape[0] // chunks
    outs = []
    for i, chunk in enumerate(plan.routings):
        sl = slice(i * rows, (i + 1) * rows)
        if chunk is None:
            outs.append(attend(q[sl], k[sl], v[sl]))
            continue
        qh, kh, vh = (t[sl].unflatten(2, (heads, -1)) for t in (q[:, first:end], k, v))
        token_frame = chunk.token_frame(plan.tokens_per_frame, q.device)
        parts = [phase_attention(qh, kh, vh, chunk.routing, token_frame, attend_heads).flatten(2).to(q.dtype)]
        if first > 0:
            parts.insert(0, attend(q[sl, :first], k[sl], v[sl]))
        if q.shape[1] > end:
            parts.append(attend(q[sl, end:], k[sl], v[sl]))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def phase_guidance(guided: torch.Tensor, full: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """The engine's phase guidance on top of ordinary CFG: ``guided + scale * (full - base)``, where ``full`` is the
    conditional prediction and ``base`` the same prompt with every phase hidden (predictions of one kind, x0 or
    velocity: the term is linear)."""
    return guided + scale * (full - base)
