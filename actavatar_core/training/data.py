"""Training data: the annotation format, and the cache of frozen-encoder outputs.

Dataset format (written by ``actavatar synth``; any real dataset can be converted to it)::

    DATASET/annotations.jsonl   one JSON object per clip:
        {"id": "clip_0001", "video": "clips/clip_0001.mp4",       # H.264 video with the speech as its audio track
         "fps": 25, "num_frames": 101,                             # 4k+1 frames
         "caption": "a person is talking",                         # brief caption (stage 1)
         "base": "A woman in a red shirt ... talks",               # base block (stage 2)
         "phases": [{"start": 0.9, "end": 2.4, "text": "raises the right hand"}]}

Preprocessing runs the frozen encoders once and writes safetensors shards to the cache folder: per clip the
normalised VAE latents, the umT5 encodings of the brief caption, of the flat global prompt and of the phased
prompt (with its block ids), and the wav2vec2 windows per latent frame. Training then never touches the encoders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ActAvatarError
from ..phases import PhaseScript, latent_frame_count

INDEX = "index.json"


@dataclass
class Annotation:
    id: str
    video: Path
    fps: float
    num_frames: int
    caption: str
    script: PhaseScript
    raw: dict[str, Any]


def read_annotations(dataset: "str | os.PathLike") -> list[Annotation]:
    """Parse ``annotations.jsonl``; every problem names the line and the fix."""
    root = Path(dataset)
    path = root / "annotations.jsonl"
    if not path.is_file():
        raise ActAvatarError(f"'{root}' has no annotations.jsonl.", "Point data.dataset at a dataset folder (see `actavatar synth`).")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            script = PhaseScript.from_json({"base": raw["base"], "phases": raw.get("phases", [])})
            fps, frames = float(raw["fps"]), int(raw["num_frames"])
            latent_frame_count(frames)
            script.validate(duration=frames / fps, fps=fps)
            out.append(Annotation(str(raw["id"]), root / raw["video"], fps, frames, str(raw.get("caption", "")), script, raw))
        except (KeyError, ValueError, TypeError) as exc:
            raise ActAvatarError(f"annotations.jsonl line {n} is invalid: {exc}", "Fix or remove that line.") from None
    if not out:
        raise ActAvatarError(f"'{path}' lists no clips.", "Generate or add clips first.")
    return out


def global_prompt(script: PhaseScript) -> str:
    """The flat prompt of the paper's no-PACA baseline: base and actions, no time anchors."""
    return " ".join([script.base.rstrip(".") + "."] + [p.text.rstrip(".") + "." for p in script.phases])


def fingerprints(*modules: Any, extras: list[Any]) -> list[str]:
    """The identity of the frozen encoders (a hash of every weight's bytes, name and dtype) combined with each of
    ``extras``, for cache validity; the weights (gigabytes for Wan's encoders) are hashed once. Bytes, not sums: a
    float sum depends on the thread count, and a cache must not look stale to a run that merely uses fewer threads.
    Configs are left out: a model saved and reloaded is the same model."""
    h = hashlib.blake2b(digest_size=16)
    for m in modules:
        for name, p in sorted(m.state_dict().items()):
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    out = []
    for extra in extras:
        done = h.copy()
        done.update(json.dumps(extra, sort_keys=True, default=str).encode())
        out.append(done.hexdigest()[:16])
    return out


def vae_encoding_modules(vae: Any) -> list[torch.nn.Module]:
    """The parts of the VAE that make the cached latents. Only these enter the cache fingerprint, so fine-tuning the
    decoder (the ``vae_decoder`` stage) keeps the cache and every stage trained on it valid."""
    return [vae.encoder, vae.quant_conv]


# How many pixels (frames x height x width) the VAE encodes in one batch while preprocessing. Batching clips of
# the same shape runs the VAE's many small causal convolutions at 2-3x the throughput on a CPU; a clip larger than
# this (Wan 2.2 at 704x1280) is still encoded alone, so memory stays that of one clip.
VAE_BATCH_PIXELS = 8 * 77 * 128 * 128


def read_clip(ann: Annotation) -> tuple[Any, float, Any, int]:
    """The clip's first ``num_frames`` frames (uint8 (T, H, W, 3)), fps, audio (channels, samples) and rate."""
    from ..video import read_video

    frames, fps, audio, rate = read_video(ann.video)
    if len(frames) < ann.num_frames:
        raise ActAvatarError(f"{ann.video.name} has {len(frames)} frames, the annotation says {ann.num_frames}.", "Re-export the clip.")
    if audio is None:
        raise ActAvatarError(f"{ann.video.name} has no audio track.", "Mux the speech into the clip.")
    return frames[: ann.num_frames], fps, audio, rate


@torch.no_grad()
def encode_clip(ann: Annotation, vae: Any, text_encoder: Any, tokenizer: Any, audio_encoder: Any,
                audio_config: dict, text_len: int, window: int, clip: tuple[Any, float, Any, int] | None = None,
                latents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All cached tensors of one clip. ``clip`` (from :func:`read_clip`) and ``latents`` may come precomputed,
    as :func:`preprocess` does to encode the VAE in batches."""
    from ..audio import encode_audio
    from ..text import encode_plain, encode_script
    from ..vae import encode_video, frames_to_tensor

    frames, fps, audio, rate = clip if clip is not None else read_clip(ann)
    if latents is None:
        latents = encode_video(vae, frames_to_tensor(frames))[0]
    emb = encode_audio(audio_encoder, {"waveform": torch.from_numpy(audio)[None], "sample_rate": rate}, fps=ann.fps,
                       num_frames=ann.num_frames, do_normalize=audio_config.get("do_normalize", True), window=window)
    caption = encode_plain(text_encoder, tokenizer, ann.caption, text_len=text_len)
    flat = encode_plain(text_encoder, tokenizer, global_prompt(ann.script), text_len=text_len)
    phased = encode_script(text_encoder, tokenizer, ann.script, text_len=text_len)
    tensors = {
        "latents": latents,
        "audio": emb.features[0],
        "text_caption": caption.embeds[0, : caption.length],
        "text_global": flat.embeds[0, : flat.length],
        "text_phased": phased.embeds[0, : phased.length],
    }
    out = {k: v.float().cpu().contiguous() for k, v in tensors.items()}  # encoders may sit on the GPU; shards are CPU
    out["ids_phased"] = phased.block_ids[0, : phased.length].cpu().contiguous()
    return out


@torch.no_grad()
def encode_clips(annotations: list[Annotation], vae: Any, text_encoder: Any, tokenizer: Any, audio_encoder: Any,
                 audio_config: dict, text_len: int, window: int,
                 batch_pixels: int = VAE_BATCH_PIXELS) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`encode_clip` for each clip in order, with the VAE run on consecutive clips of the same shape
    together (up to ``batch_pixels``); only one batch of decoded frames is held at a time."""
    from ..vae import encode_video, frames_to_tensor

    batch: list[tuple[Annotation, tuple[Any, float, Any, int]]] = []

    def flush() -> Iterator[dict[str, torch.Tensor]]:
        latents = encode_video(vae, torch.cat([frames_to_tensor(c[0]) for _, c in batch]))
        for i, (ann, clip) in enumerate(batch):
            yield encode_clip(ann, vae, text_encoder, tokenizer, audio_encoder, audio_config, text_len, window,
                              clip=clip, latents=latents[i].clone())  # own storage: shards reject shared tensors
        batch.clear()

    for ann in annotations:
        clip = read_clip(ann)
        if batch and (clip[0].shape != batch[0][1][0].shape or (len(batch) + 1) * clip[0][..., 0].size > batch_pixels):
            yield from flush()
        batch.append((ann, clip))
    if batch:
        yield from flush()


def preprocess(annotations: list[Annotation], cache_dir: "str | os.PathLike", *, vae: Any, text_encoder: Any,
               tokenizer: Any, audio_encoder: Any, audio_config: dict, text_len: int, window: int,
               shard_size: int = 64, progress: bool = True, reuse: "str | os.PathLike | None" = None,
               batch_pixels: int = VAE_BATCH_PIXELS) -> Path:
    """Write (or reuse) the cache. A cache made with other encoders or another clip list is rebuilt; a cache
    interrupted half-way resumes at the first missing shard. ``reuse``: another complete cache made with the same
    encoders; its clips with the same id, video bytes and script are copied instead of encoded again (a stage's own
    clips often contain the run's). ``batch_pixels``: see :data:`VAE_BATCH_PIXELS`."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    settings = {"text_len": text_len, "window": window, "tok": len(tokenizer),
                "latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std}
    fp, encoders = fingerprints(*vae_encoding_modules(vae), text_encoder, audio_encoder,
                                extras=[{"ids": [a.id for a in annotations], **settings}, settings])
    reusable = _reusable_clips(reuse, encoders)
    index_path = cache / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("fingerprint") == fp and index.get("complete"):
            return cache
        if index.get("fingerprint") != fp:
            print(f"preprocess: {cache} was made with other encoders or clips; rebuilding it", flush=True)
            for old in cache.glob("shard_*.safetensors"):
                old.unlink()
    # Claim the folder for these encoders before the first shard: an interrupted build then resumes at the first
    # missing shard instead of being judged stale and deleted.
    index_path.write_text(json.dumps({"fingerprint": fp, "encoders": encoders, "complete": False}))
    empty = encode_empty(text_encoder, tokenizer, text_len)
    save_file({"text_empty": empty}, str(cache / "empty.safetensors"))
    shards = [annotations[i : i + shard_size] for i in range(0, len(annotations), shard_size)]
    entries = []
    bar = tqdm(total=len(annotations), desc="preprocess", unit="clip", disable=not progress)
    for s, group in enumerate(shards):
        path = cache / f"shard_{s:05d}.safetensors"
        digests = [video_digest(a.video) for a in group]
        if not path.is_file():
            clips = [_copy_clip(reusable, ann, digests[j]) for j, ann in enumerate(group)]
            fresh = [j for j, c in enumerate(clips) if c is None]
            encoded = encode_clips([group[j] for j in fresh], vae, text_encoder, tokenizer, audio_encoder,
                                   audio_config, text_len, window, batch_pixels=batch_pixels)
            for j, clip in zip(fresh, encoded):
                clips[j] = clip
            tensors = {f"{j}.{key}": value for j, clip in enumerate(clips) for key, value in clip.items()}
            meta = {"ids": json.dumps([a.id for a in group])}
            tmp = path.with_suffix(".partial")
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        entries += [{"id": a.id, "shard": path.name, "slot": j, "fps": a.fps, "num_frames": a.num_frames,
                     "script": a.script.to_json(), "video": digests[j]} for j, a in enumerate(group)]
        bar.update(len(group))
    bar.close()
    index_path.write_text(json.dumps({"fingerprint": fp, "encoders": encoders, "complete": True, "text_len": text_len,
                                      "clips": entries}))
    return cache


def video_digest(path: "str | os.PathLike") -> str:
    """The identity of a clip's file, so a clip is copied from another cache only when it is the same video."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def _reusable_clips(reuse: "str | os.PathLike | None", encoders: str) -> dict[str, tuple[Path, dict[str, Any]]]:
    """id -> (shard file, index entry) of a complete cache made with the same encoders (older caches, which do
    not record their encoders, are never reused)."""
    if reuse is None or not (Path(reuse) / INDEX).is_file():
        return {}
    index = json.loads((Path(reuse) / INDEX).read_text())
    if not index.get("complete") or index.get("encoders") != encoders:
        return {}
    return {e["id"]: (Path(reuse) / e["shard"], e) for e in index["clips"] if "video" in e}


def _copy_clip(reusable: dict[str, tuple[Path, dict[str, Any]]], ann: Annotation,
               digest: str) -> dict[str, torch.Tensor] | None:
    """The clip's tensors from the reusable cache, or None when it is not there as the same video and script."""
    from safetensors import safe_open

    found = reusable.get(ann.id)
    if found is None:
        return None
    shard, entry = found
    if entry["script"] != ann.script.to_json() or entry["video"] != digest:
        return None
    prefix = f"{entry['slot']}."
    with safe_open(str(shard), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@torch.no_grad()
def encode_empty(text_encoder: Any, tokenizer: Any, text_len: int) -> torch.Tensor:
    """The empty prompt used for caption dropout (and as the negative prompt of models trained that way)."""
    from ..text import encode_plain

    enc = encode_plain(text_encoder, tokenizer, "", text_len=text_len)
    return enc.embeds[0, : enc.length].float().contiguous()


class CachedClips(torch.utils.data.Dataset):
    """Clips from the cache; tensors are read lazily per shard (safetensors memory-maps the file)."""

    def __init__(self, cache_dir: "str | os.PathLike"):
        self.cache = Path(cache_dir)
        index = json.loads((self.cache / INDEX).read_text())
        self.entries = index["clips"]
        self.text_len = index["text_len"]
        self._handles: dict[str, Any] = {}
        from safetensors.torch import load_file

        self.empty = load_file(str(self.cache / "empty.safetensors"))["text_empty"]

    def __len__(self) -> int:
        return len(self.entries)

    def _get(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.cache / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        keys = ("latents", "audio", "text_caption", "text_global", "text_phased", "ids_phased")
        item = {k: self._get(e["shard"], f"{e['slot']}.{k}") for k in keys}
        item["index"] = i
        return item

    def script(self, i: int) -> PhaseScript:
        """The phase script clip ``i`` was annotated with (``routed`` training builds its routing from it)."""
        return PhaseScript.from_json(self.entries[i]["script"])

    def fps(self, i: int) -> float:
        return float(self.entries[i]["fps"])

    def __getstate__(self):  # DataLoader workers reopen their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def pad_text(embeds: list[torch.Tensor], ids: list[torch.Tensor] | None, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad variable-length encodings to ``text_len`` (Wan's convention) with block id 0 on padding."""
    dim = embeds[0].shape[-1]
    out = torch.zeros(len(embeds), text_len, dim)
    out_ids = torch.zeros(len(embeds), text_len, dtype=torch.long)
    for b, e in enumerate(embeds):
        out[b, : e.shape[0]] = e
        if ids is not None:
            out_ids[b, : ids[b].shape[0]] = ids[b]
    return out, out_ids


def length_batches(lengths: list[int], order: list[int], batch_size: int) -> list[list[int]]:
    """Batches of clips of one length, in ``order``'s order: a batch is complete when ``batch_size`` clips of its
    length have come up; incomplete ones at the end of the order are dropped. Why: latents of different lengths
    cannot share a batch tensor, and padding would train on frames that do not exist. With a single length this is
    plain chunking of ``order``."""
    pending: dict[int, list[int]] = {}
    out = []
    for i in order:
        bucket = pending.setdefault(lengths[i], [])
        bucket.append(i)
        if len(bucket) == batch_size:
            out.append(bucket)
            pending[lengths[i]] = []
    return out


def iterate_forever(dataset: CachedClips, batch_size: int, seed: int, start_epoch: int = 0,
                    start_position: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """Deterministic shuffled batches of equal-length clips: (epoch, position after this batch, indices), the
    position counting ``batch_size`` per batch. Resuming at a saved (epoch, position) continues the exact same
    order."""
    epoch, position = start_epoch, start_position
    n = len(dataset)
    lengths = [int(e["num_frames"]) for e in dataset.entries]
    if not length_batches(lengths, list(range(n)), batch_size):
        raise ActAvatarError(f"No {batch_size} clips of the dataset share a length, so no batch can be made.",
                             "Lower batch_size, or add clips of the same length (batches hold clips of one length).")
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        batches = length_batches(lengths, order, batch_size)
        for batch in batches[position // batch_size:]:
            position += batch_size
            yield epoch, position, batch
        epoch, position = epoch + 1, 0
