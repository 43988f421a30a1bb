"""Tiny configurations of the real model classes, built in-process with no download.

They exist for tests and for the smoke run of the command line: the same diffusers/transformers classes as
Wan2.2-TI2V-5B (transformer, Wan2.2 VAE, umT5, wav2vec2), with widths small enough to run in milliseconds on a CPU.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

#: The diffusers WanTransformer3DModel config of Wan2.2-TI2V-5B.
TI2V_5B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=3, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)

TINY_VAE = dict(
    base_dim=16, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)

TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)

TINY_WAV2VEC2 = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
    conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer",
)

#: Words the in-process tokenizer knows besides the ones a caller adds; enough for the examples and tests.
BASE_VOCAB = (
    "a an the and with of to in on at is are his her their its this that then while phase base s "
    "man woman person character avatar speaker talks talking speaks speaking says sings smiles looks camera "
    "raises raising lifts lowers left right hand hands arm arms both waves waving wave points pointing down up "
    "claps clapping nods nodding head shakes turns sits stands walks forward back slowly quickly calmly "
    "red green blue yellow orange purple pink grey gray black white brown dark light shirt jacket suit dress "
    "background room studio office outdoors indoors professional attire gestures palms facing outward emphasize "
    "details holds teapot circles sweep indicate withdraw blurry static distorted ugly low quality worst"
).split()

_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]", re.IGNORECASE)


def tiny_tokenizer(extra_words: Iterable[str] = ()):  # -> transformers.PreTrainedTokenizerFast
    """A word-level tokenizer (lower-cased words, digits and punctuation) with T5's special tokens:
    pad 0, eos 1, unk 2. Built in-process; saved with ``save_pretrained`` like any fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    symbols = list("0123456789.,:;!?-[]()'\"/|")
    words: list[str] = []
    for word in list(BASE_VOCAB) + [w.lower() for w in extra_words]:
        if word not in words:
            words.append(word)
    vocab = {tok: i for i, tok in enumerate(specials + symbols + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(vocab_size: int, seed: int = 0, **overrides: Any):  # -> UMT5EncoderModel
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, **{**TINY_UMT5, **overrides})
    return UMT5EncoderModel(cfg).eval()


def tiny_audio_encoder(seed: int = 0, **overrides: Any):  # -> Wav2Vec2Model
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    return Wav2Vec2Model(Wav2Vec2Config(**{**TINY_WAV2VEC2, **overrides})).eval()


def tiny_vae(seed: int = 0, **overrides: Any):  # -> AutoencoderKLWan
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**{**TINY_VAE, **overrides}).eval()


def tiny_wan_transformer(seed: int = 0, **overrides: Any):  # -> WanTransformer3DModel
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).eval()
