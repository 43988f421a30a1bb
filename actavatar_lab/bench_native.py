"""``actavatar bench native``: the cost of ActAvatar Phase Control on ComfyUI's own Wan model.

One sampling step through core's sampler (``comfy.sample.sample``: conditional and unconditional passes, CFG) of a
Wan2.2 TI2V-shaped model with random weights built from ComfyUI's ``WanModel`` (at a reduced shape on the CPU), plain
and patched by the pack's Phase Control node in each mode, in the same run (modes interleaved, median of
``repeats``). Only the conditional pass is routed, as in real use. It needs a ComfyUI checkout (``--comfyui`` or
``COMFYUI_DIR``); it is a harness, so it lives beside the engine, which never imports ComfyUI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from actavatar_core.bench import _rows, _timed, format_rows, peak_memory, target_line

ROOT = Path(__file__).resolve().parents[1]
TIME_TARGET, MEMORY_TARGET, RELAY_TARGET = 1.05, 1.02, 1.15


def import_comfy(comfy_dir: str, device: str) -> Any:
    """ComfyUI's modules from ``comfy_dir`` (CPU mode unless the device is a GPU) and the pack's node module."""
    if not (Path(comfy_dir) / "comfy" / "ldm" / "wan" / "model.py").is_file():
        raise SystemExit(f"actavatar bench native: {comfy_dir!r} is not a ComfyUI checkout. Fix: pass --comfyui "
                         "/path/to/ComfyUI (0.33.0 or newer) or set COMFYUI_DIR.")
    argv, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if device == "cpu" else [])
    if comfy_dir not in sys.path:
        sys.path.append(comfy_dir)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        comfy.cli_args.args.cpu = device == "cpu"
        import comfy.model_management  # noqa: F401 - the device choice before anything touches devices
        import comfy.ops
        import comfy.sample
        import comfy.sd
        from comfy.ldm.wan.model import WanModel
    finally:
        sys.argv = argv
    spec = importlib.util.spec_from_file_location("actavatar_native_phase_nodes", ROOT / "nodes" / "native_phase.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    return node, comfy, WanModel


def bench_native(comfy_dir: str, frames: int = 8, height: int = 16, width: int = 16, dim: int = 512, layers: int = 4,
                 ffn_dim: int = 1024, phases: int = 2, repeats: int = 3, device: str = "cpu", seed: int = 0
                 ) -> dict[str, Any]:
    """Step time and peak memory of the plain and the patched model (``frames`` latent frames of ``height`` x
    ``width`` latent pixels, 48 channels as TI2V's; ``dim`` wide with heads of 128, ``layers`` blocks)."""
    import torch

    from actavatar_core import native_phase as N
    from actavatar_core.phases import PhaseScript

    node, comfy, WanModel = import_comfy(comfy_dir, device)
    torch.manual_seed(seed)
    net = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=48, dim=dim, ffn_dim=ffn_dim, freq_dim=256,
                   text_dim=4096, out_dim=48, num_heads=dim // 128, num_layers=layers,
                   operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    sd = {"model.diffusion_model." + k: torch.randn(v.shape) / max(1.0, v.shape[-1] ** 0.5)
          for k, v in net.state_dict().items()}
    del net
    plain = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    del sd
    fps = 16.0
    duration = (4 * (frames - 1) + 1) / fps
    step = duration / phases
    script = PhaseScript.parse({"base": "b", "phases": [{"start": round(k * step, 3), "end": round((k + 1) * step, 3),
                                                         "text": "t"} for k in range(phases)]})
    ids = torch.zeros(512, dtype=torch.long)
    per = 60 // (phases + 1)
    for k in range(1, phases + 1):
        ids[k * per:(k + 1) * per] = k
    ctx, neg = torch.randn(1, 512, 4096), torch.randn(1, 512, 4096)
    ctx[:, 60:] = 0
    positive = [[ctx, {N.PHASE_SPANS_KEY: N.PhaseSpans(script, fps, ids)}]]
    negative = [[neg, {}]]
    noise = torch.randn(1, 48, frames, height, width)
    models = {"plain (unpatched)": plain,
              "routed": node.apply_phase_control(plain, "routed"),
              "feathered 2": node.apply_phase_control(plain, "feathered", 2.0),
              "relay width=2": node.apply_phase_control(plain, "relay", relay_width=2.0)}

    def stepper(m: Any) -> Callable[[], Any]:
        return lambda: comfy.sample.sample(m, noise, 1, 5.0, "euler", "simple", positive, negative,
                                           torch.zeros_like(noise), seed=0, disable_pbar=True)

    runs = {name: stepper(m) for name, m in models.items()}
    times: dict[str, list[float]] = {m: [] for m in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up (loads the model once)
        memory = {name: statistics.median(peak_memory(fn, device) for _ in range(2)) for name, fn in runs.items()}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(_timed(fn, device))
    rows = _rows(times, memory, "plain (unpatched)")
    by = {r["mode"]: r for r in rows}

    def met(row: dict[str, Any], t: float, mem: float | None) -> bool | None:
        if row["time_ratio"] > t:
            return False
        if mem is None:
            return True
        return None if row["memory_ratio"] is None else row["memory_ratio"] <= mem

    return {"shape": {"latent": [1, 48, frames, height, width], "video_tokens": frames * (height // 2) * (width // 2),
                      "dim": dim, "heads": dim // 128, "layers": layers, "text_len": 512, "phases": phases,
                      "device": device, "dtype": "fp32", "step": "one comfy.sample.sample step (cond + uncond, CFG 5)"},
            "rows": rows,
            "target": f"routed <= {TIME_TARGET}x time and <= {MEMORY_TARGET}x memory of the unpatched step",
            "met": met(by["routed"], TIME_TARGET, MEMORY_TARGET),
            "relay_target": f"relay within {RELAY_TARGET}x of the unpatched step's time",
            "relay_met": met(by["relay width=2"], RELAY_TARGET, None)}


def format_native(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"Phase Control on ComfyUI's WanModel, {s['step']}: latent {s['latent']} ({s['video_tokens']} video "
             f"tokens), dim {s['dim']} ({s['heads']} heads), {s['layers']} blocks, {s['text_len']} text tokens, "
             f"{s['phases']} phases, {s['dtype']} on {s['device']}"]
    lines += format_rows(result["rows"], 20)
    for key, target in (("met", "target"), ("relay_met", "relay_target")):
        lines.append(target_line(result[target], result[key]))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``actavatar bench native [options]`` (argv starts with ``native``)."""
    p = argparse.ArgumentParser(prog="actavatar bench native")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""),
                   help="ComfyUI checkout (default: COMFYUI_DIR)")
    p.add_argument("--frames", type=int, default=8, help="latent frames (5B at 121 frames: 31)")
    p.add_argument("--height", type=int, default=16, help="latent height (5B at 704: 44)")
    p.add_argument("--width", type=int, default=16, help="latent width (5B at 1280: 80)")
    p.add_argument("--dim", type=int, default=512, help="model width, heads of 128 (5B: 3072)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (5B: 30)")
    p.add_argument("--ffn-dim", type=int, default=1024, help="feed-forward width (5B: 14336)")
    p.add_argument("--phases", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv[1:] if argv and argv[0] == "native" else argv)
    if not args.comfyui:
        print("actavatar bench native: no ComfyUI to measure. Fix: pass --comfyui /path/to/ComfyUI (0.33.0 or newer) "
              "or set COMFYUI_DIR.", file=sys.stderr)
        return 2
    result = bench_native(args.comfyui, args.frames, args.height, args.width, args.dim, args.layers, args.ffn_dim,
                          args.phases, args.repeats, args.device)
    print(format_native(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
