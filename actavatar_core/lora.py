"""LoRA for stage 2 through peft (diffusers' PeftAdapterMixin), for fine-tuning on less memory."""

from __future__ import annotations

from typing import Any

import torch

#: Attention and FFN projections of the Wan blocks; the audio adapter trains in full beside the LoRA.
LORA_TARGETS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"


def add_lora(model: Any, rank: int, alpha: float | None = None) -> None:
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS, init_lora_weights=True))


def lora_state_dict(model: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


def apply_lora_state(model: Any, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Re-create the adapter with the saved rank and load its weights (used when loading ActAvatar weights)."""
    from peft.utils import set_peft_model_state_dict

    add_lora(model, int(config["rank"]), config.get("alpha"))
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        from ..errors import WeightsError

        raise WeightsError(f"LoRA weights do not fit this model ({len(unexpected)} unexpected keys, e.g. {unexpected[0]}).",
                           "Use the LoRA saved for this model size.")
