"""A fast tokenizer from SentencePiece model bytes (the ``spiece_model`` tensor of ComfyUI's umT5 files).

ComfyUI tokenizes umT5 prompts with ``sentencepiece`` directly (``comfy/text_encoders/spiece_tokenizer.py``,
``add_eos=True``). We build the equivalent ``tokenizers`` pipeline ourselves so the result is an ordinary
transformers fast tokenizer (``save_pretrained``, padding, batching) that encodes like SentencePiece:

* the piece table, scores and the *proto's own* unk id go into a Unigram model (transformers' ``T5Tokenizer``
  hard-codes unk id 2, but umT5 has ``<pad>`` 0, ``</s>`` 1, ``<s>`` 2, ``<unk>`` 3, so building it that way would
  map unknown text to ``<s>``);
* the precompiled normalisation charsmap, whitespace handling and dummy prefix follow the proto's normalizer spec;
* ``</s>`` is appended, and umT5's 300 sentinel tokens ``<extra_id_N>`` follow the pieces (in reverse, as the
  original tokenizer has them).

The proto is read with a ~40-line wire-format reader, so neither ``protobuf`` nor ``sentencepiece`` is needed at
run time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import WeightsError

#: umT5's sentinel count: google/umt5-xxl has 256,000 pieces followed by ``<extra_id_299>`` ... ``<extra_id_0>``.
UMT5_EXTRA_IDS = 300
UMT5_PIECES = 256000

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class SpmModel:
    """The parts of a SentencePiece ``ModelProto`` a Unigram tokenizer needs."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def piece(self, index: int) -> str | None:
        return self.pieces[index][0] if 0 <= index < len(self.pieces) else None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, wire, value


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def parse_spm(data: bytes) -> SpmModel:
    """Parse serialized SentencePiece model bytes. Raises ValueError on anything that is not one."""
    model = SpmModel()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:  # pieces
            piece, score, ptype = "", 0.0, _NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    ptype = v
            model.pieces.append((piece, score, ptype))
        elif number == 2 and wire == 2:  # trainer_spec
            for n, w, v in _fields(value):
                if w != 0:
                    continue
                if n == 3:
                    model.model_type = v
                elif n == 35:
                    model.byte_fallback = bool(v)
                elif n == 40:
                    model.unk_id = _int32(v)
                elif n == 41:
                    model.bos_id = _int32(v)
                elif n == 42:
                    model.eos_id = _int32(v)
                elif n == 43:
                    model.pad_id = _int32(v)
        elif number == 3 and wire == 2:  # normalizer_spec
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    model.precompiled_charsmap = bytes(v)
                elif n == 3 and w == 0:
                    model.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    model.remove_extra_whitespaces = bool(v)
                elif n == 5 and w == 0:
                    model.escape_whitespaces = bool(v)
    if not model.pieces:
        raise ValueError("no pieces")
    return model


def spm_bytes_from_tensor(tensor: Any) -> bytes:
    """The bytes of ComfyUI's ``spiece_model`` uint8 tensor."""
    import torch

    return tensor.detach().to("cpu", torch.uint8).contiguous().view(-1).numpy().tobytes()


def build_tokenizer(data: bytes, *, extra_ids: int | None = None, model_max_length: int = 512,
                    source: str = "the SentencePiece model"):  # -> transformers.PreTrainedTokenizerFast
    """A transformers fast tokenizer equivalent to ``SentencePieceProcessor(model_proto=data, add_eos=True)``.

    ``extra_ids``: sentinel tokens appended after the pieces; None picks umT5's 300 for a 256,000-piece model and
    none otherwise (a tiny test model).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    try:
        spm = parse_spm(data)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise WeightsError(f"{source} is not a valid SentencePiece model ({exc}).",
                           "Use the spiece.model of google/umt5-xxl, or the tokenizer/ folder of "
                           "Wan-AI/Wan2.2-TI2V-5B-Diffusers.") from None
    if spm.model_type != 1:
        raise WeightsError(f"{source} is a SentencePiece model of type {spm.model_type}, not Unigram; umT5 uses Unigram.",
                           "Use the spiece.model of google/umt5-xxl.")
    if extra_ids is None:
        extra_ids = UMT5_EXTRA_IDS if len(spm.pieces) == UMT5_PIECES else 0
    vocab = [(p, s) for p, s, _ in spm.pieces] + [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = Tokenizer(Unigram(vocab, unk_id=spm.unk_id if spm.unk_id >= 0 else None, byte_fallback=spm.byte_fallback))

    norms = []
    if spm.precompiled_charsmap:
        norms.append(normalizers.Precompiled(spm.precompiled_charsmap))
    if spm.remove_extra_whitespaces:
        norms += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norms:
        tok.normalizer = normalizers.Sequence(norms)
    prepend = "always" if spm.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=True)

    def special(index: int) -> str | None:
        return spm.piece(index) if index >= 0 else None

    eos, pad, unk, bos = special(spm.eos_id), special(spm.pad_id), special(spm.unk_id), special(spm.bos_id)
    if eos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                           special_tokens=[(eos, spm.eos_id)])
    # Control pieces (<pad>, </s>, <s>) are never produced from text by SentencePiece; mark them special so that
    # a literal "</s>" in a prompt does not become the control token either way.
    specials = [p for p, _, t in spm.pieces if t == _CONTROL]
    specials += [f"<extra_id_{i}>" for i in range(extra_ids)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    kwargs: dict[str, Any] = {}
    for name, value in (("eos_token", eos), ("pad_token", pad), ("unk_token", unk), ("bos_token", bos)):
        if value is not None:
            kwargs[name] = value
    if extra_ids:
        kwargs["additional_special_tokens"] = [f"<extra_id_{i}>" for i in range(extra_ids)]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **kwargs)
    out.padding_side = "right"
    return out
