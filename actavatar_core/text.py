"""Prompt assembly and umT5 encoding with per-token block bookkeeping.

Template (the paper keeps time anchors in the text; its exact wording is unknown, this is ours)::

    <base prompt> Phase 1 [0s-2s]: <phase 1 text>. Phase 2 [2s-4.5s]: <phase 2 text>.

Each block is tokenised on its own and the token ids are concatenated, then one end-of-sequence token is added.
That keeps the span of every block exact: ``block_ids[i]`` is 0 for base tokens (and for the end token and the
padding) and ``k`` for the tokens of phase ``k``. The umT5 encoder then sees the whole sequence at once, so each
block is read in the context of the others, as with a single flat prompt.

As in Wan, hidden states past the prompt are zeroed and the sequence is padded to ``text_len`` (512) tokens.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import PhaseScriptError
from .phases import Phase, PhaseScript, _fmt

#: umT5 context length used by Wan.
TEXT_LEN = 512
#: Wan's default negative prompt (English rendering of the official Chinese one).
DEFAULT_NEGATIVE = (
    "bright colours, overexposed, static, blurred details, subtitles, style, artwork, painting, still picture, "
    "overall grey, worst quality, low quality, JPEG artefacts, ugly, deformed, extra fingers, poorly drawn hands, "
    "poorly drawn face, malformed limbs, fused fingers, motionless frame, cluttered background, walking backwards"
)


def clean_text(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake (ftfy when installed), unescape HTML, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def phase_block_text(k: int, phase: Phase) -> str:
    """The text of phase block ``k`` (1-based), with its time anchor."""
    body = clean_text(phase.text).rstrip(".")
    return f" Phase {k} [{_fmt(phase.start)}s-{_fmt(phase.end)}s]: {body}."


def assemble_prompt(script: PhaseScript) -> list[str]:
    """The blocks of the prompt in order: base first, then one string per phase."""
    return [clean_text(script.base)] + [phase_block_text(k, p) for k, p in enumerate(script.phases, start=1)]


@dataclass
class TokenizedPrompt:
    input_ids: torch.Tensor  # (1, text_len) long
    attention_mask: torch.Tensor  # (1, text_len) long, 1 for real tokens
    block_ids: torch.Tensor  # (1, text_len) long: 0 base/end/padding, k for phase k
    length: int
    text: str
    num_phases: int


@dataclass
class EncodedPrompt:
    """What the transformer's text cross-attention consumes."""

    embeds: torch.Tensor  # (1, text_len, text_dim), zero past ``length``
    block_ids: torch.Tensor  # (1, text_len) long
    length: int
    text: str
    num_phases: int

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "EncodedPrompt":
        return EncodedPrompt(self.embeds.to(device=device, dtype=dtype), self.block_ids.to(device), self.length,
                             self.text, self.num_phases)


def tokenize_blocks(tokenizer: Any, blocks: Sequence[str], text_len: int = TEXT_LEN) -> TokenizedPrompt:
    """Tokenise each block separately and concatenate, recording which block every token belongs to."""
    ids: list[int] = []
    owners: list[int] = []
    for k, block in enumerate(blocks):
        piece = tokenizer(block, add_special_tokens=False)["input_ids"] if block else []
        ids += list(piece)
        owners += [k] * len(piece)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 1
    ids.append(eos)
    owners.append(0)
    if len(ids) > text_len:
        per_block = [owners.count(k) for k in range(len(blocks))]
        detail = ", ".join(["base %d" % per_block[0]] + [f"phase {k} {n}" for k, n in enumerate(per_block[1:], 1)])
        raise PhaseScriptError(
            f"The prompt is {len(ids)} tokens long ({detail}); the text encoder reads at most {text_len}.",
            "Shorten the base prompt or the phase texts.",
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = len(ids)
    padding = text_len - length
    return TokenizedPrompt(
        input_ids=torch.tensor([ids + [pad] * padding], dtype=torch.long),
        attention_mask=torch.tensor([[1] * length + [0] * padding], dtype=torch.long),
        block_ids=torch.tensor([owners + [0] * padding], dtype=torch.long),
        length=length,
        text="".join(blocks),
        num_phases=len(blocks) - 1,
    )


def tokenize_script(tokenizer: Any, script: PhaseScript, text_len: int = TEXT_LEN) -> TokenizedPrompt:
    return tokenize_blocks(tokenizer, assemble_prompt(script), text_len)


def tokenize_plain(tokenizer: Any, text: str, text_len: int = TEXT_LEN) -> TokenizedPrompt:
    """A flat prompt (negative prompt, brief caption, or the 'global prompt' ablation): one base block."""
    return tokenize_blocks(tokenizer, [clean_text(text)], text_len)


@torch.no_grad()
def encode_tokens(text_encoder: Any, tokens: TokenizedPrompt, dtype: torch.dtype | None = None) -> EncodedPrompt:
    """Run umT5 and zero everything past the prompt, exactly as Wan's pipelines do."""
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)).last_hidden_state
    hidden = hidden.float() * tokens.attention_mask.to(device)[..., None]
    hidden = hidden.to(dtype or hidden.dtype)
    return EncodedPrompt(hidden, tokens.block_ids.to(device), tokens.length, tokens.text, tokens.num_phases)


def encode_script(text_encoder: Any, tokenizer: Any, script: PhaseScript, *, phased: bool = True,
                  text_len: int = TEXT_LEN, dtype: torch.dtype | None = None) -> EncodedPrompt:
    """Encode a phase script. ``phased=False`` gives the flat 'global prompt' (base and phase texts joined,
    no time anchors, every token in block 0): the paper's no-PACA baseline."""
    if phased:
        tokens = tokenize_script(tokenizer, script, text_len)
    else:
        flat = " ".join([clean_text(script.base)] + [clean_text(p.text).rstrip(".") + "." for p in script.phases])
        tokens = tokenize_plain(tokenizer, flat, text_len)
    return encode_tokens(text_encoder, tokens, dtype)


def encode_plain(text_encoder: Any, tokenizer: Any, text: str, *, text_len: int = TEXT_LEN,
                 dtype: torch.dtype | None = None) -> EncodedPrompt:
    return encode_tokens(text_encoder, tokenize_plain(tokenizer, text, text_len), dtype)
