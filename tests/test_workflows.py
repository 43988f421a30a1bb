"""The shared workflows: UI files are well-formed graphs, agree with their API twins, and use valid values.

The UI -> API conversion here is written independently of workflows/build_workflows.py (from the node definitions:
widget inputs in order, a control_after_generate value after a seed, UI-only widgets of the core loaders).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nodes import NODES

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = ["actavatar_timeline", "actavatar_core_video"]

#: Core nodes (ComfyUI v0.8.0): widget names in widgets_values order (None: a UI-only widget), output types.
CORE = {
    "LoadImage": (["image", None], ["IMAGE", "MASK"]),
    "LoadAudio": (["audio", None, None], ["AUDIO"]),
    "CreateVideo": (["fps"], ["VIDEO"]),
    "SaveVideo": (["filename_prefix", "format", "codec"], []),
}


def widget_names(node_type: str) -> list[str | None]:
    if node_type in CORE:
        return CORE[node_type][0]
    out: list[str | None] = []
    types = NODES[node_type][0].INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out.append(name)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    out.append(None)
    return out


def output_types(node_type: str) -> list[str]:
    return CORE[node_type][1] if node_type in CORE else list(NODES[node_type][0].RETURN_TYPES)


def ui_to_api(ui: dict[str, Any]) -> dict[str, Any]:
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, Any] = {}
    for node in ui["nodes"]:
        inputs: dict[str, Any] = {}
        names = widget_names(node["type"])
        assert len(node["widgets_values"]) == len(names), node["type"]
        for name, value in zip(names, node["widgets_values"]):
            if name is not None:
                inputs[name] = value
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load(name: str) -> tuple[dict, dict]:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    return ui, api


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_versions_agree(name):
    ui, api = load(name)
    converted = ui_to_api(ui)
    assert {k: v["class_type"] for k, v in converted.items()} == {k: v["class_type"] for k, v in api.items()}
    for node_id, node in api.items():
        assert converted[node_id]["inputs"] == node["inputs"], node["class_type"]


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_is_well_formed(name):
    ui, _ = load(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert len({link[0] for link in ui["links"]}) == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == kind and link_id in out["links"], (name, link_id)
        assert inp["link"] == link_id and inp["type"] in (kind, "*"), (name, link_id)
        assert output_types(nodes[src]["type"])[src_slot] == kind
    for node in ui["nodes"]:
        assert [o["type"] for o in node["outputs"]] == output_types(node["type"])
        for slot in node["inputs"]:
            if "widget" in slot:
                assert slot["widget"]["name"] in widget_names(node["type"]) and slot["link"] is not None
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(nodes)))
    for _, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"]


def test_only_ui_workflows_sit_in_the_template_folder():
    """ComfyUI's template browser globs custom_nodes/*/workflows/*.json: every file there must be a UI workflow."""
    for path in WORKFLOWS.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert {"nodes", "links", "version"} <= set(data), path.name
    for path in (WORKFLOWS / "api").glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert all("class_type" in node for node in data.values()), path.name
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)


def test_committed_files_are_what_the_builder_writes():
    """Edit workflows/build_workflows.py, not the JSON: this fails when they drift apart (e.g. a new widget)."""
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    sys.modules["build_workflows"] = builder  # dataclasses look their module up
    spec.loader.exec_module(builder)
    for name, (ui, api) in builder.build().items():
        assert load(name) == (ui, api), f"run: python workflows/build_workflows.py ({name})"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_values_are_valid(name):
    from nodes.model_folders import MINI_FILES

    _, api = load(name)
    for node in api.values():
        cls_entry = NODES.get(node["class_type"])
        if cls_entry is None:
            continue
        cls = cls_entry[0]
        types = cls.INPUT_TYPES()
        spec = {**types.get("required", {}), **types.get("optional", {})}
        for key, value in node["inputs"].items():
            assert key in spec, (node["class_type"], key)
            kind = spec[key][0]
            if isinstance(kind, list) and not isinstance(value, list):
                if key.endswith("_name") or key == "actavatar_weights":
                    assert value in MINI_FILES.values()  # the bundled mini model's files
                else:
                    assert value in kind, (key, value)
        if hasattr(cls, "VALIDATE_INPUTS"):
            args = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
            wanted = inspect.signature(cls.VALIDATE_INPUTS).parameters
            assert cls.VALIDATE_INPUTS(**{k: v for k, v in args.items() if k in wanted}) is True


def test_demo_script_fits_the_demo_speech(tmp_path):
    """The shipped workflows' phases lie inside the example speech the pack puts into ComfyUI's input folder."""
    from actavatar_core import comfy_glue as glue
    from actavatar_core.audio import load_waveform

    _, api = load("actavatar_timeline")
    script = api["7"]["inputs"]["phase_script"]
    glue.write_demo_inputs(tmp_path, api["5"]["inputs"]["image"], api["6"]["inputs"]["audio"])
    wave = load_waveform(str(tmp_path / api["6"]["inputs"]["audio"]))
    audio = {"waveform": wave.samples[None, None], "sample_rate": wave.sample_rate}
    prompt = glue.make_phase_prompt(script, 0.0, api["7"]["inputs"]["fps"], audio)
    assert len(prompt.script.phases) == 2


@pytest.mark.parametrize("name", NAMES)
def test_sampler_uses_the_bundled_model_defaults(name):
    """A shipped workflow loaded as-is samples with the mini model's tuned settings (as `actavatar demo` does)."""
    defaults = json.loads((ROOT / "actavatar_core" / "weights" / "mini" / "actavatar_model.json").read_text())["info"]["defaults"]
    _, api = load(name)
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "ActAvatarSampler")
    for key in ("width", "height", "steps", "text_cfg", "audio_cfg", "phase_cfg", "shift", "paca_mode"):
        assert sampler[key] == defaults[key], key
