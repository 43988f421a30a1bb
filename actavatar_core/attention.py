"""Phase-aware cross-attention (PACA) as diffusers attention processors for Wan's text cross-attention.

Modes (see ``PACA_MODES``):

* ``global``  - the unmodified model: every video token attends to every text token, no phase embedding.
* ``learned`` - the paper: a zero-initialised phase embedding ``e_k`` is added to the tokens of block ``k`` before
  the key/value projections (done once per forward in :class:`~actavatar_core.model.ActAvatarTransformer`), then
  ordinary attention. Routing is whatever the weights learned.
* ``routed``  - our extension: as ``learned``, and each latent frame attends only to the base block and the phases
  active at its time. Frames that share an active set form contiguous runs of video tokens; each run runs one
  scaled-dot-product attention against its own key subset. No dense mask is built, so time and memory stay those
  of plain cross-attention. Training batches, whose clips have their own windows, use :class:`BatchRouting`
  (one boolean mask per sample) instead.
* ``routed`` with ``feather=N`` - frames within N/2 latent frames of a phase boundary blend the outputs of the
  sets before and after the boundary with a linear ramp, so actions do not switch on a hard cut.
* ``relay``   - Prompt Relay (arXiv 2604.10030), training-free soft routing: as ``learned``, every text token stays
  visible to every frame, but a frame's attention logits on phase k's tokens get the additive penalty
  ``-d**2 / (2 * width**2)``, where ``d`` is the frame's distance, in latent frames, to the nearest latent frame at
  which k is active (0 inside k's window; base, end and padding tokens are never penalised). ``width`` is in latent
  frames, as ``feather`` is. ``width -> 0`` is ``routed``, ``width -> inf`` is ``learned``. It reads the same
  :class:`PhaseRouting` bookkeeping as ``routed`` (wrapped in :class:`RelayRouting` to carry the width) and runs
  one attention call with a float bias gathered per video token from a (frames x text tokens) table.

Key/value tokens are projected once for the whole prompt; a run only gathers the rows it may see. When nothing
stands between the processor and a plain output projection (see :func:`_projects_in_place`), each hard run's attention
output is projected straight into its own rows of the layer's result, so it is never copied into place: on a GPU that
copy was most of what routing added to a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ActAvatarError

PACA_MODES = ("global", "learned", "routed", "relay")
#: Modes whose text attention follows the phase script's frame-to-phase routing.
ROUTING_MODES = ("routed", "relay")

#: (first token, end token, ((active phase set, weight), ...)) for one contiguous run of video tokens.
TokenRun = tuple[int, int, tuple[tuple[frozenset[int], float], ...]]


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend=None, attn_mask=None) -> torch.Tensor:
    """(B, S, H, D) attention through diffusers' dispatcher, so ``set_attention_backend`` (flash, sage, ...) applies.
    A callable ``backend`` is another framework's attention, ``backend(query, key, value, attn_mask)`` on the same
    layout (ComfyUI's optimized attention for phase control on its native models)."""
    if callable(backend):
        return backend(query, key, value, attn_mask)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, backend=backend)


def frame_mixtures(active: Sequence[frozenset[int]], frame_times: Sequence[float],
                   boundaries: Sequence[float], feather: float, frame_step: float) -> list[tuple[tuple[frozenset[int], float], ...]]:
    """Per latent frame, the active sets to attend to and their weights.

    ``feather`` is the ramp width in latent frames. A frame whose time lies within ``feather * frame_step / 2`` of a
    boundary ``b`` mixes the set just before ``b`` (weight ``1 - w``) and just after it (``w``), ``w`` rising
    linearly across the ramp; the nearest boundary wins when ramps overlap. ``feather = 0`` gives hard routing.
    """
    if feather <= 0 or not boundaries:
        return [((s, 1.0),) for s in active]
    half = feather * frame_step / 2.0
    times = list(frame_times)
    out = []
    for j, t in enumerate(times):
        nearest = min(boundaries, key=lambda b: abs(t - b))
        if abs(t - nearest) >= half:
            out.append(((active[j], 1.0),))
            continue
        w = (t - nearest) / (2 * half) + 0.5
        before = _set_at(active, times, nearest, side=-1)
        after = _set_at(active, times, nearest, side=+1)
        if before == after:
            out.append(((active[j], 1.0),))
        else:
            out.append(((before, 1.0 - w), (after, w)))
    return out


def _set_at(active: Sequence[frozenset[int]], times: Sequence[float], boundary: float, side: int) -> frozenset[int]:
    """Active set of the closest frame strictly on one side of a boundary."""
    if side < 0:
        candidates = [j for j, t in enumerate(times) if t < boundary]
        return active[candidates[-1]] if candidates else active[0]
    candidates = [j for j, t in enumerate(times) if t >= boundary]
    return active[candidates[0]] if candidates else active[-1]


def visible_tokens(block_ids: torch.Tensor, active: frozenset[int]) -> torch.Tensor:
    """Which text tokens a frame with these active phases may see: the base block (id 0, also end and padding tokens)
    and the active phases' blocks. Same shape as ``block_ids``."""
    return torch.isin(block_ids, torch.tensor(sorted({0} | set(active)), dtype=block_ids.dtype, device=block_ids.device))


@dataclass
class PhaseRouting:
    """Which text tokens each latent frame may attend to in ``routed`` mode.

    ``block_ids`` is (B, S): 0 for base/end/padding tokens, k for phase k. ``mixtures[f]`` lists the active phase
    sets of latent frame f with their weights (one set with weight 1 unless feathered).
    """

    block_ids: torch.Tensor
    mixtures: list[tuple[tuple[frozenset[int], float], ...]]
    _key_index: dict = field(default_factory=dict, repr=False)
    _runs: dict = field(default_factory=dict, repr=False)
    _relay: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, block_ids: torch.Tensor, active: Sequence[frozenset[int]], *, frame_times: Sequence[float] = (),
              boundaries: Sequence[float] = (), feather: float = 0.0, frame_step: float = 1.0) -> "PhaseRouting":
        return cls(block_ids, frame_mixtures(active, frame_times, boundaries, feather, frame_step))

    @property
    def num_frames(self) -> int:
        return len(self.mixtures)

    def base_only(self) -> "PhaseRouting":
        """The same layout with no phase active anywhere: every frame sees the base block only."""
        return PhaseRouting(self.block_ids, [((frozenset(), 1.0),)] * self.num_frames)

    def active_sets(self) -> list[frozenset[int]]:
        """Each latent frame's active phases. Only hard routing has one set per frame; relay softens boundaries with
        its own width, so a feathered routing is refused rather than guessed at."""
        if any(len(m) != 1 for m in self.mixtures):
            raise ActAvatarError("Relay attention reads hard routing, but this routing is feathered.",
                                 "Build the routing with feather 0; relay's width already softens the phase boundaries.")
        return [m[0][0] for m in self.mixtures]

    def phase_distance(self) -> torch.Tensor:
        """(F, K + 1) float32 on the CPU: latent frames from frame f to the nearest frame at which phase k is active;
        column 0 (the base block) is 0. A phase that is active at no frame (its window falls between latent frames or
        outside the clip) counts as F frames away from every frame: ``routed`` hides it everywhere, and a finite
        distance keeps the infinite-width limit equal to ``learned``."""
        if "distance" not in self._relay:
            sets = self.active_sets()
            frames = len(sets)
            phases = max([int(self.block_ids.max()) if self.block_ids.numel() else 0] + [max(a) for a in sets if a])
            active = torch.zeros(frames, phases + 1, dtype=torch.bool)
            active[:, 0] = True
            for f, phase_set in enumerate(sets):
                active[f, list(phase_set)] = True
            index = torch.arange(frames, dtype=torch.float32)
            gap = (index[:, None] - index[None, :]).abs()  # (F, F) latent frames between frames f and g
            distance = torch.where(active[None], gap[:, :, None], torch.inf).amin(1)  # (F, K + 1)
            self._relay["distance"] = torch.nan_to_num(distance, posinf=float(frames))
        return self._relay["distance"]

    def key_selection(self, active: frozenset[int], device: torch.device):
        """Indices (shared layout) or a (B, 1, 1, S) boolean mask (per-sample layouts) of visible tokens."""
        cache_key = (active, str(device))
        if cache_key not in self._key_index:
            visible = visible_tokens(self.block_ids.to(device), active)  # (B, S)
            if visible.shape[0] == 1 or bool((visible == visible[:1]).all()):
                self._key_index[cache_key] = ("index", visible[0].nonzero().squeeze(1))
            else:
                self._key_index[cache_key] = ("mask", visible[:, None, None, :])
        return self._key_index[cache_key]

    def runs(self, token_frame: torch.Tensor) -> list[TokenRun]:
        """Contiguous token runs sharing one mixture. ``token_frame`` is (1, N) or (N,): the latent frame of each
        local video token (the local slice when diffusers' context parallelism splits the sequence)."""
        flat = token_frame.reshape(-1)
        key = (flat.data_ptr(), flat.numel(), str(flat.device))
        if key not in self._runs:
            frames, counts = torch.unique_consecutive(flat, return_counts=True)
            runs: list[TokenRun] = []
            start = 0
            for f, n in zip(frames.tolist(), counts.tolist()):
                mix = self.mixtures[f]
                if runs and runs[-1][2] == mix and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], start + n, mix)
                else:
                    runs.append((start, start + n, mix))
                start += n
            self._runs[key] = runs
        return self._runs[key]


@dataclass
class BatchRouting:
    """Hard ``routed`` PACA for a batch whose clips follow different phase scripts (training).

    :class:`PhaseRouting` shares one frame-to-phase map across the batch, as sampling needs. A training batch mixes
    clips with their own windows, so here each sample carries its own map: ``visible`` is (B, F, S), whether latent
    frame f of sample b may see text token s (base block and padding always; phase k only while k is active). The
    attention runs once with a boolean mask built from it, which is cheap at the short text lengths of training.
    """

    visible: torch.Tensor

    @classmethod
    def build(cls, block_ids: torch.Tensor, active: Sequence[Sequence[frozenset[int]]]) -> "BatchRouting":
        """``block_ids`` (B, S) as in :class:`PhaseRouting`; ``active[b][f]`` the phases active at latent frame f of
        sample b (one list per sample, all of the same length)."""
        if len(active) != block_ids.shape[0]:
            raise ValueError(f"{len(active)} frame-to-phase maps for a batch of {block_ids.shape[0]}")
        frames = {len(a) for a in active}
        if len(frames) != 1:
            raise ValueError(f"samples of one batch cover different latent frame counts: {sorted(frames)}")
        visible = torch.zeros(block_ids.shape[0], frames.pop(), block_ids.shape[1], dtype=torch.bool)
        for b, per_frame in enumerate(active):
            for f, phases in enumerate(per_frame):
                visible[b, f] = visible_tokens(block_ids[b].cpu(), phases)
        return cls(visible)

    def mask(self, token_frame: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, 1, N, S) boolean attention mask for the video tokens whose latent frames are ``token_frame``."""
        frames = token_frame.reshape(-1).to(self.visible.device)
        return self.visible[:, frames][:, None].to(device)


def relay_penalty(distance: torch.Tensor, width: float) -> torch.Tensor:
    """Prompt Relay's logit penalty ``-d**2 / (2 * width**2)`` for distances ``d`` in latent frames (any shape).
    0 where ``d == 0``; ``width == 0`` gives ``-inf`` wherever ``d > 0`` (hard routing), ``width == inf`` gives 0
    everywhere (no routing)."""
    width = float(width)
    if not width >= 0:  # also catches NaN
        raise ActAvatarError(f"The relay width must be >= 0 latent frames, got {width}.",
                             "Use a positive width such as 2 (0 is routed mode, a very large width is learned mode).")
    if width == 0:
        return torch.where(distance > 0, -torch.inf, 0.0).to(distance.dtype)
    return -0.5 * (distance / width) ** 2


def relay_bias(routing: PhaseRouting, width: float, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B', F, S) additive attention-logit bias of latent frame f on text token s in ``relay`` mode.

    ``routing`` is hard (feather 0) with ``block_ids`` (B, S); B' is 1 when every sample shares one token layout (it
    broadcasts over the batch), else B. Entry (b, f, s) is :func:`relay_penalty` of frame f's distance (latent frames,
    :meth:`PhaseRouting.phase_distance`) to the phase of token s of sample b; base, end and padding tokens get 0.
    Cached on ``routing`` per width, device and dtype: it is F x S, so every layer of every step reuses it.
    """
    cache_key = ("bias", float(width), str(device), dtype)
    if cache_key not in routing._relay:
        table = relay_penalty(routing.phase_distance(), width)  # (F, K + 1)
        ids = routing.block_ids.cpu().long()
        if ids.shape[0] > 1 and bool((ids == ids[:1]).all()):
            ids = ids[:1]
        routing._relay[cache_key] = table[:, ids].transpose(0, 1).to(device=device, dtype=dtype).contiguous()
    return routing._relay[cache_key]


def relay_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, routing: PhaseRouting,
                    token_frame: torch.Tensor, width: float, backend=None) -> torch.Tensor:
    """``relay`` attention: every video token attends to every text token, with its frame's :func:`relay_bias` row
    added to the logits. ``query`` (B, N, H, D) for N local video tokens, ``key``/``value`` (B, S, H, D),
    ``token_frame`` (1, N) or (N,) the latent frame of each query token; returns (B, N, H, D).

    One attention call: the (B', F, S) table is gathered into a (B', 1, N, S) float mask in the query's dtype (N x S
    values, small beside the (N, H*D) query at text lengths of a few hundred tokens), which broadcasts over heads
    (and over the batch for a shared layout). The attention backend must accept an additive mask (native SDPA does).
    """
    bias = relay_bias(routing, width, device=query.device, dtype=query.dtype)
    mask = bias.index_select(1, token_frame.reshape(-1).to(query.device)).unsqueeze(1)
    return _attend(query, key, value, backend, attn_mask=mask)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity, as the routing it wraps is mutable (caches)
class RelayRouting:
    """A hard :class:`PhaseRouting` plus the relay width (latent frames): what ``relay`` mode attends through.
    ``relay_attention(..., relay.routing, token_frame, relay.width)`` is what the processor runs."""

    routing: PhaseRouting
    width: float

    def __post_init__(self) -> None:
        relay_penalty(torch.zeros(1), self.width)  # refuses a negative or NaN width
        self.routing.active_sets()  # refuses a feathered routing now rather than inside a layer

    @property
    def num_frames(self) -> int:
        return self.routing.num_frames


def routing_for_mode(paca_mode: str, routing: "PhaseRouting | BatchRouting | RelayRouting | None",
                     phase_ids: torch.Tensor | None) -> "PhaseRouting | BatchRouting | RelayRouting | None":
    """The routing a forward in ``paca_mode`` hands to its text attention (None: plain attention).

    ``global`` and ``learned`` ignore any routing; ``routed`` takes a :class:`PhaseRouting` or :class:`BatchRouting`
    (None falls back to plain attention, as it always has); ``relay`` takes a :class:`RelayRouting` and refuses what
    would silently run another mode.
    """
    if paca_mode not in ROUTING_MODES:
        return None
    if paca_mode == "routed":
        if isinstance(routing, RelayRouting):
            raise ActAvatarError("A relay routing was given to routed mode.",
                                 "Use paca_mode 'relay' for it, or pass its hard routing (relay.routing) to routed mode.")
        return routing
    if isinstance(routing, RelayRouting):
        return routing
    if isinstance(routing, BatchRouting):
        raise ActAvatarError("Relay PACA has no per-sample routing for training batches.",
                             "Train in routed or learned mode; relay is a training-free mode for sampling.")
    if isinstance(routing, PhaseRouting):
        raise ActAvatarError("Relay PACA needs a width beside the frame-to-phase routing.",
                             "Pass RelayRouting(routing, width), or sample with SamplingOptions(paca_mode='relay', "
                             "relay_width=...).")
    if phase_ids is not None and bool((phase_ids > 0).any()):
        raise ActAvatarError("Relay PACA got phase blocks but no frame-to-phase routing, so every frame would see "
                             "every phase (learned mode).",
                             "Pass routing=RelayRouting(build_routing(...), width); training supports global, learned "
                             "and routed only.")
    return None


def phase_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    routing: "PhaseRouting | BatchRouting | RelayRouting | None", token_frame: torch.Tensor | None,
                    backend=None) -> torch.Tensor:
    """Text cross-attention of video tokens under any routing, at the q/k/v level (no diffusers ``Attention``
    object): None is plain attention, a :class:`PhaseRouting` hard or feathered ``routed``, a :class:`RelayRouting`
    ``relay``, a :class:`BatchRouting` per-sample hard routing. ``query`` (B, N, H, D), ``key``/``value``
    (B, S, H, D), ``token_frame`` (1, N) or (N,) the latent frame of each query token; returns (B, N, H, D)."""
    if routing is None or token_frame is None:
        return _attend(query, key, value, backend)
    if isinstance(routing, RelayRouting):
        return relay_attention(query, key, value, routing.routing, token_frame, routing.width, backend)
    if isinstance(routing, BatchRouting):
        return _attend(query, key, value, backend, attn_mask=routing.mask(token_frame, query.device))
    return routed_attention(query, key, value, routing, token_frame, backend)


def _project(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    """Q, K, V in (B, S, H, D) with Wan's RMS norms, honouring fused projections."""
    if getattr(attn, "fused_projections", False):
        query = attn.to_q(hidden_states)
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    query, key = attn.norm_q(query), attn.norm_k(key)
    return (query.unflatten(2, (attn.heads, -1)), key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1)))


def _attend_visible(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, routing: PhaseRouting,
                    active: frozenset[int], backend=None) -> torch.Tensor:
    """Attention of some video tokens to the text tokens that frames with ``active`` phases may see."""
    kind, sel = routing.key_selection(active, query.device)
    if kind == "index":
        return _attend(query, key.index_select(1, sel), value.index_select(1, sel), backend)
    return _attend(query, key, value, backend, attn_mask=sel)


def routed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, routing: PhaseRouting,
                     token_frame: torch.Tensor, backend=None) -> torch.Tensor:
    """Run attention per token run against the keys its frames may see. Shapes (B, S, H, D)."""
    out = torch.empty_like(query)
    for start, end, mixture in routing.runs(token_frame):
        q = query[:, start:end]
        acc = None
        for active, weight in mixture:
            o = _attend_visible(q, key, value, routing, active, backend)
            if weight != 1.0:  # only feathered frames mix sets; a plain run skips a whole pass over its output
                o = o * weight
            acc = o if acc is None else acc + o
        out[:, start:end] = acc
    return out


def _projects_in_place(out_proj: torch.nn.Module, query: torch.Tensor) -> bool:
    """Whether each run can be projected with ``addmm(..., out=rows)``: a plain ``nn.Linear`` with no hooks and its
    own forward (peft LoRA and ComfyUI's casting ops wrap it, diffusers' and accelerate's offloading hook or replace
    its forward; all of them keep the assembled path), in the query's dtype, no autocast and no autograd (``out=``
    supports neither)."""
    return (type(out_proj) is torch.nn.Linear and not out_proj._forward_hooks and not out_proj._forward_pre_hooks
            and "forward" not in vars(out_proj) and not hasattr(out_proj, "_diffusers_hook")
            and not hasattr(out_proj, "_hf_hook") and out_proj.weight.dtype == query.dtype
            and out_proj.weight.device == query.device and not torch.is_autocast_enabled(query.device.type)
            and not (torch.is_grad_enabled() and (query.requires_grad or out_proj.weight.requires_grad)))


def routed_attention_projected(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, routing: PhaseRouting,
                               token_frame: torch.Tensor, out_proj: torch.nn.Linear, backend=None) -> torch.Tensor | None:
    """Hard routed attention and the output projection together: (B, S, H, D) in, (B, S, out_features) out. Each
    run's attention output goes through ``out_proj`` into its own rows of the result. None for feathered routing."""
    runs = routing.runs(token_frame)
    if any(len(mixture) != 1 for _, _, mixture in runs):
        return None
    batch, tokens = query.shape[:2]
    result = query.new_empty(batch, tokens, out_proj.out_features)
    weight = out_proj.weight.t()
    for start, end, ((active, _),) in runs:
        o = _attend_visible(query[:, start:end], key, value, routing, active, backend)
        for b in range(batch):
            rows = result[b, start:end]
            if out_proj.bias is None:
                torch.mm(o[b].flatten(1), weight, out=rows)
            else:
                torch.addmm(out_proj.bias, o[b].flatten(1), weight, out=rows)
    return result


class PACAProcessor:
    """Text cross-attention processor for ``WanAttention`` (``block.attn2``).

    Without ``routing`` it computes exactly what diffusers' ``WanAttnProcessor`` computes, so ``global`` and
    ``learned`` need nothing else (the phase embedding is added to the context by the model).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None,
                 routing: "PhaseRouting | BatchRouting | RelayRouting | None" = None,
                 token_frame: torch.Tensor | None = None) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise ValueError("PACA supports Wan text-to-video/TI2V cross-attention (no CLIP image branch).")
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        if routing is None or token_frame is None:
            out = _attend(query, key, value, self._attention_backend, attn_mask=attention_mask)
        elif isinstance(routing, PhaseRouting) and _projects_in_place(attn.to_out[0], query) and (
                projected := routed_attention_projected(query, key, value, routing, token_frame, attn.to_out[0],
                                                        self._attention_backend)) is not None:
            return attn.to_out[1](projected)
        else:
            out = phase_attention(query, key, value, routing, token_frame, self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class FrameAudioProcessor:
    """Audio cross-attention processor: the video tokens of latent frame f attend to the audio tokens of frame f.

    ``encoder_hidden_states`` is (B, F, T, D): T audio tokens per latent frame. When the local tokens are whole
    frames (always, unless a context-parallel split cuts a frame), all frames run as one batched attention.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None,
                 token_frame: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        frames = encoder_hidden_states.shape[1]
        audio = encoder_hidden_states.flatten(1, 2)  # (B, F*T, D)
        query, key, value = _project(attn, hidden_states, audio)
        per = encoder_hidden_states.shape[2]
        key = key.unflatten(1, (frames, per))
        value = value.unflatten(1, (frames, per))
        flat = token_frame.reshape(-1) if token_frame is not None else None
        tokens_per_frame = n // frames if flat is None else None
        if flat is None and n % frames == 0:
            first, count = 0, frames
        else:
            ids, counts = torch.unique_consecutive(flat, return_counts=True)
            count = ids.numel()
            first = int(ids[0])
            uniform = bool((counts == counts[0]).all()) and bool((ids == torch.arange(first, first + count, device=ids.device)).all())
            tokens_per_frame = int(counts[0]) if uniform else None
        if tokens_per_frame is not None and tokens_per_frame * count == n:
            q = query.unflatten(1, (count, tokens_per_frame)).flatten(0, 1)
            k = key[:, first : first + count].flatten(0, 1)
            v = value[:, first : first + count].flatten(0, 1)
            out = _attend(q, k, v, self._attention_backend).unflatten(0, (b, count)).flatten(1, 2)
        else:  # a context-parallel shard that cuts through a frame: one attention per frame
            out = torch.empty_like(query)
            start = 0
            for f, c in zip(ids.tolist(), counts.tolist()):
                out[:, start : start + c] = _attend(query[:, start : start + c], key[:, f], value[:, f], self._attention_backend)
                start += c
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def token_frame_index(num_frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """(1, N) latent-frame index of every video token in Wan's (frame, height, width) token order."""
    return torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)[None]
