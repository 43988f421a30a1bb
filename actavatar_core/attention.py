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

PACA_MODES = ("global", "learned", "routed")

#: (first token, end token, ((active phase set, weight), ...)) for one contiguous run of video tokens.
TokenRun = tuple[int, int, tuple[tuple[frozenset[int], float], ...]]


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend=None, attn_mask=None) -> torch.Tensor:
    """(B, S, H, D) attention through diffusers' dispatcher, so ``set_attention_backend`` (flash, sage, ...) applies."""
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
                 routing: "PhaseRouting | BatchRouting | None" = None,
                 token_frame: torch.Tensor | None = None) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise ValueError("PACA supports Wan text-to-video/TI2V cross-attention (no CLIP image branch).")
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        if routing is None or token_frame is None:
            out = _attend(query, key, value, self._attention_backend, attn_mask=attention_mask)
        elif isinstance(routing, BatchRouting):
            out = _attend(query, key, value, self._attention_backend, attn_mask=routing.mask(token_frame, query.device))
        elif _projects_in_place(attn.to_out[0], query) and (projected := routed_attention_projected(
                query, key, value, routing, token_frame, attn.to_out[0], self._attention_backend)) is not None:
            return attn.to_out[1](projected)
        else:
            out = routed_attention(query, key, value, routing, token_frame, self._attention_backend)
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
