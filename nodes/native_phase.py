"""Phase control on ComfyUI's own Wan models: ActAvatar Phase Control (MODEL -> MODEL), Phase Text Encode (core's
umT5 CLIP -> CONDITIONING carrying the phase spans) and Phase Guider (GUIDER with phase guidance).

Phase Control patches the text cross-attention of every block through the ModelPatcher: on a clone, each
``diffusion_model.blocks.N.cross_attn.forward`` gets an object patch that projects q/k/v with the block's own layers
(so LoRA weight patches, fp8 casting and offloading apply as usual) and hands them to the engine
(:mod:`actavatar_core.native_phase`), which routes conditional passes and leaves every other pass to ComfyUI's
``optimized_attention``. Two wrappers feed it: OUTER_SAMPLE collects the phase spans of the conds and checks them
against the clip before the first step; DIFFUSION_MODEL plans each model call (latent grid, which batch chunks carry
phase spans, the context window's absolute frames). Removing the node removes the patches; InfiniteTalk's
``attn2_patch``, LoRAs and torch.compile's APPLY_MODEL wrapper compose with it.

At import this module needs only ``comfy_api``; ComfyUI's model code is imported when a node runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from comfy_api.latest import io

from actavatar_core import native_phase as engine
from actavatar_core.errors import ActAvatarError, PhaseScriptError
from actavatar_core.text import DEFAULT_NEGATIVE, TEXT_LEN, tokenize_plain, tokenize_script

WRAPPER_KEY = "actavatar_phase_control"
PhasePrompt = io.Custom("PHASE_PROMPT")


def _wan():
    """ComfyUI's Wan model module (imported when a node runs, never at pack import)."""
    import comfy.ldm.wan.model as wan

    return wan


# ================================================================================================ the patch
class PhasedCrossAttention:
    """Replacement ``forward`` of one Wan text cross-attention module (T2V/TI2V/S2V/HuMo and I2V's image branch).

    Without a routing plan for the current call it calls the forward it replaced, so unrouted passes are exactly
    the unpatched model's."""

    def __init__(self, module: torch.nn.Module, previous: Any):
        self.module = module
        self.previous = previous
        self.image_branch = isinstance(module, _wan().WanI2VCrossAttention)

    def __call__(self, x: torch.Tensor, context: torch.Tensor, context_img_len: int | None = None,
                 transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        options = transformer_options if transformer_options is not None else {}
        plan = options.get(engine.PLAN_KEY)
        if plan is None:
            if self.image_branch:
                return self.previous(x, context, context_img_len, transformer_options=options, **kwargs)
            return self.previous(x, context, transformer_options=options, context_img_len=context_img_len, **kwargs)
        m = self.module
        wan = _wan()
        if self.image_branch:
            context_img, context = context[:, :context_img_len], context[:, context_img_len:]
        q = m.norm_q(m.q(x))
        k = m.norm_k(m.k(context))
        v = m.v(context)

        def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return wan.optimized_attention(q_, k_, v_, heads=m.num_heads, transformer_options=options)

        out = engine.phase_cross_attention(q, k, v, m.num_heads, plan, attend,
                                           lambda *a: comfy_attention(*a, heads=m.num_heads, options=options))
        if self.image_branch:
            k_img, v_img = m.norm_k_img(m.k_img(context_img)), m.v_img(context_img)
            out = out + wan.optimized_attention(q, k_img, v_img, heads=m.num_heads, transformer_options=options,
                                                low_precision_attention=False)
        return m.o(out)


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, heads: int,
                    options: dict) -> torch.Tensor:
    """The engine's routed attention calls, (B, S, H, D) in and out, through ComfyUI's attention: the one it picked
    for Wan (``--use-sage-attention``, flash, ...; an override in the transformer options too), or ComfyUI's masked
    attention for a call with a mask (a boolean mask becomes 0 / -inf logits, which every ComfyUI backend adds)."""
    import comfy.ldm.modules.attention as comfy_attn

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    kw = dict(skip_reshape=True, skip_output_reshape=True, transformer_options=options)
    if mask is None:
        out = _wan().optimized_attention(q, k, v, heads, **kw)
    else:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask.to(q.device), -torch.inf)
        out = comfy_attn.optimized_attention_masked(q, k, v, heads, mask.to(q.dtype), **kw)
    return out.transpose(1, 2)


class PhaseSpecsWrapper:
    """OUTER_SAMPLE wrapper: {cond uuid: spans} into this sampling's transformer options, checked against the clip."""

    def __init__(self, settings: engine.PhaseControlSettings):
        self.settings = settings

    def __call__(self, executor, noise, *args, **kwargs):
        guider = executor.class_obj
        specs = engine.specs_from_conds(guider.conds)
        shapes = kwargs.get("latent_shapes")
        shape = tuple(shapes[0]) if shapes else tuple(noise.shape)
        if len(shape) != 5:
            raise ActAvatarError(f"ActAvatar Phase Control needs a video latent (B, C, T, H, W); got shape {shape}.",
                                 "Use it with Wan video models only.")
        engine.check_before_sampling(specs, shape[2], self.settings)
        options = guider.model_options.setdefault("transformer_options", {})
        options[engine.SPECS_KEY] = specs
        options[engine.FRAMES_KEY] = shape[2]
        options[WRAPPER_KEY] = self.settings
        try:
            return executor(noise, *args, **kwargs)
        finally:
            for key in (engine.SPECS_KEY, engine.FRAMES_KEY, WRAPPER_KEY):
                options.pop(key, None)


class PlanCallWrapper:
    """DIFFUSION_MODEL wrapper: the routing plan of one model call, read by every block's patched cross-attention."""

    def __call__(self, executor, x, timestep, context, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None and len(args) >= 3:
            options = args[2]
        specs = (options or {}).get(engine.SPECS_KEY)
        if not specs or "uuids" not in options:
            return executor(x, timestep, context, *args, **kwargs)
        dm = executor.class_obj
        patch = dm.patch_size
        grid = (x.shape[2], math.ceil(x.shape[3] / patch[1]), math.ceil(x.shape[4] / patch[2]))
        lead = 0
        reference = kwargs.get("reference_latent")
        if getattr(dm, "ref_conv", None) is not None and reference is not None:  # put in front of the video tokens
            lead = (reference.shape[-2] // patch[1]) * (reference.shape[-1] // patch[2])  # ref_conv: kernel = stride
        window = options.get("context_window")
        plan = engine.plan_call(
            specs, options[WRAPPER_KEY], uuids=options["uuids"], grid=grid,
            text_len=context.shape[1], window_indices=getattr(window, "index_list", None),
            anchor_index=getattr(window, "causal_anchor_index", None),
            sampled_frames=options.get(engine.FRAMES_KEY, 0), lead_tokens=lead)
        if plan is None:
            return executor(x, timestep, context, *args, **kwargs)
        options[engine.PLAN_KEY] = plan
        try:
            return executor(x, timestep, context, *args, **kwargs)
        finally:
            options.pop(engine.PLAN_KEY, None)


def apply_phase_control(model: Any, mode: str = "routed", feather: float = 2.0, relay_width: float = 2.0,
                        start_seconds: float = 0.0, clip_seconds: float = 0.0) -> Any:
    """A clone of ``model`` (a ComfyUI ModelPatcher of a native Wan model) with phase control on every block."""
    import comfy.patcher_extension as pe

    wan = _wan()
    settings = engine.PhaseControlSettings(mode, feather, relay_width, start_seconds, clip_seconds)
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, wan.WanModel) or not hasattr(dm, "blocks"):
        raise ActAvatarError(f"ActAvatar Phase Control works on ComfyUI's Wan models; this model is a "
                             f"{type(dm).__name__}.", "Connect a Wan 2.1/2.2 model (UNETLoader / Load Diffusion Model).")
    m = model.clone()
    for i, block in enumerate(dm.blocks):
        name = f"diffusion_model.blocks.{i}.cross_attn"
        attn = getattr(block, "cross_attn", None)
        if not isinstance(attn, (wan.WanT2VCrossAttention, wan.WanI2VCrossAttention)):
            raise ActAvatarError(f"Block {i} of this {type(dm).__name__} has a {type(attn).__name__} text "
                                 "cross-attention, which ActAvatar Phase Control does not know.",
                                 "Use a Wan 2.1/2.2 T2V, I2V, TI2V, S2V, HuMo or InfiniteTalk model.")
        previous = m.get_model_object(name + ".forward")
        if isinstance(previous, PhasedCrossAttention):
            raise ActAvatarError("This model already has ActAvatar Phase Control.",
                                 "Use one Phase Control node per model (remove the second one).")
        if getattr(previous, "__func__", None) is not type(attn).forward or getattr(previous, "__self__", None) is not attn:
            raise ActAvatarError(f"Another node already replaced the text cross-attention of block {i} "
                                 f"({previous!r}); Phase Control would bypass it on the routed pass.",
                                 "Remove one of the two nodes: both replace the text cross-attention.")
        m.add_object_patch(name + ".forward", PhasedCrossAttention(attn, previous))
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, PhaseSpecsWrapper(settings))
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, PlanCallWrapper())
    return m


# ================================================================================================ phase guidance
_GUIDER_CLASS: list = []


def _phase_guider_class() -> type:
    """The guider class, built on core's CFGGuider when first needed (ComfyUI's sampler code is not imported at
    pack import)."""
    if _GUIDER_CLASS:
        return _GUIDER_CLASS[0]
    import comfy.samplers

    class PhaseGuider(comfy.samplers.CFGGuider):
        """Ordinary CFG plus the engine's phase term: one more pass per step with the positive prompt's phases
        hidden from every frame; ``phase_cfg`` 0 (or a prompt without phases) runs plain CFG, no extra pass."""

        phase_cfg = 0.0

        def set_conds(self, positive, negative):
            base = [[c, {**d, engine.PHASE_SPANS_KEY: d[engine.PHASE_SPANS_KEY].hidden()}] for c, d in positive
                    if d.get(engine.PHASE_SPANS_KEY) is not None and d[engine.PHASE_SPANS_KEY].num_phases > 0]
            conds = {"positive": positive, "negative": negative}
            if base:
                conds["phase_base"] = base
            self.inner_set_conds(conds)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            base = self.conds.get("phase_base")
            if not base or self.phase_cfg == 0:
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                        self.conds.get("positive"), self.cfg,
                                                        model_options=model_options, seed=seed)
            positive, negative = self.conds.get("positive"), self.conds.get("negative")
            full, uncond, hidden = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative, base], x,
                                                                  timestep, model_options)
            guided = comfy.samplers.cfg_function(self.inner_model, full, uncond, self.cfg, x, timestep,
                                                 model_options=model_options, cond=positive, uncond=negative)
            return engine.phase_guidance(guided, full, hidden, self.phase_cfg)

    _GUIDER_CLASS.append(PhaseGuider)
    return PhaseGuider


def make_phase_guider(model: Any, positive: list, negative: list, cfg: float, phase_cfg: float) -> Any:
    """A GUIDER for SamplerCustomAdvanced: CFG ``cfg`` plus phase guidance ``phase_cfg`` on a Phase Control model."""
    import comfy.patcher_extension as pe

    if phase_cfg != 0 and not model.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        raise ActAvatarError("Phase guidance needs a model patched by ActAvatar Phase Control.",
                             "Put 'ActAvatar Phase Control' between the model loader and this guider, or set "
                             "phase_cfg to 0.")
    guider = _phase_guider_class()(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    guider.phase_cfg = float(phase_cfg)
    return guider


# ================================================================================================ text encoding
class _CoreTokenizer:
    """Core's umT5 SentencePiece model with the call signature :func:`actavatar_core.text.tokenize_blocks` uses."""

    eos_token_id = 1
    pad_token_id = 0

    def __init__(self, clip: Any):
        tokenizer = getattr(clip, "tokenizer", None)
        name = getattr(tokenizer, "clip_name", None)
        sd_tokenizer = getattr(tokenizer, getattr(tokenizer, "clip", ""), None) if name == "umt5xxl" else None
        sp = getattr(getattr(sd_tokenizer, "tokenizer", None), "tokenizer", None)
        if sp is None or not hasattr(sp, "encode"):
            raise ActAvatarError("This CLIP is not Wan's umT5 text encoder.",
                                 "Load umt5_xxl (fp16 or fp8_scaled) with CLIPLoader, type 'wan'.")
        self.name = name
        self.sp = sp

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(self.sp.encode(text, add_bos=False, add_eos=False))}


def _encode_ids(clip: Any, tokenizer: _CoreTokenizer, input_ids: torch.Tensor) -> list:
    """Core's CLIP encode of exact token ids (weight 1 each), as CLIPTextEncode encodes its own tokens."""
    tokens = {tokenizer.name: [[(int(t), 1.0) for t in input_ids.reshape(-1).tolist()]]}
    return clip.encode_from_tokens_scheduled(tokens)


def encode_phase_prompt(clip: Any, phase_prompt: Any, negative: str = "") -> tuple[list, list]:
    """(positive, negative) CONDITIONING: the phase script's blocks encoded as one prompt with exact token spans
    (base, phase 1..n, end, padding), and the negative prompt. The positive carries :class:`PhaseSpans`."""
    script, fps = phase_prompt.script, float(phase_prompt.fps)
    tokenizer = _CoreTokenizer(clip)
    tokens = tokenize_script(tokenizer, script, TEXT_LEN)
    positive = []
    for cond, extra in _encode_ids(clip, tokenizer, tokens.input_ids):
        length = cond.shape[1]
        ids = tokens.block_ids.reshape(-1)
        if length < ids.numel():
            if bool((ids[length:] != 0).any()):
                raise PhaseScriptError(f"The text encoder kept {length} tokens, fewer than the phase prompt's "
                                       f"{tokens.length}.", "Shorten the base prompt or the phase texts.")
            ids = ids[:length]
        elif length > ids.numel():
            ids = torch.cat([ids, ids.new_zeros(length - ids.numel())])
        positive.append([cond, {**extra, engine.PHASE_SPANS_KEY: engine.PhaseSpans(script, fps, ids.clone())}])
    neg_text = negative.strip() or script.negative or DEFAULT_NEGATIVE
    negative_cond = [[c, dict(e)] for c, e in _encode_ids(clip, tokenizer, tokenize_plain(tokenizer, neg_text).input_ids)]
    return positive, negative_cond


# ================================================================================================ nodes
class ActAvatarPhaseControl(io.ComfyNode):
    REQUIRES = ()  # the routed attention runs through ComfyUI's own attention functions

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarPhaseControl",
            display_name="ActAvatar Phase Control",
            category="ActAvatar/native",
            description="Timed actions on a ComfyUI Wan model: each latent frame's text cross-attention sees the base "
                        "prompt and only the phases active at its time. Needs a positive prompt from 'ActAvatar Phase "
                        "Text Encode'. Only the conditional pass is routed.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("mode", options=list(engine.NATIVE_MODES), default="routed",
                               tooltip="routed: hard switch at each boundary; feathered: linear blend over 'feather' "
                                       "latent frames around each boundary; relay: Prompt Relay's soft penalty on "
                                       "a phase's tokens that grows with the frame's distance from its window."),
                io.Float.Input("feather", default=2.0, min=0.0, max=16.0, step=0.5,
                               tooltip="Ramp width in latent frames (feathered mode only; 1 latent frame = 4 video "
                                       "frames)."),
                io.Float.Input("relay_width", default=2.0, min=0.05, max=64.0, step=0.05,
                               tooltip="Relay mode only: the penalty's width in latent frames (small: close to routed, "
                                       "large: every frame sees every phase)."),
                io.Float.Input("start_seconds", default=0.0, min=0.0, max=3600.0, step=0.01, optional=True,
                               tooltip="Where this sampling's first frame is in the clip: 0 for a clip made in one "
                                       "go; for an extension (S2V Extend) the length of the video before it; for "
                                       "InfiniteTalk's next chunk the time of its first motion frame. Phases keep "
                                       "the clip's timing."),
                io.Float.Input("clip_seconds", default=0.0, min=0.0, max=3600.0, step=0.01, optional=True,
                               tooltip="The whole clip's length when the phase script runs past this sampling (an "
                                       "extended clip); 0: the clip ends with this sampling, and a script longer "
                                       "than that is refused."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, mode: str = "routed", feather: float = 2.0, relay_width: float = 2.0,
                start_seconds: float = 0.0, clip_seconds: float = 0.0) -> io.NodeOutput:
        return io.NodeOutput(apply_phase_control(model, mode, feather, relay_width, start_seconds, clip_seconds))


class ActAvatarPhaseTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarPhaseTextEncode",
            display_name="ActAvatar Phase Text Encode",
            category="ActAvatar/native",
            description="Encodes the timeline's phase script with core's Wan text encoder (CLIPLoader, type wan): one "
                        "prompt whose base and phase blocks keep exact token spans, for ActAvatar Phase Control. "
                        "Outputs normal CONDITIONING for core's Wan nodes and samplers.",
            inputs=[
                io.Clip.Input("clip"),
                PhasePrompt.Input("phase_prompt"),
                io.String.Input("negative", multiline=True, default="", optional=True,
                                tooltip="Negative prompt. Empty: the script's own negative, else Wan's default."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, clip, phase_prompt, negative: str = "") -> io.NodeOutput:
        positive, neg = encode_phase_prompt(clip, phase_prompt, negative)
        return io.NodeOutput(positive, neg)


class ActAvatarPhaseGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarPhaseGuider",
            display_name="ActAvatar Phase Guider",
            category="ActAvatar/native",
            description="CFG guider for SamplerCustomAdvanced with ActAvatar's phase guidance: one more pass per step "
                        "with every phase hidden, and phase_cfg * (with phases - without) added, which pushes towards "
                        "the actions, each inside its window. phase_cfg 0 is plain CFG with no extra pass.",
            inputs=[
                io.Model.Input("model", tooltip="A model patched by ActAvatar Phase Control."),
                io.Conditioning.Input("positive", tooltip="From ActAvatar Phase Text Encode (may pass through "
                                                          "core's Wan nodes)."),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input("phase_cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Phase guidance (0: plain CFG, no extra pass). On weights never trained for "
                                       "phases it lifted no action into its window and cost lip sync (docs/RESULTS.md); "
                                       "try 1-2 only to push harder towards the actions."),
            ],
            outputs=[io.Guider.Output(display_name="guider")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float = 5.0, phase_cfg: float = 0.0) -> io.NodeOutput:
        return io.NodeOutput(make_phase_guider(model, positive, negative, cfg, phase_cfg))


#: The V3 node classes of this module.
NODES = [ActAvatarPhaseControl, ActAvatarPhaseTextEncode, ActAvatarPhaseGuider]
