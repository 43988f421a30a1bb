"""``actavatar bench``: ``paca`` measures the cost of each PACA mode against plain cross-attention; ``timestep`` the
time conditioning per latent frame against Wan2.2 TI2V's per token; ``method`` runs the mini-scale ablation on the
held-out synthetic test set (``actavatar_lab.evaluation``, the research harness)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable


def _linux_rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _pin_malloc() -> None:
    """Make glibc return freed tensor memory to the OS at once (fixed mmap threshold), so resident-set peaks
    measure what one call really needs instead of what an earlier call left in the heap."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def peak_memory(fn: Callable[[], Any], device: Any) -> int:
    """Peak bytes ``fn`` needs above what was allocated before it: CUDA's allocator statistics on GPUs; on the
    CPU (Linux), the rise of the resident-set high-water mark, reset just before the call."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _pin_malloc()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _linux_rss_kb("VmRSS")
    fn()
    return (_linux_rss_kb("VmHWM") - before) * 1024


def _timed(fn: Callable[[], Any], device: Any) -> float:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_paca(frames: int = 16, tokens_per_frame: int = 220, heads: int = 24, head_dim: int = 128, text_len: int = 512,
               prompt_tokens: int = 60, phases: int = 2, repeats: int = 5, device: str = "cpu", dtype: str = "fp32",
               seed: int = 0) -> dict[str, Any]:
    """Time and peak memory of one text cross-attention layer of the 5B model's width per mode, as ratios to
    diffusers' plain ``WanAttnProcessor`` measured in the same run (modes interleaved, median of ``repeats``). The
    phase-embedded context is made once, as the model makes it once per forward for all its layers; its time is
    reported beside the rows."""
    import torch
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    from .attention import PACAProcessor, RelayRouting, token_frame_index
    from .phases import PhaseScript
    from .sampling import build_routing

    torch.manual_seed(seed)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dim = heads * head_dim
    attn = WanAttention(dim=dim, heads=heads, dim_head=head_dim, eps=1e-6, cross_attention_dim_head=head_dim)
    attn = attn.to(device, torch_dtype).eval()
    x = torch.randn(1, frames * tokens_per_frame, dim, device=device, dtype=torch_dtype)
    ctx = torch.randn(1, text_len, dim, device=device, dtype=torch_dtype)
    ids = torch.zeros(1, text_len, dtype=torch.long, device=device)
    per = prompt_tokens // (phases + 1)
    for k in range(1, phases + 1):
        ids[0, k * per:(k + 1) * per] = k
    fps = 25.0
    duration = (4 * (frames - 1) + 1) / fps
    step = duration / phases
    script = PhaseScript.parse({"base": "b", "phases": [{"start": k * step, "end": (k + 1) * step, "text": "t"} for k in range(phases)]})
    embedding = torch.nn.Embedding(phases + 1, dim).to(device, torch_dtype)
    tf = token_frame_index(frames, tokens_per_frame, device)
    plain, paca = WanAttnProcessor(), PACAProcessor()
    hard = build_routing(script, ids, frames, fps, 0.0)
    soft = build_routing(script, ids, frames, fps, 2.0)
    relay = RelayRouting(hard, 2.0)  # its (frames x tokens) table is cached on the routing, as the model reuses it
    with torch.no_grad():  # the model adds the phase embedding to the context once per forward, not per layer
        phased = ctx + embedding(ids)
    modes: dict[str, Callable[[], Any]] = {
        "plain cross-attention": lambda: plain(attn, x, ctx),
        "global": lambda: paca(attn, x, ctx),
        "learned": lambda: paca(attn, x, phased),
        "routed": lambda: paca(attn, x, phased, routing=hard, token_frame=tf),
        "routed feather=2": lambda: paca(attn, x, phased, routing=soft, token_frame=tf),
        "relay width=2": lambda: paca(attn, x, phased, routing=relay, token_frame=tf),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        for fn in modes.values():
            fn()  # warm-up
        memory = {name: statistics.median(peak_memory(fn, device) for _ in range(3)) for name, fn in modes.items()}
        for _ in range(repeats):
            for name, fn in modes.items():
                times[name].append(_timed(fn, device))
    rows = _rows(times, memory, "plain cross-attention")
    with torch.no_grad():
        embed_ms = statistics.median(_timed(lambda: ctx + embedding(ids), device) for _ in range(repeats)) * 1000
    routed = [r for r in rows if r["mode"] == "routed"]
    relayed = [r for r in rows if r["mode"].startswith("relay")]
    return {"shape": {"video_tokens": frames * tokens_per_frame, "latent_frames": frames, "tokens_per_frame": tokens_per_frame,
                      "dim": dim, "heads": heads, "text_len": text_len, "phases": phases, "dtype": dtype, "device": str(device),
                      "runs": len(hard.runs(tf))},
            "rows": rows, "phase_embedding_once_per_forward_ms": embed_ms,
            "target": "routed within 1.05x of plain cross-attention in time and memory",
            "met": None if any(r["memory_ratio"] is None for r in routed)
            else all(r["time_ratio"] <= 1.05 and r["memory_ratio"] <= 1.05 for r in routed),
            "relay_target": "relay within 1.15x of plain cross-attention in time and 1.10x in memory",
            "relay_met": None if any(r["memory_ratio"] is None for r in relayed)
            else all(r["time_ratio"] <= 1.15 and r["memory_ratio"] <= 1.10 for r in relayed)}


def _rows(times: dict[str, list[float]], memory: dict[str, float], base: str) -> list[dict[str, Any]]:
    """Median time and peak memory per mode, as ratios to ``base``. Tiny shapes may not raise the resident-set peak
    at all; their memory ratio is None (not measurable) rather than a division by zero."""
    base_t = statistics.median(times[base])
    return [{"mode": name, "time_ms": statistics.median(ts) * 1000, "time_ratio": statistics.median(ts) / base_t,
             "peak_mb": memory[name] / 2**20, "memory_ratio": memory[name] / memory[base] if memory[base] else None}
            for name, ts in times.items()]


def _row_line(r: dict[str, Any], width: int) -> str:
    ratio = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
    return f"{r['mode']:<{width}}{r['time_ms']:>10.1f}{r['time_ratio']:>9.3f}{r['peak_mb']:>10.1f}{ratio:>9}"


def format_rows(rows: list[dict[str, Any]], width: int, against: str = "plain") -> list[str]:
    """The time and memory table every bench prints (header, then one line per mode), so their reports line up."""
    return ([f"{'mode':<{width}}{'time ms':>10}{'x ' + against:>9}{'peak MB':>10}{'x ' + against:>9}"]
            + [_row_line(r, width) for r in rows])


def target_line(target: str, met: bool | None) -> str:
    """One target's verdict; ``None`` where the memory is too small to measure."""
    verdict = {True: "MET", False: "NOT MET", None: "memory not measurable at this size"}[met]
    return f"target: {target}: {verdict}"


def format_paca(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"PACA cost, one text cross-attention layer: {s['video_tokens']} video tokens ({s['latent_frames']} latent frames x "
             f"{s['tokens_per_frame']}), {s['text_len']} text tokens, dim {s['dim']} ({s['heads']} heads), {s['phases']} phases, "
             f"{s['dtype']} on {s['device']}"]
    lines += format_rows(result["rows"], 24)
    lines.append(f"(learned and routed also add the phase embedding to the context once per forward: "
                 f"{result['phase_embedding_once_per_forward_ms']:.2f} ms, outside the rows)")
    lines.append(target_line(result["target"], result["met"]))
    if "relay_met" in result:
        lines.append(target_line(result["relay_target"], result["relay_met"]))
    return "\n".join(lines)


def bench_timestep(frames: int = 16, tokens_per_frame: int = 220, dim: int = 3072, freq_dim: int = 256,
                   blocks: int = 30, repeats: int = 3, device: str = "cpu", dtype: str = "fp32",
                   seed: int = 0) -> dict[str, Any]:
    """Time and peak memory of a forward's time conditioning (the time embedding and projection, then every block's
    shift/scale/gate modulation around its attention and FFN, which are left out since both ways share them), at
    the 5B model's width: Wan2.2 TI2V's per-token timesteps as diffusers computes them, against ActAvatar's per
    latent frame (:func:`~actavatar_core.model.frame_timesteps`). Same inputs, same results; modes interleaved."""
    import torch
    from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding

    from .model import block_modulation, frame_timesteps, gated_add, modulate

    torch.manual_seed(seed)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    embedder = WanTimeTextImageEmbedding(dim, freq_dim, 6 * dim, text_embed_dim=16).to(device, torch_dtype).eval()
    embedder.time_embedder.float()  # as in the model, which keeps the sinusoid's MLP in fp32 (_keep_in_fp32_modules)
    tables = [torch.randn(1, 6, dim, device=device) / dim**0.5 for _ in range(blocks)]
    seq = frames * tokens_per_frame
    x = torch.randn(1, seq, dim, device=device, dtype=torch_dtype)
    text = torch.zeros(1, 1, 16, device=device, dtype=torch_dtype)
    timestep = torch.full((1, seq), 700.0, device=device)
    timestep[:, :tokens_per_frame] = 0.0  # the clean reference frame, as TI2V sampling builds it

    def conditioning(per_frame: bool) -> torch.Tensor:
        steps = frame_timesteps(timestep, 1, frames, tokens_per_frame) if per_frame else timestep
        _, proj, _, _ = embedder(steps.flatten(), text, None, timestep_seq_len=steps.shape[1])
        proj = proj.unflatten(2, (6, -1))
        proj = proj.unsqueeze(2) if per_frame else proj
        out = x
        for table in tables:
            (shift, scale, gate, c_shift, c_scale, c_gate), f = block_modulation(table, proj)
            h = gated_add(x.float(), modulate(x.float(), scale, shift, f), gate, f)
            out = gated_add(h, modulate(h, c_scale, c_shift, f), c_gate, f).type_as(x)
        return out

    modes: dict[str, Callable[[], Any]] = {"per token (diffusers Wan2.2 TI2V)": lambda: conditioning(False),
                                           "per latent frame (ActAvatar)": lambda: conditioning(True)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        outputs = [fn() for fn in modes.values()]  # warm-up, and the check that both ways agree
        max_diff = float((outputs[0].float() - outputs[1].float()).abs().max())
        del outputs
        memory = {name: statistics.median(peak_memory(fn, device) for _ in range(3)) for name, fn in modes.items()}
        for _ in range(repeats):
            for name, fn in modes.items():
                times[name].append(_timed(fn, device))
    rows = _rows(times, memory, "per token (diffusers Wan2.2 TI2V)")
    full_tokens = 31 * 880  # 121 frames at 704x1280, the 5B model's own size
    return {"shape": {"video_tokens": seq, "latent_frames": frames, "tokens_per_frame": tokens_per_frame, "dim": dim,
                      "blocks": blocks, "dtype": dtype, "device": str(device)},
            "rows": rows, "max_abs_difference": max_diff,
            "per_token_projection_mb_at_704x1280x121": full_tokens * 6 * dim * 4 / 2**20}


def format_timestep(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"Time conditioning of one forward: {s['video_tokens']} video tokens ({s['latent_frames']} latent frames x "
             f"{s['tokens_per_frame']}), dim {s['dim']}, {s['blocks']} blocks' modulation, {s['dtype']} on {s['device']}"]
    lines += format_rows(result["rows"], 36, against="token")
    lines.append(f"largest difference between the two: {result['max_abs_difference']:.2e}")
    lines.append(f"per-token time projection alone at 704x1280, 121 frames (fp32): "
                 f"{result['per_token_projection_mb_at_704x1280x121']:.0f} MB per sample")
    return "\n".join(lines)


def _parser(name: str, repeats: int) -> argparse.ArgumentParser:
    """The options every layer benchmark shares: the video shape, repeats, device, dtype and a JSON copy."""
    p = argparse.ArgumentParser(prog=f"actavatar bench {name}")
    p.add_argument("--frames", type=int, default=16, help="latent frames (5B at 121 frames: 31)")
    p.add_argument("--tokens-per-frame", type=int, default=220, help="tokens per latent frame (5B at 704x1280: 880)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def main(argv: list[str]) -> int:
    rest = argv[1:]
    if not rest or rest[0] not in ("paca", "timestep", "method", "clip", "native"):
        print("usage: actavatar bench paca [options] | actavatar bench timestep [options] | actavatar bench method [options]"
              " | actavatar bench clip [options] | actavatar bench native [options]", file=sys.stderr)
        return 2
    if rest[0] == "clip":  # one clip end to end at the 5B shape, per stage (its own module: it builds whole models)
        from .bench_clip import main as clip_main

        return clip_main(rest[1:])
    if rest[0] == "method":
        from .cli import run_module

        return run_module("actavatar_lab.evaluation", rest, "bench method")
    if rest[0] == "native":  # Phase Control on ComfyUI's own Wan model: the harness imports ComfyUI, the engine never
        from .cli import run_module

        return run_module("actavatar_lab.bench_native", rest, "bench native")
    if rest[0] == "timestep":
        p = _parser("timestep", repeats=3)
        p.add_argument("--dim", type=int, default=3072)
        p.add_argument("--blocks", type=int, default=30)
        args = p.parse_args(rest[1:])
        result = bench_timestep(args.frames, args.tokens_per_frame, args.dim, blocks=args.blocks, repeats=args.repeats,
                                device=args.device, dtype=args.dtype)
        text = format_timestep(result)
    else:
        p = _parser("paca", repeats=5)
        p.add_argument("--heads", type=int, default=24)
        p.add_argument("--head-dim", type=int, default=128)
        p.add_argument("--phases", type=int, default=2)
        args = p.parse_args(rest[1:])
        result = bench_paca(args.frames, args.tokens_per_frame, args.heads, args.head_dim, phases=args.phases,
                            repeats=args.repeats, device=args.device, dtype=args.dtype)
        text = format_paca(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
