"""umT5 text-encoder files: ComfyUI single files, HF checkpoints, diffusers ``text_encoder/`` folders.

ComfyUI's ``comfy/text_encoders/t5.py:T5`` uses the same parameter names as transformers' ``UMT5EncoderModel``
(``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight`` ...), without the tied
``encoder.embed_tokens.weight``; its files add the tokenizer as a ``spiece_model`` uint8 tensor and, for the fp8
release, the quantisation side tensors (see :mod:`.quant`). HF ``UMT5ForConditionalGeneration`` checkpoints add a
``decoder.*`` stack and ``lm_head``, which the encoder does not use.

umT5 differs from T5 v1.1 by a relative-attention bias in *every* block, which is how the two are told apart.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

ShapeOf = Callable[[str], tuple]

MARKER = "encoder.final_layer_norm.weight"
TOKENIZER_KEY = "spiece_model"

#: The class whose config :mod:`.settings` records in exported files' metadata.
MODEL_CLASS = "UMT5EncoderModel"
#: Config entries the shapes cannot tell (the relative-position range, the norm epsilon, the FFN activation):
#: read from the file's metadata when it records them.
FILE_SETTINGS = ("relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj")


def find_prefix(keys: Iterable[str]) -> str | None:
    best = None
    for k in keys:
        if k.endswith(MARKER):
            p = k[: -len(MARKER)]
            if (p == "" or p.endswith(".")) and (best is None or len(p) < len(best)):
                best = p
    return best


def num_blocks(keys: Iterable[str]) -> int:
    pat = re.compile(r"^encoder\.block\.(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pat.match(k))]
    return max(found) + 1 if found else 0


def is_umt5(keys: Iterable[str]) -> bool:
    """umT5 has a relative attention bias in every block; T5 only in block 0."""
    keys = set(keys)
    return "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys or (
        num_blocks(keys) == 1 and "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys)


def model_key(key: str) -> str | None:
    """Prefix-free file key -> ``UMT5EncoderModel`` key (None: not part of the encoder)."""
    if key == "shared.weight" or key.startswith("encoder.") and key != "encoder.embed_tokens.weight":
        return key
    return None


def infer_config(keys: Iterable[str], shape_of: ShapeOf) -> dict[str, Any]:
    """``UMT5Config`` kwargs from prefix-free keys + shapes (heads from the relative attention bias)."""
    keys = set(keys)
    embed_key = "shared.weight" if "shared.weight" in keys else "encoder.embed_tokens.weight"
    vocab, d_model = shape_of(embed_key)
    buckets, heads = shape_of("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape_of("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    d_ff = shape_of("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    return dict(
        vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner // heads), d_ff=int(d_ff),
        num_layers=num_blocks(keys), num_decoder_layers=num_blocks(keys), num_heads=int(heads),
        relative_attention_num_buckets=int(buckets), relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
