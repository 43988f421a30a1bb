"""wav2vec2 audio-encoder files: ComfyUI ``audio_encoders/`` files, HF checkpoints and folders.

ComfyUI's ``comfy/audio_encoders/wav2vec2.py:Wav2Vec2Model`` uses transformers' parameter names
(``feature_extractor.conv_layers.N.conv.weight``, ``encoder.layers.N.attention.q_proj.weight`` ...), and its loader
strips a ``wav2vec2.`` prefix, so both layouts reduce to transformers' ``Wav2Vec2Model`` keys. Older HF
checkpoints store the positional conv's weight norm as ``weight_g``/``weight_v`` (renamed to the parametrization
names here); CTC/pre-training heads (``lm_head``, ``quantizer``, ``project_q``/``project_hid``) are dropped.

ComfyUI ties the size to the flavour: width 1024 = large (layer-norm feature extractor, stable layer norm,
``do_normalize=True``), width 768 = base (group-norm extractor, post-norm encoder, ``do_normalize=False`` for
chinese-wav2vec2-base). Inference here follows the same rule, keyed on the feature-extractor norm.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

ShapeOf = Callable[[str], tuple]

MARKER = "feature_projection.projection.weight"
DEFAULT_STRIDES = (5, 2, 2, 2, 2, 2, 2)
DEFAULT_KERNELS = (10, 3, 3, 3, 3, 2, 2)
_DROP_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "final_proj.", "label_embs_concat",
                  "classifier.", "projector.", "dropout_features")
OPTIONAL_KEYS = ("masked_spec_embed",)

#: The class whose config :mod:`.settings` records in exported files' metadata.
MODEL_CLASS = "Wav2Vec2Model"
#: Config entries the shapes cannot tell (the head split, strides, activations, norm epsilon, pre- vs post-norm
#: encoder layers): read from the file's metadata when it records them.
FILE_SETTINGS = ("num_attention_heads", "conv_stride", "layer_norm_eps", "hidden_act", "feat_extract_activation",
                 "do_stable_layer_norm")
#: Metadata entry ("true"/"false") for the waveform normalisation the encoder was trained with; ComfyUI's layout
#: has no place for it (ComfyUI ties it to the model size).
DO_NORMALIZE_KEY = "do_normalize"


def find_prefix(keys: Iterable[str]) -> str | None:
    best = None
    for k in keys:
        if k.endswith(MARKER):
            p = k[: -len(MARKER)]
            if (p == "" or p.endswith(".")) and (best is None or len(p) < len(best)):
                best = p
    return best


def model_key(key: str) -> str | None:
    """Prefix-free file key -> transformers ``Wav2Vec2Model`` key (None: a head the base model does not have)."""
    if key.startswith(_DROP_PREFIXES):
        return None
    if key.endswith("pos_conv_embed.conv.weight_g"):
        return key[: -len("weight_g")] + "parametrizations.weight.original0"
    if key.endswith("pos_conv_embed.conv.weight_v"):
        return key[: -len("weight_v")] + "parametrizations.weight.original1"
    return key


def _count(keys: set[str], pattern: str) -> int:
    pat = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def head_count(hidden: int) -> int:
    """wav2vec2's convention is 64-wide heads (768/12, 1024/16); tiny test widths use 16-wide heads."""
    if hidden % 64 == 0:
        return hidden // 64
    return max(1, hidden // 16)


def infer_config(keys: Iterable[str], shape_of: ShapeOf) -> dict[str, Any]:
    """``Wav2Vec2Config`` kwargs from model keys + shapes."""
    keys = set(keys)
    hidden = shape_of("encoder.layer_norm.weight")[0]
    layers = _count(keys, r"^encoder\.layers\.(\d+)\.")
    n_conv = _count(keys, r"^feature_extractor\.conv_layers\.(\d+)\.")
    conv_dim = tuple(int(shape_of(f"feature_extractor.conv_layers.{i}.conv.weight")[0]) for i in range(n_conv))
    kernels = tuple(int(shape_of(f"feature_extractor.conv_layers.{i}.conv.weight")[2]) for i in range(n_conv))
    strides = DEFAULT_STRIDES if kernels == DEFAULT_KERNELS else tuple(max(1, k // 2) if i else 5 for i, k in enumerate(kernels))
    layer_norm_extractor = "feature_extractor.conv_layers.1.layer_norm.weight" in keys
    pos = shape_of("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    return dict(
        hidden_size=int(hidden), num_hidden_layers=int(layers), num_attention_heads=head_count(int(hidden)),
        intermediate_size=int(shape_of("encoder.layers.0.feed_forward.intermediate_dense.weight")[0]),
        conv_dim=conv_dim, conv_kernel=kernels, conv_stride=strides,
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in keys,
        feat_extract_norm="layer" if layer_norm_extractor else "group",
        do_stable_layer_norm=layer_norm_extractor,
        num_conv_pos_embeddings=int(pos[2]), num_conv_pos_embedding_groups=int(hidden // pos[1]),
        layer_norm_eps=1e-5, hidden_act="gelu", feat_extract_activation="gelu",
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.05, vocab_size=32,
    )
