"""Writes the shared workflows in both formats from one description of each graph.

    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python workflows/build_workflows.py   # rewrite workflows/*.json and api/

* UI format (``workflows/<name>.json``): what users drag into ComfyUI (and what ComfyUI's template browser lists);
  nodes with positional ``widgets_values`` in the order of the node's widget inputs (a seed is followed by its
  control_after_generate value), socket inputs (optional ones with ``shape: 7``) followed by linked widget inputs,
  and ``links`` as ``[id, from_node, from_slot, to_node, to_slot, type]``.
* API format (``workflows/api/<name>.json``): what ``POST /prompt`` takes.

Widget order of the ActAvatar nodes comes from their INPUT_TYPES; the few core nodes used are described below
(ComfyUI 0.33.0, the oldest version the pack is tested with). ``tests/test_workflows.py`` converts every UI file back
to the API format independently and checks that both agree; the integration tests compare both with what a real
ComfyUI and its frontend make of them.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PACK_ID = "actavatar"  # registry id ([project] name): lets ComfyUI-Manager offer the pack for missing nodes
PACK_VERSION = "0.1.0"
COMFYUI_VERSION = "0.33.0"  # the ComfyUI and frontend the workflows are saved for (pyproject's requires-comfyui)
FRONTEND_VERSION = "1.49.6"
DEMO_IMAGE = "actavatar_demo_reference.png"
DEMO_AUDIO = "actavatar_demo_speech.wav"
DEMO_SCRIPT = {
    "version": 1,
    "base": "A person with tan skin, a red shirt and long brown hair on a blue background talks",
    "negative": "",
    "phases": [{"start": 0.4, "end": 1.4, "text": "raises the left hand"},
               {"start": 1.6, "end": 2.8, "text": "waves the right hand"}],
}

MINI_MODEL_JSON = ROOT / "actavatar_core" / "weights" / "mini" / "actavatar_model.json"


def sampler_settings() -> dict[str, Any]:
    """Sampler widgets of the shipped workflows: the bundled mini model's tuned generation defaults (its model card
    says how they were chosen), so a workflow loaded as-is reproduces ``actavatar demo``."""
    d = json.loads(MINI_MODEL_JSON.read_text())["info"]["defaults"]
    return {"width": int(d["width"]), "height": int(d["height"]), "steps": int(d["steps"]),
            "text_cfg": float(d["text_cfg"]), "audio_cfg": float(d["audio_cfg"]), "shift": float(d["shift"]),
            "paca_mode": d.get("paca_mode", "learned"), "phase_cfg": float(d.get("phase_cfg", 0.0)),
            "relay_width": float(d.get("relay_width", 2.0)),
            "fps": float(d["fps"])}


#: Core nodes used by the workflows: (widget names in UI order, UI-only widget placeholders, socket inputs,
#: outputs). A ``None`` widget name is a UI-only widget (an upload button / audio player) with no API input.
CORE_NODES: dict[str, dict[str, Any]] = {
    "LoadImage": {"widgets": ["image", None], "ui_only": ["image"], "inputs": [],
                  "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "LoadAudio": {"widgets": ["audio", None, None], "ui_only": [None, None], "inputs": [],
                  "outputs": [("AUDIO", "AUDIO")]},
    "CreateVideo": {"widgets": ["fps", "bit_depth"], "ui_only": [], "inputs": [("images", "IMAGE", False), ("audio", "AUDIO", True)],
                    "outputs": [("VIDEO", "VIDEO")]},
    # format is a dynamic combo: the frontend adds its chosen option's inputs ("format.codec") as widgets after it
    # and sends them in the API prompt under those names; "codec" is the node's own (hidden) optional input.
    "SaveVideo": {"widgets": ["filename_prefix", "format", "format.codec", "codec"], "ui_only": [],
                  "inputs": [("video", "VIDEO", False)], "outputs": []},
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def node_spec(node_type: str) -> dict[str, Any]:
    """Widget order (with control_after_generate slots), socket inputs and outputs of a node type."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    from nodes import NODES

    cls = NODES[node_type][0]
    types = cls.INPUT_TYPES()
    widgets: list[str | None] = []
    ui_only: list[Any] = []
    inputs: list[tuple[str, str, bool]] = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append(name)
                if options.get("control_after_generate"):
                    widgets.append(None)
                    ui_only.append("fixed")
            else:
                inputs.append((name, kind, section == "optional"))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"widgets": widgets, "ui_only": ui_only, "inputs": inputs,
            "outputs": list(zip(names, cls.RETURN_TYPES))}


@dataclass
class Node:
    id: int
    type: str
    title: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (node id, output slot)


def to_api(nodes: list[Node]) -> dict[str, Any]:
    prompt: dict[str, Any] = {}
    for n in nodes:
        inputs: dict[str, Any] = {}
        for name in [w for w in node_spec(n.type)["widgets"] if w is not None]:
            if name in n.links:
                continue
            inputs[name] = n.widgets[name]
        for name, (src, slot) in n.links.items():
            inputs[name] = [str(src), slot]
        prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title}}
    return prompt


def to_ui(nodes: list[Node], name: str) -> dict[str, Any]:
    by_id = {n.id: n for n in nodes}
    links: list[list[Any]] = []
    ui_nodes: list[dict[str, Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_slots: dict[int, list[dict[str, Any]]] = {}
    for n in nodes:
        spec = node_spec(n.type)
        slots = []
        for input_name, kind, optional in spec["inputs"]:
            entry: dict[str, Any] = {"name": input_name}
            if optional:
                entry["shape"] = 7
            entry.update(type=kind, link=None)
            slots.append(entry)
        for widget in [w for w in spec["widgets"] if w is not None]:
            if widget in n.links:
                src = by_id[n.links[widget][0]]
                kind = node_spec(src.type)["outputs"][n.links[widget][1]][1]
                slots.append({"name": widget, "type": kind, "widget": {"name": widget}, "link": None})
        in_slots[n.id] = slots
    link_id = 0
    for n in nodes:  # links in node order, then input order
        for index, slot in enumerate(in_slots[n.id]):
            if slot["name"] not in n.links:
                continue
            src_id, src_slot = n.links[slot["name"]]
            link_id += 1
            kind = node_spec(by_id[src_id].type)["outputs"][src_slot][1]
            links.append([link_id, src_id, src_slot, n.id, index, kind])
            slot["link"] = link_id
            out_links.setdefault((src_id, src_slot), []).append(link_id)
    order = _execution_order(nodes)
    for n in nodes:
        spec = node_spec(n.type)
        values: list[Any] = []
        extras = iter(spec["ui_only"])
        for widget in spec["widgets"]:
            values.append(next(extras) if widget is None else n.widgets[widget])
        outputs = []
        for slot, (out_name, kind) in enumerate(spec["outputs"]):
            ids = out_links.get((n.id, slot))
            outputs.append({"name": out_name, "type": kind, "slot_index": slot, "links": ids or None})
        core = n.type in CORE_NODES
        ui_nodes.append({
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order[n.id],
            "mode": 0, "inputs": in_slots[n.id], "outputs": outputs, "title": n.title,
            "properties": {"cnr_id": "comfy-core" if core else PACK_ID, "ver": COMFYUI_VERSION if core else PACK_VERSION,
                           "Node name for S&R": n.type},
            "widgets_values": values,
        })
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"actavatar/{name}")), "revision": 0,
        "last_node_id": max(by_id), "last_link_id": link_id, "nodes": ui_nodes, "links": links, "groups": [],
        "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def _execution_order(nodes: list[Node]) -> dict[int, int]:
    done: dict[int, int] = {}
    pending = list(nodes)
    while pending:
        for n in pending:
            if all(src in done for src, _ in n.links.values()):
                done[n.id] = len(done)
                pending.remove(n)
                break
        else:
            raise ValueError("the graph has a cycle")
    return done


def base_graph() -> list[Node]:
    """Loaders, inputs, phase prompt, encoders, sampler and decode: shared by both workflows."""
    from nodes import NODES  # noqa: F401 - the node classes must import

    from nodes.model_folders import MINI_FILES

    script = json.dumps(DEMO_SCRIPT, ensure_ascii=False)
    d = sampler_settings()
    return [
        Node(1, "ActAvatarModelLoader", "ActAvatar Model Loader", (20, 40), (330, 130),
             {"model_name": MINI_FILES["diffusion_models"], "actavatar_weights": MINI_FILES["actavatar"],
              "precision": "auto", "device": "auto"}),
        Node(2, "ActAvatarTextEncoderLoader", "ActAvatar Text Encoder Loader", (20, 210), (330, 106),
             {"text_encoder_name": MINI_FILES["text_encoders"], "precision": "auto", "device": "auto"}),
        Node(3, "ActAvatarVAELoader", "ActAvatar VAE Loader", (20, 350), (330, 106),
             {"vae_name": MINI_FILES["vae"], "precision": "auto", "device": "auto"}),
        Node(4, "ActAvatarAudioEncoderLoader", "ActAvatar Audio Encoder Loader", (20, 490), (330, 106),
             {"audio_encoder_name": MINI_FILES["audio_encoders"], "precision": "auto", "device": "auto"}),
        Node(5, "LoadImage", "Reference image", (20, 640), (330, 330), {"image": DEMO_IMAGE}),
        Node(6, "LoadAudio", "Speech", (380, 640), (330, 140), {"audio": DEMO_AUDIO}),
        Node(7, "ActAvatarPhasePrompt", "ActAvatar Phase Prompt", (380, 40), (560, 420),
             {"phase_script": script, "duration": 0.0, "fps": d["fps"]}, {"audio": (6, 0)}),
        Node(8, "ActAvatarPhaseEncode", "ActAvatar Phase Encode", (980, 40), (330, 160),
             {"negative": ""}, {"text_encoder": (2, 0), "phase_prompt": (7, 0)}),
        Node(9, "ActAvatarAudioEncode", "ActAvatar Audio Encode", (980, 250), (330, 90),
             {}, {"audio": (6, 0), "audio_encoder": (4, 0)}),
        Node(10, "ActAvatarSampler", "ActAvatar Sampler", (1350, 40), (330, 500),
             {"width": d["width"], "height": d["height"], "frames": 0, "steps": d["steps"], "text_cfg": d["text_cfg"],
              "audio_cfg": d["audio_cfg"], "shift": d["shift"], "seed": 42, "sampler": "unipc",
              "paca_mode": d["paca_mode"], "feather": 0.0, "audio_schedule": "trained",
              "audio_gamma": 1.5, "phase_cfg": d["phase_cfg"], "relay_width": d["relay_width"]},
             {"model": (1, 0), "conditioning": (8, 0), "audio_embeds": (9, 0), "image": (5, 0), "vae": (3, 0)}),
        Node(11, "ActAvatarDecode", "ActAvatar Decode", (1720, 40), (300, 110),
             {"chunk_latent_frames": 4}, {"vae": (3, 0), "latent": (10, 0)}),
    ]


def timeline_graph() -> list[Node]:
    return base_graph() + [
        Node(12, "ActAvatarSaveVideo", "ActAvatar Save Video", (1720, 200), (420, 520),
             {"fps": 25.0, "filename_prefix": "ActAvatar/ActAvatar", "crf": 18},
             {"images": (11, 0), "audio": (10, 2), "fps": (10, 1)}),
    ]


def core_video_graph() -> list[Node]:
    return base_graph() + [
        Node(12, "CreateVideo", "Create Video", (1720, 200), (300, 100),
             {"fps": 25.0, "bit_depth": 8}, {"images": (11, 0), "audio": (10, 2), "fps": (10, 1)}),
        Node(13, "SaveVideo", "Save Video", (2060, 40), (420, 520),
             {"filename_prefix": "video/ActAvatar", "format": "auto", "format.codec": "auto", "codec": "auto"},
             {"video": (12, 0)}),
    ]


WORKFLOWS = {"actavatar_timeline": timeline_graph, "actavatar_core_video": core_video_graph}


def build() -> dict[str, tuple[dict, dict]]:
    """{name: (UI workflow, API prompt)}."""
    out = {}
    for name, graph in WORKFLOWS.items():
        nodes = graph()
        out[name] = (to_ui(nodes, name), to_api(nodes))
    return out


def build_outside_comfyui() -> dict[str, tuple[dict, dict]]:
    """build() from the command line: the nodes are built on ComfyUI's comfy_api (COMFYUI_DIR), and what a running
    server provides beside it comes from the test doubles (tests/comfy_doubles.py), as in tests/test_workflows.py."""
    import tempfile

    import pytest

    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_doubles import install

    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as scratch:
        doubles = install(patch)
        doubles.set_directory("output", Path(scratch) / "output")
        doubles.set_directory("models", Path(scratch) / "models")
        from nodes.model_folders import register_model_folders

        register_model_folders()
        return build()


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for name, (ui, api) in build_outside_comfyui().items():
        (HERE / f"{name}.json").write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(api, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
