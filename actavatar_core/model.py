"""``ActAvatarTransformer``: diffusers' ``WanTransformer3DModel`` plus the audio adapter and the PACA processors.

It subclasses the diffusers class so everything that works on Wan keeps working: the base weights keep their
keys (``blocks.N.attn1...``), ``enable_parallelism`` (context parallelism) follows ``_cp_plan``, gradient
checkpointing, PEFT LoRA and ``set_attention_backend`` apply unchanged. What it adds:

* ``phase_embedding``: ``nn.Embedding(max_phases + 1, dim)``, zero-initialised, added to the text context after
  Wan's text projection (i.e. before every block's key/value projections) in ``learned`` and ``routed`` modes;
* ``audio_proj``: wav2vec2 windows -> audio tokens per latent frame;
* per block, after the text cross-attention and before the FFN: ``norm_audio`` + ``audio_attn`` (a ``WanAttention``
  whose output projection starts at zero), its residual scaled by the block's depth schedule.

ActAvatar weights files are safetensors holding the adapter (and optionally the whole fine-tuned transformer)
with the configuration in the file's metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanRotaryPosEmbed,
    WanTransformer3DModel,
    WanTransformerBlock,
)

from .adapter import AudioProjection, audio_scales
from .attention import (PACA_MODES, BatchRouting, FrameAudioProcessor, PACAProcessor, PhaseRouting, RelayRouting,
                        routing_for_mode, token_frame_index)
from .errors import WeightsError

WEIGHTS_FORMAT = "actavatar"
WEIGHTS_FORMAT_VERSION = "1"
#: Config keys that only ActAvatar adds to the Wan transformer config.
ADAPTER_CONFIG_KEYS = ("audio_feature_dim", "audio_num_layers", "audio_window", "audio_tokens", "audio_hidden_dim",
                       "max_phases", "audio_schedule", "audio_gamma")
#: Config keys of the base model that the adapter depends on; mismatches are refused when loading weights.
BASE_SHAPE_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels", "patch_size")


class TokenFrames(nn.Module):
    """The latent frame of every video token, (1, N). A module of its own so that diffusers' context parallelism
    can split its output like the rotary embedding's (``_cp_plan``): every block then sees the frames of exactly
    the tokens its rank holds."""

    def __init__(self, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(patch_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        return token_frame_index(frames // p_t, (height // p_h) * (width // p_w), hidden_states.device)


class ActAvatarBlock(WanTransformerBlock):
    """A Wan block with PACA text cross-attention and an audio cross-attention before the FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: str = "rms_norm_across_heads",
                 cross_attn_norm: bool = False, eps: float = 1e-6, added_kv_proj_dim: int | None = None):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.attn2.set_processor(PACAProcessor())
        self.norm_audio = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.audio_attn = WanAttention(dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps,
                                       cross_attention_dim_head=dim // num_heads, processor=FrameAudioProcessor())
        nn.init.zeros_(self.audio_attn.to_out[0].weight)
        nn.init.zeros_(self.audio_attn.to_out[0].bias)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: Any, audio_tokens: torch.Tensor | None = None, token_frame: torch.Tensor | None = None,
                routing: PhaseRouting | BatchRouting | None = None, audio_scale: float = 0.0) -> torch.Tensor:
        mods, frames = block_modulation(self.scale_shift_table, temb)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

        norm_hidden_states = modulate(self.norm1(hidden_states.float()), scale_msa, shift_msa, frames).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = gated_add(hidden_states.float(), attn_output, gate_msa, frames).type_as(hidden_states)

        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        if routing is not None:
            attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None, routing=routing,
                                     token_frame=token_frame)
        else:
            attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

        if audio_tokens is not None and audio_scale != 0.0:
            norm_hidden_states = self.norm_audio(hidden_states.float()).type_as(hidden_states)
            audio_output = self.audio_attn(norm_hidden_states, audio_tokens, None, None, token_frame=token_frame)
            hidden_states = hidden_states + audio_scale * audio_output

        norm_hidden_states = modulate(self.norm3(hidden_states.float()), c_scale_msa, c_shift_msa, frames).type_as(hidden_states)
        ff_output = self.ffn(norm_hidden_states)
        return gated_add(hidden_states.float(), ff_output.float(), c_gate_msa, frames).type_as(hidden_states)


def block_modulation(table: torch.Tensor, temb: torch.Tensor) -> tuple[list[torch.Tensor], int | None]:
    """A block's six shift/scale/gate factors from its ``scale_shift_table`` (1, 6, D) and the time projection, and
    the latent-frame count when they are per frame: ``temb`` is (B, 6, D) for one timestep per sample, (B, S, 6, D)
    per token (Wan2.2 TI2V in diffusers), or (B, F, 1, 6, D) per latent frame (see :func:`frame_timesteps`)."""
    if temb.ndim == 5:
        return list((table.view(1, 1, 1, 6, -1) + temb.float()).unbind(3)), temb.shape[1]
    if temb.ndim == 4:
        return [m.squeeze(2) for m in (table.unsqueeze(0) + temb.float()).chunk(6, dim=2)], None
    return list((table + temb.float()).chunk(6, dim=1)), None


def _by_frame(x: torch.Tensor, frames: int | None) -> torch.Tensor:
    return x if frames is None else x.unflatten(1, (frames, -1))


def _as_tokens(x: torch.Tensor, frames: int | None) -> torch.Tensor:
    return x if frames is None else x.flatten(1, 2)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """``x * (1 + scale) + shift``; with ``frames``, x (B, S, D) is taken as (B, F, S/F, D) and scale/shift (B, F, 1, D)
    apply to every token of their latent frame."""
    return _as_tokens(_by_frame(x, frames) * (1 + scale) + shift, frames)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """``x + y * gate``, per latent frame like :func:`modulate`."""
    return _as_tokens(_by_frame(x, frames) + _by_frame(y, frames) * gate, frames)


def frame_timesteps(timestep: torch.Tensor, batch: int, frames: int, tokens_per_frame: int) -> torch.Tensor | None:
    """The (B, F) timesteps of a per-token timestep (B, F * T) that is constant within every latent frame, as Wan2.2
    TI2V's always is (the clean reference frame at 0, the rest at t); None for any other timestep, and for a slice of
    the tokens (context parallelism hands each rank its own part of the sequence).

    Why: the per-token time embedding costs a (B*S, 6*D) projection and (B, S, 6, D) modulation tensors in every
    block; per frame they are T times smaller and the result is the same. The mini model's training step
    (T = 16 tokens per frame) runs 11-13 % faster for it."""
    if timestep.ndim != 2 or timestep.shape[0] != batch or timestep.shape[1] != frames * tokens_per_frame:
        return None
    grid = timestep.view(batch, frames, tokens_per_frame)
    if not torch.equal(grid, grid[:, :, :1].expand_as(grid)):
        return None
    return grid[:, :, 0]


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in. diffusers keeps some Wan layers in fp32 (``_keep_in_fp32_modules``: norms, the
    time embedding, the scale-shift table, which comes first), so ``next(parameters())`` says fp32 for a bf16
    model; ``ModelMixin.dtype`` skips those layers. Found on a GPU, where bf16 is the default."""
    dtype = getattr(module, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


class ActAvatarTransformer(WanTransformer3DModel):
    """Wan2.2 TI2V transformer with PACA and the progressive audio adapter."""

    _no_split_modules = ["ActAvatarBlock"]
    _repeated_blocks = ["ActAvatarBlock"]
    _keep_in_fp32_modules = WanTransformer3DModel._keep_in_fp32_modules + ["norm_audio"]
    _skip_layerwise_casting_patterns = WanTransformer3DModel._skip_layerwise_casting_patterns + ["phase_embedding"]
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "token_frames": {0: ContextParallelInput(split_dim=1, expected_dims=2, split_output=True)},
        "blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        "": {"timestep": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)},
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        in_channels: int = 48,
        out_channels: int = 48,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 14336,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        audio_feature_dim: int = 1024,
        audio_num_layers: int = 25,
        audio_window: int = 8,
        audio_tokens: int = 4,
        audio_hidden_dim: int = 512,
        max_phases: int = 8,
        audio_schedule: str = "progressive",
        audio_gamma: float = 1.5,
    ) -> None:
        super().__init__(patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim,
                         freq_dim, ffn_dim, num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim,
                         rope_max_seq_len, pos_embed_seq_len)
        inner_dim = num_attention_heads * attention_head_dim
        self.blocks = nn.ModuleList([
            ActAvatarBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
            for _ in range(num_layers)
        ])
        self.token_frames = TokenFrames(patch_size)
        self.phase_embedding = nn.Embedding(max_phases + 1, inner_dim)
        nn.init.zeros_(self.phase_embedding.weight)
        self.audio_proj = AudioProjection(audio_feature_dim, audio_num_layers, audio_window, inner_dim, audio_tokens,
                                          audio_hidden_dim, eps)
        self._audio_scale_override: list[float] | None = None

    # ------------------------------------------------------------------------------------------ audio schedule
    def set_audio_schedule(self, schedule: str | None = None, gamma: float | None = None,
                           values: Sequence[float] | None = None) -> None:
        """Override the depth schedule for inference (None restores the trained one from the config)."""
        if schedule is None:
            self._audio_scale_override = None
            return
        self._audio_scale_override = audio_scales(self.config.num_layers, schedule,
                                                  self.config.audio_gamma if gamma is None else gamma, values)

    def audio_block_scales(self) -> list[float]:
        if self._audio_scale_override is not None:
            return list(self._audio_scale_override)
        return audio_scales(self.config.num_layers, self.config.audio_schedule, self.config.audio_gamma)

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        phase_ids: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        routing: PhaseRouting | BatchRouting | RelayRouting | None = None,
        paca_mode: str = "learned",
        audio_strength: float = 1.0,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow velocity.

        ``phase_ids`` (B, S) are the text tokens' block ids; ``audio_features`` (B, F, W, L, C) the wav2vec2
        windows per latent frame (None: no audio); ``routing`` the frame-to-phase routing used in ``routed`` mode (a
        :class:`BatchRouting` when the samples follow different scripts) and, as a :class:`RelayRouting`, in ``relay``;
        ``audio_strength`` scales every audio residual on top of the depth schedule (0 turns audio off).
        """
        if paca_mode not in PACA_MODES:
            raise ValueError(f"unknown PACA mode {paca_mode!r}; choose one of {', '.join(PACA_MODES)}")
        if encoder_hidden_states_image is not None:
            raise ValueError("ActAvatar is built on Wan2.2 TI2V, which has no CLIP image branch")
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        post_f, post_h, post_w = num_frames // p_t, height // p_h, width // p_w

        rotary_emb = self.rope(hidden_states)
        token_frame = self.token_frames(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        per_frame = frame_timesteps(timestep, batch_size, post_f, post_h * post_w)
        frames = None
        if per_frame is not None:
            frames, ts_seq_len, timestep = post_f, post_f, per_frame.flatten()
        elif timestep.ndim == 2:
            ts_seq_len = timestep.shape[1]
            timestep = timestep.flatten()
        else:
            ts_seq_len = None
        temb, timestep_proj, context, _ = self.condition_embedder(timestep, encoder_hidden_states, None,
                                                                  timestep_seq_len=ts_seq_len)
        timestep_proj = timestep_proj.unflatten(2, (6, -1)) if ts_seq_len is not None else timestep_proj.unflatten(1, (6, -1))
        if frames is not None:  # (B, F, 1, 6, D): the blocks broadcast it over each frame's tokens
            timestep_proj = timestep_proj.unsqueeze(2)

        if paca_mode != "global" and phase_ids is not None:
            ids = phase_ids.to(context.device).clamp(0, self.config.max_phases)
            context = context + self.phase_embedding(ids).to(context.dtype)
        audio_tokens = None
        if audio_features is not None:
            audio_tokens = self.audio_proj(audio_features.to(device=hidden_states.device, dtype=hidden_states.dtype))
            if audio_tokens.shape[1] != post_f:
                raise ValueError(f"audio features cover {audio_tokens.shape[1]} latent frames, the video has {post_f}")
        route = routing_for_mode(paca_mode, routing, phase_ids)
        scales = [s * audio_strength for s in self.audio_block_scales()]

        for block, scale in zip(self.blocks, scales):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, context, timestep_proj,
                                                                  rotary_emb, audio_tokens, token_frame, route, scale)
            else:
                hidden_states = block(hidden_states, context, timestep_proj, rotary_emb, audio_tokens=audio_tokens,
                                      token_frame=token_frame, routing=route, audio_scale=scale)

        if frames is not None:  # temb (B, F, D) -> shift, scale (B, F, 1, D)
            shift, scale = (self.scale_shift_table.view(1, 1, 2, -1).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        elif temb.ndim == 3:
            shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = modulate(self.norm_out(hidden_states.float()), scale, shift, frames).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, post_f, post_h, post_w, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, base: WanTransformer3DModel, **adapter_config: Any) -> "ActAvatarTransformer":
        """Wrap a loaded Wan transformer: its weights are moved (not copied) into the new model, the adapter is
        freshly initialised (zero output projections, zero phase embeddings: the output equals the base model's)."""
        unknown = set(adapter_config) - set(ADAPTER_CONFIG_KEYS)
        if unknown:
            raise TypeError(f"unknown adapter option(s): {', '.join(sorted(unknown))}")
        base_config = {k: v for k, v in base.config.items() if not k.startswith("_")}
        config = {**{k: base_config[k] for k in base_config if k in _wan_init_keys()}, **adapter_config}
        param = next(base.parameters())
        dtype = compute_dtype(base)
        with torch.device("meta"):
            model = cls(**config)
        model.load_state_dict(base.state_dict(), strict=False, assign=True)
        model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
        model.materialise_extra_weights(param.device, dtype)
        return model.eval() if not base.training else model

    def materialise_extra_weights(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give the adapter parameters real storage and their initial values (after a meta-device build)."""
        with torch.device(device):
            self.audio_proj = AudioProjection(self.config.audio_feature_dim, self.config.audio_num_layers,
                                              self.config.audio_window, self.inner_dim, self.config.audio_tokens,
                                              self.config.audio_hidden_dim, self.config.eps).to(dtype)
        self.phase_embedding = nn.Embedding(self.config.max_phases + 1, self.inner_dim, device=device, dtype=dtype)
        nn.init.zeros_(self.phase_embedding.weight)
        heads, head_dim = self.config.num_attention_heads, self.config.attention_head_dim
        for block in self.blocks:
            block.norm_audio = FP32LayerNorm(self.inner_dim, self.config.eps, elementwise_affine=True).to(device)
            block.audio_attn = WanAttention(dim=self.inner_dim, heads=heads, dim_head=head_dim, eps=self.config.eps,
                                            cross_attention_dim_head=head_dim, processor=FrameAudioProcessor()).to(device, dtype)
            nn.init.zeros_(block.audio_attn.to_out[0].weight)
            nn.init.zeros_(block.audio_attn.to_out[0].bias)

    @property
    def inner_dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def adapter_config(self) -> dict[str, Any]:
        return {k: self.config[k] for k in ADAPTER_CONFIG_KEYS}

    def base_config(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()
                if not k.startswith("_") and k in _wan_init_keys()}


def _wan_init_keys() -> set[str]:
    import inspect

    return set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}


# ---------------------------------------------------------------------------------------------- weights files
def is_adapter_key(key: str) -> bool:
    return (key.startswith(("audio_proj.", "phase_embedding.")) or ".audio_attn." in key or ".norm_audio." in key)


def adapter_state_dict(model: ActAvatarTransformer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def save_actavatar_weights(model: ActAvatarTransformer, path: "str | os.PathLike", *, contents: str = "adapter",
                           lora_state: dict[str, torch.Tensor] | None = None, lora_config: dict | None = None,
                           dtype: torch.dtype | None = None, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write an ActAvatar weights file (safetensors, atomically): ``adapter`` (audio adapter + phase embeddings),
    or ``full`` (the whole fine-tuned transformer), optionally with LoRA weights under the ``lora.`` prefix."""
    from safetensors.torch import save_file

    if contents not in ("adapter", "full"):
        raise ValueError("contents must be 'adapter' or 'full'")
    state = adapter_state_dict(model) if contents == "adapter" else dict(model.state_dict())
    if lora_state:
        state.update({f"lora.{k}": v for k, v in lora_state.items()})
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    metadata = {
        "format": WEIGHTS_FORMAT, "format_version": WEIGHTS_FORMAT_VERSION, "contents": contents,
        "actavatar_config": json.dumps(model.adapter_config()), "base_config": json.dumps(model.base_config()),
        "lora": json.dumps(lora_config or {}), **(extra_metadata or {}),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, target)
    return target


def read_actavatar_weights(path: "str | os.PathLike") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an ActAvatar weights file: (tensors, parsed metadata). Refuses anything that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"'{path.name}' is not a .safetensors file; ActAvatar weights are only read from safetensors.",
                           "Convert the file to safetensors; pickled checkpoints are never loaded.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise WeightsError(f"'{path.name}' could not be read as safetensors ({exc}).", "Re-download or re-export the file.") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(
            f"'{path.name}' is not an ActAvatar weights file (its metadata has no format=actavatar).",
            "Pick an ActAvatar weights file (models/actavatar/), or leave the ActAvatar weights input empty.",
        )
    try:
        parsed = {"contents": meta.get("contents", "adapter"), "actavatar_config": json.loads(meta.get("actavatar_config", "{}")),
                  "base_config": json.loads(meta.get("base_config", "{}")), "lora": json.loads(meta.get("lora", "{}") or "{}"),
                  "raw": meta}
        bad = [k for k in ("actavatar_config", "base_config", "lora") if not isinstance(parsed[k], dict)]
        bad += [k for k in parsed["actavatar_config"] if k not in ADAPTER_CONFIG_KEYS]
        if bad or parsed["contents"] not in ("adapter", "full"):
            raise ValueError(f"unexpected {', '.join(bad) or 'contents'}")
    except ValueError as exc:
        raise WeightsError(f"'{path.name}' has damaged ActAvatar metadata ({exc}).",
                           "Re-export the weights with ActAvatar, or re-download them.") from None
    return tensors, parsed


def check_base_compatible(model_config: dict[str, Any], weights_base: dict[str, Any], name: str) -> None:
    """Refuse ActAvatar weights trained for a transformer of another shape."""
    diffs = []
    for key in BASE_SHAPE_KEYS:
        a, b = weights_base.get(key), model_config.get(key)
        if a is not None and b is not None and list(a if isinstance(a, (list, tuple)) else [a]) != list(b if isinstance(b, (list, tuple)) else [b]):
            diffs.append(f"{key} {a} vs {b}")
    if diffs:
        raise WeightsError(
            f"'{name}' was trained for a different diffusion model ({'; '.join(diffs)}; weights vs loaded model).",
            "Load the diffusion model these weights were trained on (Wan2.2 TI2V-5B for full-size ActAvatar weights).",
        )


def apply_actavatar_weights(model: ActAvatarTransformer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                            name: str = "weights") -> None:
    """Load adapter (or full) weights into ``model``; missing or mismatched keys are listed in the error."""
    check_base_compatible(dict(model.config), meta.get("base_config", {}), name)
    own = model.state_dict()
    wanted = [k for k in own if is_adapter_key(k)] if meta["contents"] == "adapter" else list(own)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    missing = [k for k in wanted if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {', '.join(wrong[:3])}")
        raise WeightsError(f"'{name}' does not fit this ActAvatar model: {'; '.join(parts)}.",
                           "Use weights saved by ActAvatar for this model size, with the same adapter configuration.")
    param = next(model.parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            target = own[k]
            target.copy_(v.to(device=target.device, dtype=target.dtype))
    del param


def build_from_weights(base: WanTransformer3DModel, path: "str | os.PathLike | None") -> ActAvatarTransformer:
    """The transformer a user runs: the base model plus the adapter configured and filled from the weights file
    (or a fresh, output-neutral adapter when ``path`` is None)."""
    if path is None:
        return ActAvatarTransformer.from_base(base)
    tensors, meta = read_actavatar_weights(path)
    check_base_compatible(dict(base.config), meta["base_config"], Path(path).name)
    try:
        model = ActAvatarTransformer.from_base(base, **meta["actavatar_config"])
    except (TypeError, ValueError, RuntimeError) as exc:  # an adapter config that builds no model: a damaged file
        raise WeightsError(f"'{Path(path).name}' records an adapter configuration that cannot be built "
                           f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}).",
                           "Re-export the weights with ActAvatar, or re-download them.") from None
    apply_actavatar_weights(model, tensors, meta, Path(path).name)
    if meta.get("lora"):
        from .lora import apply_lora_state

        apply_lora_state(model, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}, meta["lora"])
    return model
