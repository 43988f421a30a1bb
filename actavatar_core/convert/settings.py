"""Model settings carried in a single file's safetensors metadata, for what the tensor shapes cannot tell.

Why: a single file in a community layout holds only tensors, and the loaders infer the config from shapes using
the released models' conventions (Wan heads are 128 wide, wav2vec2 heads 64 wide, umT5 attends up to distance
128, a VAE without stats gets mean 0 / std 1). Models that break a convention - the mini model has 4 heads of 32
in a 128-wide transformer, a trained VAE has per-channel latent stats - would load *silently wrong*. Files written
by :mod:`actavatar_core.export` therefore record the model's library config in the metadata:

* ``model_class``: the diffusers/transformers class name the config belongs to (``WanTransformer3DModel``,
  ``AutoencoderKLWan``, ``UMT5EncoderModel``, ``Wav2Vec2Model``);
* ``model_config``: that class's config as JSON (the whole config, so a person can read it too).

Loaders take from it only the settings each family lists as not readable from shapes (``FILE_SETTINGS`` in
:mod:`.wan_transformer`, :mod:`.wan_vae`, :mod:`.umt5`, :mod:`.wav2vec2`); everything else still comes from the
shapes, which are the truth about the tensors. A config for another class is ignored; a damaged one is refused.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from ..errors import WeightsError

MODEL_CLASS_KEY = "model_class"
MODEL_CONFIG_KEY = "model_config"


def _plain(value: Any) -> Any:
    """JSON-friendly: tuples -> lists, torch dtypes and other objects -> str."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def settings_metadata(model_class: str, config: Mapping[str, Any]) -> dict[str, str]:
    """The metadata entries recording ``config`` (keys starting with ``_`` are library bookkeeping: dropped)."""
    public = {k: _plain(v) for k, v in config.items() if not str(k).startswith("_")}
    return {MODEL_CLASS_KEY: model_class, MODEL_CONFIG_KEY: json.dumps(public, sort_keys=True)}


def read_settings(metadata: Mapping[str, str] | None, model_class: str, keys: Iterable[str], name: str = "the file",
                  *, strict: bool = True) -> dict[str, Any]:
    """The entries ``keys`` of the recorded config when it belongs to ``model_class`` ({} when there is none).

    ``strict``: a ``model_config`` that is not a JSON object raises :class:`WeightsError` (loaders); otherwise it
    is ignored (file identification must never fail on metadata).
    """
    metadata = metadata or {}
    if metadata.get(MODEL_CLASS_KEY) != model_class or MODEL_CONFIG_KEY not in metadata:
        return {}
    try:
        config = json.loads(metadata[MODEL_CONFIG_KEY])
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        if not strict:
            return {}
        raise WeightsError(f"{name} has a damaged '{MODEL_CONFIG_KEY}' entry in its metadata ({exc}).",
                           "Re-export the file with 'actavatar export', or re-download it.") from None
    return {k: config[k] for k in keys if k in config}
