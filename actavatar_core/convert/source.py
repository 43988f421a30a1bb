"""Lazy, safe access to weights files: names, shapes and dtypes first, tensor data only when asked.

Why lazy: the files are 5-11 GB. Identifying a file must not read it, and loading must convert tensor by tensor
(rename, dequantise, cast) so that at most one extra tensor exists besides the result, never two full copies.

Safety: ``.safetensors`` is read with safetensors; ``.pt/.pth/.bin/.ckpt`` only with
``torch.load(weights_only=True)``, and a file that needs anything more (pickled code or objects) is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import WeightsError

SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))

#: Keys that wrap a state dict inside a training checkpoint saved with torch.save.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "generator", "ema")


class TensorSource:
    """Tensors of one file or of a folder of shards, addressed by name.

    ``shape(k)``/``dtype(k)`` never read tensor data for safetensors; ``get(k)`` reads one tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._where: dict[str, Any] = {}      # key -> open safetensors handle, or the loaded dict
        self._handles: list[Any] = []
        if not self.path.exists():
            raise WeightsError(f"'{self.path}' does not exist.",
                               "Check the path, or put the file in the ComfyUI models folder it belongs in.")
        files = weight_files(self.path) if self.path.is_dir() else [self.path]
        for file in files:
            self._add(file)
        if not self._where:
            raise WeightsError(f"'{self.path.name}' holds no tensors.", "Re-download the file; it may be truncated.")

    # ------------------------------------------------------------------------------------------ reading
    def _add(self, file: Path) -> None:
        suffix = file.suffix.lower()
        if suffix in SAFE_SUFFIXES:
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                keys = list(handle.keys())
                meta = handle.metadata() or {}
            except Exception as exc:  # noqa: BLE001 - any parse failure means "not a readable safetensors file"
                raise WeightsError(f"'{file.name}' could not be read as safetensors ({_short(exc)}).",
                                   "Re-download the file; it is probably truncated or not a safetensors file.") from None
            self._handles.append(handle)
            self.metadata.update(meta)
            for k in keys:
                self._where[k] = handle
        elif suffix in TORCH_SUFFIXES:
            state = load_torch_file(file)
            for k, v in state.items():
                self._where[k] = state
        elif suffix == ".gguf":
            raise WeightsError(f"'{file.name}' is a GGUF file; ActAvatar reads safetensors (and plain torch tensors files).",
                               "Use the fp16/bf16 or fp8_scaled .safetensors release of this model.")
        else:
            raise WeightsError(f"'{file.name}' is not a weights format ActAvatar reads (suffix '{file.suffix}').",
                               "Use a .safetensors file (or a .pt/.pth/.bin/.ckpt holding only tensors).")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        where = self._where[key]
        if isinstance(where, dict):
            return tuple(where[key].shape)
        return tuple(where.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | None:
        where = self._where[key]
        if isinstance(where, dict):
            return where[key].dtype
        return _ST_DTYPES.get(where.get_slice(key).get_dtype())

    def get(self, key: str) -> torch.Tensor:
        where = self._where[key]
        if isinstance(where, dict):
            return where[key]
        return where.get_tensor(key)

    def metas(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """name -> (shape, dtype) of every tensor, without reading data."""
        return {k: (self.shape(k), self.dtype(k)) for k in self._where}

    def close(self) -> None:
        for h in self._handles:
            try:
                h.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._handles.clear()
        self._where.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (memory-mapped when possible); refuse pickles, unwrap training checkpoints."""
    import pickle

    def _load(mmap: bool) -> Any:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        with open(file, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise WeightsError(f"'{file.name}' cannot be read ({exc.strerror or exc}).", "Check the file's permissions.") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (or, long ago, a pickle)
        raise WeightsError(f"'{file.name}' could not be read as a torch tensors file (it is neither a zip archive "
                           f"nor a pickle stream; it starts with {head!r}).",
                           "Re-download the file, or use its .safetensors release.")
    try:
        try:
            obj = _load(True)
        except (RuntimeError, ValueError) as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            obj = _load(False)  # legacy (non-zip) torch.save files cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"'{file.name}' contains pickled Python objects or code, which ActAvatar never loads "
            f"(torch.load(weights_only=True) refused it: {_pickle_reason(exc)}).",
            "Use the .safetensors release of this model, or convert the file to safetensors in a trusted environment.",
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"'{file.name}' could not be read as a torch tensors file ({_short(exc)}).",
                           "Re-download the file, or use its .safetensors release.") from None
    return _unwrap(obj, file.name)


def _pickle_reason(exc: BaseException) -> str:
    """The line of torch's refusal that names what the pickle wanted (torch's own advice, to retry with
    ``weights_only=False``, is exactly what must not be done, so it is left out)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "global" in ln or "Unsupported" in ln]
    reason = (named or [ln for ln in lines if "weights_only" not in ln] or ["not a plain tensors file"])[0]
    return reason if len(reason) <= 160 else reason[:160] + "..."


def _unwrap(obj: Any, name: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"'{name}' holds a {type(obj).__name__}, not a dict of tensors.",
                           "Use the .safetensors release of this model.")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers/transformers model folder: an index's shards, else its weights file(s)."""
    for index in sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.bin.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"'{index}' is not a valid shard index ({_short(exc)}).", "Re-download the model folder.") from None
        shards = sorted({folder / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise WeightsError(f"'{folder.name}' is missing shard(s) {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''} listed in {index.name}.",
                               "Download the whole folder again; a shard is incomplete or absent.")
        return shards
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        singles = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in TORCH_SUFFIXES]
    if not singles:
        raise WeightsError(f"The folder '{folder}' holds no weights (.safetensors) file.",
                           "Point to the model folder that holds config.json and the weights, or to the weights file.")
    return singles


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder (config, index); anything else is a damaged folder."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"'{path}' is not valid JSON ({_short(exc)}).", "Re-download the model folder.") from None
    if not isinstance(value, dict):
        raise WeightsError(f"'{path}' holds a JSON {type(value).__name__}, not an object.", "Re-download the model folder.")
    return value


