"""Re-make the README's two pictures: a strip of frames from `actavatar demo`, and the timeline in a real ComfyUI.

    .venv/bin/python docs/images/make_images.py            # both pictures
    .venv/bin/python docs/images/make_images.py --only demo
    COMFYUI_DIR=/tmp/comfy-copy .venv/bin/python docs/images/make_images.py --only timeline

The demo strip runs the `actavatar demo` command exactly as a user does (embedded mini model, CPU, its shipped
defaults) and cuts the frames at the bundled phase script's times, so the picture shows what the command makes.
The timeline picture starts ComfyUI on the CPU (through `tests/comfy_server.py`, from a temporary base directory, so
`COMFYUI_DIR` is never written to), loads `workflows/actavatar_timeline.json` in headless Chromium and photographs the
Phase Prompt node. It needs `COMFYUI_DIR` (a copy of ComfyUI), Chromium (`CHROMIUM` or /usr/bin/chromium) and the
playwright package; it makes no network request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's packages (actavatar_lab for scoring), not another installed copy
OUT_DIR = Path(__file__).resolve().parent
DEMO_DIR = ROOT / "actavatar_core" / "assets" / "demo"
WORKFLOW = ROOT / "workflows" / "actavatar_timeline.json"
PHASE_NODE_CLASS = "ActAvatarPhasePrompt"
#: Frame times of the strip (seconds): the start, inside phase 1, the gap, inside phase 2, near the end.
STRIP_TIMES = (0.0, 0.9, 1.5, 2.2, 2.7)
SCALE = 2  # the mini model makes 128x128 frames; show them at 256x256 (nearest neighbour, no smoothing)


def _phase_label(script: dict, t: float) -> str:
    for p in script["phases"]:
        if p["start"] <= t < p["end"]:
            return p["text"]
    return "(no phase: talks)"


def _print_score(frames: list, fps: float, script: dict) -> None:
    """Score the demo clip with the research harness's detectors (when installed): are the actions in their windows?"""
    try:
        import numpy as np
        from actavatar_core.audio import load_waveform
        from actavatar_lab.synth.metrics import evaluate_clip
    except ImportError as exc:
        print(f"not scored ({exc})")
        return
    wave = load_waveform(str(DEMO_DIR / "speech.wav"))
    annotation = {"fps": fps, "phases": script["phases"]}
    score = evaluate_clip(np.stack(frames), wave.samples.numpy(), wave.sample_rate, annotation)
    print(f"detectors: H@S {score['hit_at_segment']:.2f}, tIoU {score['tiou']:.2f}, "
          f"mouth-audio r {score.get('lipsync_corr', float('nan')):.2f}")


def make_demo_strip(out: Path) -> Path:
    """Run `actavatar demo` and save frames at STRIP_TIMES, each labelled with its time and active phase."""
    import av
    import numpy as np
    from PIL import Image, ImageDraw

    script = json.loads((DEMO_DIR / "phases.json").read_text(encoding="utf-8"))
    exe = ROOT / ".venv" / "bin" / "actavatar"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "actavatar_core.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = Path(tmp) / "actavatar_demo.mp4"
        subprocess.run([*cmd, "demo", "--out", str(mp4)], check=True, cwd=ROOT)
        with av.open(str(mp4)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    _print_score(frames, fps, script)
    picks = [min(round(t * fps), len(frames) - 1) for t in STRIP_TIMES]
    h, w = frames[0].shape[:2]
    tile_w, tile_h, label_h, pad = w * SCALE, h * SCALE, 34, 6
    canvas = Image.new("RGB", (len(picks) * (tile_w + pad) + pad, tile_h + label_h + 2 * pad), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(picks):
        tile = Image.fromarray(np.ascontiguousarray(frames[i])).resize((tile_w, tile_h), Image.NEAREST)
        x = pad + k * (tile_w + pad)
        canvas.paste(tile, (x, pad))
        t = i / fps
        draw.text((x + 2, pad + tile_h + 3), f"{t:.2f} s", fill=(235, 235, 235))
        draw.text((x + 2, pad + tile_h + 17), _phase_label(script, t), fill=(250, 200, 90))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    print(f"wrote {out} (frames {picks} of {len(frames)} at {fps:g} fps)")
    return out


def make_timeline_shot(out: Path, comfy_dir: Path, pack: Path = ROOT) -> Path:
    """Photograph the Phase Prompt node of the shipped workflow in a real ComfyUI, in headless Chromium.

    ``pack`` is the ComfyUI-ActAvatar folder linked into ComfyUI (this checkout by default; a clean export such as
    ``git archive HEAD`` unpacked elsewhere keeps uncommitted edits out of the picture).
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_server import running_comfy
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    workflow = json.loads((pack / WORKFLOW.relative_to(ROOT)).read_text(encoding="utf-8"))
    node = next(n for n in workflow["nodes"] if n["type"] == PHASE_NODE_CLASS)
    inputs = {"actavatar_demo_reference.png": DEMO_DIR / "reference.png",
              "actavatar_demo_speech.wav": DEMO_DIR / "speech.wav"}
    with running_comfy(comfy_dir, custom_nodes={"ComfyUI-ActAvatar": pack}, input_files=inputs,
                       settings={"Comfy.ColorPalette": "dark"}) as comfy, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1).new_page()
            page.goto(comfy.url)
            page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120000)
            page.wait_for_function(f"!!LiteGraph.registered_node_types['{PHASE_NODE_CLASS}']", timeout=60000)
            page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
            # Put the Phase Prompt node clear of the side bar and the top menu, at zoom 1; the clip below is the node.
            page.evaluate("""(id) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
                                ds.scale = 1; ds.offset[0] = 320 - n.pos[0]; ds.offset[1] = 220 - n.pos[1];
                                app.graph.setDirtyCanvas(true, true); }""", node["id"])
            tl = page.locator(f'.aa-tl[data-node-id="{node["id"]}"]')
            tl.wait_for(state="visible", timeout=30000)
            # The waveform of the connected LoadAudio file sets the clip length; wait until it is drawn.
            tl.locator(".aa-clip").filter(has_text="audio").wait_for(timeout=60000)
            page.wait_for_timeout(1500)
            box = page.evaluate("""(id) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
                                     const r = app.canvas.canvas.getBoundingClientRect();
                                     const th = LiteGraph.NODE_TITLE_HEIGHT;
                                     return {x: r.left + (n.pos[0] + ds.offset[0]) * ds.scale,
                                             y: r.top + (n.pos[1] - th + ds.offset[1]) * ds.scale,
                                             w: n.size[0] * ds.scale, h: (n.size[1] + th) * ds.scale}; }""",
                                node["id"])
            margin = 12
            clip = {"x": max(box["x"] - margin, 0), "y": max(box["y"] - margin, 0),
                    "width": box["w"] + 2 * margin, "height": box["h"] + 2 * margin}
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), clip=clip)
        finally:
            browser.close()
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("demo", "timeline"), help="make one picture only")
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"),
                        help="a copy of ComfyUI (default: $COMFYUI_DIR)")
    parser.add_argument("--pack", type=Path, default=ROOT,
                        help="the pack folder to load into ComfyUI (default: this checkout)")
    args = parser.parse_args(argv)
    if args.only in (None, "demo"):
        make_demo_strip(OUT_DIR / "demo_strip.png")
    if args.only in (None, "timeline"):
        if not args.comfyui_dir:
            parser.error("the timeline picture needs a ComfyUI copy: --comfyui-dir or COMFYUI_DIR")
        make_timeline_shot(OUT_DIR / "timeline.png", Path(args.comfyui_dir), args.pack.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
