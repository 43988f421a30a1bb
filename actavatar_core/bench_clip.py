"""``actavatar bench clip``: one clip end to end at the 5B shape with random weights, timed and measured per stage.

Why: what a user asks first is "how long for 5 seconds at 720p, and will it fit my card?". The bench answers with
nothing to download: the real classes (Wan2.2-TI2V-5B transformer with the ActAvatar adapter, the Wan2.2 VAE,
umT5-XXL, wav2vec2 large) built from the local configs with random weights on the chosen device, then the engine's
own stages in order: text encoding (the phase prompt and the negative), speech encoding, the reference latent,
sampling (text and audio guidance: 3 passes a step; phase guidance adds a 4th), the streamed VAE decode and the MP4.
Each stage reports its time and the device's peak memory (CUDA: the allocator's peak allocated and reserved bytes;
CPU: the process's resident-set high-water mark); sampling also reports every step's time. ``--memory-mode`` puts
the models in a :mod:`~actavatar_core.memory` mode first. ``--tiny`` (or a reduced ``--width --height --frames
--steps --layers``) runs the same path on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: The shapes of the two presets: the issue's 5 s 720p clip, and a CPU-sized one.
PRESETS = {
    "5b": {"width": 704, "height": 1280, "frames": 121, "steps": 40, "layers": 30},
    "tiny": {"width": 64, "height": 64, "frames": 9, "steps": 2, "layers": 3},
}
#: The issue's targets, for a 5 s 720p clip at 40 steps on an H100-class GPU.
TARGETS = {"fastest_mode_seconds": 180.0, "12gb_time_ratio": 1.3, "8gb_time_ratio": 2.0}


def _keep_fp32(model: torch.nn.Module) -> None:
    """What ``from_pretrained`` does for ``_keep_in_fp32_modules``: those layers stay in fp32 in a bf16 model."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()


def build_models(preset: str, *, device: Any, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    """Random-weight models of the real classes at ``preset``'s shape ("5b": the local configs of Wan2.2-TI2V-5B,
    its VAE, umT5-XXL and wav2vec2 large; "tiny": :mod:`~actavatar_core.tiny`), made directly on ``device`` in
    ``dtype``. ``layers`` overrides the transformer's block count. The tokenizer is the in-process word tokenizer
    (token ids, not words, are what the bench needs)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    from .bundle import ActAvatarModels
    from .loading import _public, local_config
    from .model import ActAvatarTransformer
    from .tiny import TINY_TRANSFORMER, TINY_UMT5, TINY_VAE, TINY_WAV2VEC2, tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    if preset == "5b":
        t_cfg = _public(local_config("wan22_ti2v_5b_transformer"))
        vae_cfg = _public(local_config("wan22_vae"))
        umt5_cfg = _public(local_config("umt5_xxl"))
        w2v_cfg = _public(local_config("wav2vec2_large"))
    elif preset == "tiny":
        t_cfg, vae_cfg = {**TINY_TRANSFORMER, "text_dim": TINY_UMT5["d_model"]}, dict(TINY_VAE)
        umt5_cfg, w2v_cfg = {**TINY_UMT5, "vocab_size": len(tokenizer)}, dict(TINY_WAV2VEC2)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    if layers is not None:
        t_cfg["num_layers"] = int(layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = WanTransformer3DModel(**t_cfg).eval()
            w2v = Wav2Vec2Config(**w2v_cfg)
            transformer = ActAvatarTransformer.from_base(base, audio_feature_dim=w2v.hidden_size,
                                                         audio_num_layers=w2v.num_hidden_layers + 1)
            del base
            vae = AutoencoderKLWan(**vae_cfg).eval()
            text_encoder = UMT5EncoderModel(UMT5Config(**umt5_cfg)).eval()
            audio_encoder = Wav2Vec2Model(w2v).eval()
    finally:
        torch.set_default_dtype(previous)
    for model in (transformer, text_encoder):
        _keep_fp32(model)
    return ActAvatarModels(transformer, vae, text_encoder, tokenizer, audio_encoder, {"do_normalize": True},
                           {"name": f"random weights, {preset} shape"})


def _synthetic_inputs(width: int, height: int, frames: int, fps: float, seed: int) -> tuple[Any, dict, str]:
    """A reference image, speech-like audio as long as the clip, and a two-phase script over it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    seconds = frames / fps
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.3 * np.clip(np.sin(2 * np.pi * 3.3 * t), 0, None) ** 2 * np.sin(2 * np.pi * 170 * t)).astype(np.float32)
    half = seconds / 2
    script = (f"A person talks to the camera | 0-{half:.3f}s: raises the left hand | "
              f"{half:.3f}-{seconds:.3f}s: waves the right hand")
    return image, {"waveform": torch.from_numpy(wave)[None, None], "sample_rate": 16000}, script


class _Meter:
    """Time and peak device memory of one stage."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the resident-set high-water mark
            except OSError:
                pass
        start = time.perf_counter()
        result = fn()
        self.sync()
        seconds = time.perf_counter() - start
        return result, {"seconds": seconds, **self.peak()}

    def peak(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_gb": torch.cuda.max_memory_allocated(self.device) / 2**30,
                    "peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 2**30}
        try:
            from .bench import _linux_rss_kb

            return {"peak_gb": _linux_rss_kb("VmHWM") / 2**20, "peak_kind": "process resident set (CPU)"}
        except OSError:
            return {"peak_gb": None}


def bench_clip(*, preset: str = "5b", width: int | None = None, height: int | None = None, frames: int | None = None,
               steps: int | None = None, layers: int | None = None, device: str = "auto", dtype: str = "auto",
               memory_mode: str = "full", phase_cfg: float = 0.0, paca_mode: str = "learned", fps: float = 25.0,
               seed: int = 0, out: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one clip through every stage and return the figures (see the module docstring)."""
    from .defaults import resolve_device
    from .memory import activation_bytes, apply_memory_mode, check_mode
    from .model import compute_dtype
    from .phases import PhaseScript
    from .pipeline import encode_speech, generate_clip_latents
    from .sampling import SamplingOptions
    from .text import DEFAULT_NEGATIVE, encode_plain, encode_script
    from .vae import check_size, decode_chunks, encode_reference, tensor_to_frames
    from .video import Mp4Writer, speech_track

    check_mode(memory_mode)
    shape = {**PRESETS[preset]}
    shape.update({k: v for k, v in dict(width=width, height=height, frames=frames, steps=steps, layers=layers).items()
                  if v is not None})
    check_size(shape["width"], shape["height"])
    dev, torch_dtype = resolve_device(device, dtype)
    dev = torch.device(dev)
    meter = _Meter(dev)
    options = SamplingOptions(steps=shape["steps"], text_cfg=5.0, audio_cfg=5.0, phase_cfg=phase_cfg,
                              paca_mode=paca_mode, seed=seed)
    options.check()
    stages: dict[str, dict[str, Any]] = {}

    def build():
        models = build_models(preset, device=dev, dtype=torch_dtype, layers=shape["layers"], seed=seed)
        acts = activation_bytes(models.transformer.config, models.vae.config, width=shape["width"],
                                height=shape["height"], frames=shape["frames"], itemsize=torch_dtype.itemsize)
        return models, apply_memory_mode(models, memory_mode, dev, activations=acts, log=log)

    (models, report), stages["build"] = meter.measure(build)
    image, audio, script_text = _synthetic_inputs(shape["width"], shape["height"], shape["frames"], fps, seed)
    script = PhaseScript.parse(script_text)
    cdtype = compute_dtype(models.transformer)

    def text():
        return (encode_script(models.text_encoder, models.tokenizer, script, dtype=cdtype),
                encode_plain(models.text_encoder, models.tokenizer, DEFAULT_NEGATIVE, dtype=cdtype))

    (prompt, negative), stages["text_encoding"] = meter.measure(text)
    speech, stages["speech_encoding"] = meter.measure(lambda: encode_speech(models.audio_encoder, audio))
    reference, stages["reference_encoding"] = meter.measure(
        lambda: encode_reference(models.vae, image, shape["width"], shape["height"]))

    marks: list[float] = []

    def on_step(info: Any) -> None:
        meter.sync()
        marks.append(time.perf_counter())

    def sampling():
        marks.append(time.perf_counter())
        return generate_clip_latents(models.transformer, prompt=prompt, negative=negative, speech=speech,
                                     reference_latent=reference, script=script, fps=fps, num_frames=shape["frames"],
                                     options=options, on_step=on_step)

    clip, stages["sampling"] = meter.measure(sampling)
    per_step = [b - a for a, b in zip(marks, marks[1:])]

    target = Path(out) if out else Path(tempfile.mkdtemp(prefix="actavatar-bench-")) / "bench_clip.mp4"
    split = {"vae_decode": 0.0, "mp4": 0.0}

    def decode_and_write():
        track, rate = speech_track(audio, clip.audio.waveform)
        with Mp4Writer(target, fps, shape["width"], shape["height"], audio=track, sample_rate=rate,
                       overwrite=True) as writer:
            chunks = decode_chunks(models.vae, clip.latents)
            while True:
                start = time.perf_counter()
                chunk = next(chunks, None)
                meter.sync()
                split["vae_decode"] += time.perf_counter() - start
                if chunk is None:
                    break
                start = time.perf_counter()
                writer.add(tensor_to_frames(chunk))
                split["mp4"] += time.perf_counter() - start
            start = time.perf_counter()
            path = writer.close()
            split["mp4"] += time.perf_counter() - start
        return path

    path, decode_stats = meter.measure(decode_and_write)
    stages["vae_decode"] = {**decode_stats, "seconds": split["vae_decode"]}
    stages["mp4"] = {"seconds": split["mp4"], "peak_gb": None, "note": "CPU work: its device peak is vae_decode's"}
    clip_stages = ("text_encoding", "speech_encoding", "reference_encoding", "sampling", "vae_decode", "mp4")
    passes = 1 + int(options.text_cfg != 1.0 or options.audio_cfg != 1.0) + int(options.audio_cfg != 1.0) \
        + int(options.phase_cfg > 0)
    peaks = [s["peak_gb"] for name, s in stages.items() if name in clip_stages and s.get("peak_gb") is not None]
    result = {
        "preset": preset, "shape": {**shape, "fps": fps, "passes_per_step": passes, "paca_mode": paca_mode,
                                    "phase_cfg": phase_cfg},
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(torch_dtype).removeprefix("torch."), "memory": report.to_json(), "stages": stages,
        "steps": {"count": len(per_step), "per_step_seconds": per_step,
                  "median_seconds": statistics.median(per_step) if per_step else None},
        "total_seconds": sum(stages[s]["seconds"] for s in clip_stages),
        "peak_gb": max(peaks) if peaks else None, "video": str(path),
        "targets": TARGETS if preset == "5b" else None,
    }
    if not out:
        Path(path).unlink(missing_ok=True)
        Path(path).parent.rmdir()
        result["video"] = None
    return result


def format_clip(r: dict[str, Any]) -> str:
    s = r["shape"]
    lines = [f"bench clip: {r['preset']} shape, {s['width']}x{s['height']}, {s['frames']} frames, {s['steps']} steps x "
             f"{s['passes_per_step']} passes, {s['layers']} blocks, {r['dtype']} on {r['device_name']} "
             f"(memory mode {r['memory']['mode']})",
             f"{'stage':<20}{'seconds':>10}{'peak GB':>10}"]
    for name, st in r["stages"].items():
        peak = "-" if st.get("peak_gb") is None else f"{st['peak_gb']:.2f}"
        lines.append(f"{name:<20}{st['seconds']:>10.2f}{peak:>10}")
    med = r["steps"]["median_seconds"]
    lines.append(f"time per step (median of {r['steps']['count']}): {med:.3f} s" if med is not None else "no steps")
    lines.append(f"total (text, speech, reference, sampling, decode, MP4): {r['total_seconds']:.1f} s; "
                 f"peak {r['peak_gb']:.2f} GB" if r["peak_gb"] is not None else f"total {r['total_seconds']:.1f} s")
    for fallback in r["memory"]["fallbacks"]:
        lines.append(f"fallback: {fallback}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``actavatar bench clip [options]``: prints the table, and the JSON with ``--json PATH``."""
    from .errors import ActAvatarError
    from .memory import MEMORY_MODES

    p = argparse.ArgumentParser(prog="actavatar bench clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and a 64x64, 9-frame, 2-step clip (CPU, seconds)")
    p.add_argument("--width", type=int, default=None, help="default 704 (tiny: 64)")
    p.add_argument("--height", type=int, default=None, help="default 1280 (tiny: 64)")
    p.add_argument("--frames", type=int, default=None, help="4k+1, default 121 (tiny: 9)")
    p.add_argument("--steps", type=int, default=None, help="default 40 (tiny: 2)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks, default 30 (tiny: 3)")
    p.add_argument("--memory-mode", choices=MEMORY_MODES, default="full")
    p.add_argument("--phase-cfg", type=float, default=0.0, help="phase guidance scale (>0 adds a 4th pass per step)")
    p.add_argument("--paca-mode", choices=["global", "learned", "routed", "relay"], default="learned")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the MP4 here (default: written to a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        result = bench_clip(preset="tiny" if args.tiny else "5b", width=args.width, height=args.height,
                            frames=args.frames, steps=args.steps, layers=args.layers, device=args.device,
                            dtype=args.dtype, memory_mode=args.memory_mode, phase_cfg=args.phase_cfg,
                            paca_mode=args.paca_mode, seed=args.seed, out=args.out)
    except ActAvatarError as exc:
        print(f"actavatar bench clip: {exc}", file=sys.stderr)
        return 2
    print(format_clip(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
