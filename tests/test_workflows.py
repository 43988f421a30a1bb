"""The shared workflows: UI files are well-formed graphs, agree with their API twins, and use valid values; and the
workflows saved before the nodes moved to ComfyUI's V3 schema (``tests/fixtures/workflows_pre_v3/``) still map onto
the V3 schemas: no missing node, every positional widget value lands on its input and passes ComfyUI's checks.

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

from comfy_doubles import comfy, require_comfy_api  # noqa: F401 - comfy is a fixture

require_comfy_api()

from nodes import NODES as NODE_ENTRIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
PRE_V3 = ROOT / "tests" / "fixtures" / "workflows_pre_v3"
NAMES = ["actavatar_timeline", "actavatar_core_video"]
#: node id -> V3 class (filled per test, once the ComfyUI doubles are in place)
NODES: dict[str, type] = {}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(autouse=True)
def _schemas(comfy, tmp_path):
    """The node schemas as a ComfyUI with the bundled mini model's folders lists them."""
    from nodes.model_folders import register_model_folders

    comfy.set_directory("output", tmp_path / "output")
    comfy.set_directory("models", tmp_path / "models")
    register_model_folders()
    NODES.clear()
    NODES.update({node_id: cls for node_id, (cls, _) in NODE_ENTRIES.items()})
    return comfy

#: Core nodes (ComfyUI 0.33): widget names in widgets_values order (None: a UI-only widget), output types.
CORE = {
    "LoadImage": (["image", None], ["IMAGE", "MASK"]),
    "LoadAudio": (["audio", None, None], ["AUDIO"]),
    "CreateVideo": (["fps", "bit_depth"], ["VIDEO"]),
    "SaveVideo": (["filename_prefix", "format", "format.codec", "codec"], []),  # format.codec: format's option input
}


def widget_names(node_type: str) -> list[str | None]:
    if node_type in CORE:
        return CORE[node_type][0]
    out: list[str | None] = []
    types = NODES[node_type].INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                out.append(name)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    out.append(None)
    return out


def output_types(node_type: str) -> list[str]:
    return CORE[node_type][1] if node_type in CORE else list(NODES[node_type].RETURN_TYPES)


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
    stems = {p.stem for p in WORKFLOWS.glob("*.json")}
    assert set(NAMES) <= stems and all(s.startswith("actavatar_native_") for s in stems - set(NAMES)), stems


def test_committed_files_are_what_the_builder_writes():
    """Edit workflows/build_workflows.py, not the JSON: this fails when they drift apart (e.g. a new widget)."""
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    sys.modules["build_workflows"] = builder  # dataclasses look their module up
    spec.loader.exec_module(builder)
    for name, (ui, api) in builder.build().items():
        assert load(name) == (ui, api), f"run: python workflows/build_workflows.py ({name})"


def core_validation_errors(node_type: str, inputs: dict[str, Any]) -> list[str]:
    """What ComfyUI 0.33's prompt validation (execution.validate_inputs) reports for one node's values: a missing
    required input, an unknown one, a value that does not convert to its type, a number out of range (unless the
    node's validate_inputs takes that input), a combo value not offered, then the node's own validate_inputs."""
    cls = NODES[node_type]
    types = cls.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    from comfy_api.internal import first_real_override

    validate = first_real_override(cls, "validate_inputs")  # as ComfyUI finds a V3 node's own check
    checked_by_node = list(inspect.signature(validate).parameters) if validate is not None else []
    errors = [f"{name}: required input is missing" for name in types.get("required", {}) if name not in inputs]
    values: dict[str, Any] = {}
    for name, value in inputs.items():
        if name not in spec:
            errors.append(f"{name}: no such input")
            continue
        kind, options = spec[name]
        if isinstance(value, list):  # a link
            continue
        try:
            value = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(kind, lambda v: v)(value)
        except (TypeError, ValueError) as exc:
            errors.append(f"{name}: not a {kind} ({exc})")
            continue
        values[name] = value
        if name not in checked_by_node:
            if "min" in options and value < options["min"]:
                errors.append(f"{name}: {value} smaller than min {options['min']}")
            if "max" in options and value > options["max"]:
                errors.append(f"{name}: {value} bigger than max {options['max']}")
            if kind == "COMBO" and value not in options["options"]:
                errors.append(f"{name}: {value!r} not in {options['options']}")
    if checked_by_node and not errors:
        result = validate(**{k: v for k, v in values.items() if k in checked_by_node})
        if result is not True:
            errors.append(f"validate_inputs: {result}")
    return errors


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_values_are_valid(name):
    _, api = load(name)
    ours = [node for node in api.values() if node["class_type"] in NODES]
    assert len(ours) >= 9
    for node in ours:
        assert core_validation_errors(node["class_type"], node["inputs"]) == [], node["class_type"]


# ============================================================================================ saved before V3
def pre_v3(name: str) -> tuple[dict, dict]:
    ui = json.loads((PRE_V3 / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((PRE_V3 / "api" / f"{name}.json").read_text(encoding="utf-8"))
    return ui, api


def test_pre_v3_fixtures_are_the_workflows_as_shipped_before_the_port():
    assert sorted(p.stem for p in PRE_V3.glob("*.json")) == sorted(NAMES)
    assert sorted(p.stem for p in (PRE_V3 / "api").glob("*.json")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_pre_v3_ui_workflows_load_onto_the_v3_nodes(name):
    """No missing node; every saved widget value (positional) lands on the input it was saved for and passes
    ComfyUI's checks; every saved link lands on an input or output of the same name and type."""
    ui, api = pre_v3(name)
    for node in ui["nodes"]:
        if node["type"] in CORE:
            continue
        assert node["type"] in NODES, f"missing node type {node['type']}"
        names = widget_names(node["type"])
        added = names[len(node["widgets_values"]):]  # inputs added since: optional ones only, at the end
        assert all(n in NODES[node["type"]].INPUT_TYPES().get("optional", {}) for n in added), (node["type"], added)
        linked = {slot["name"] for slot in node["inputs"] if slot.get("link") is not None}
        inputs = {n: v for n, v in zip(names, node["widgets_values"]) if n is not None and n not in linked}
        saved = api[str(node["id"])]["inputs"]
        assert {k: v for k, v in saved.items() if not isinstance(v, list)} == inputs, node["type"]
        schema = NODES[node["type"]].INPUT_TYPES()
        spec = {**schema.get("required", {}), **schema.get("optional", {})}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                assert slot["name"] in spec and slot["type"] in spec[slot["name"]][0].split(","), (node["type"], slot["name"])
        assert [o["type"] for o in node["outputs"]] == output_types(node["type"]), node["type"]
    assert {str(node["id"]) for node in ui["nodes"]} == api.keys()


@pytest.mark.parametrize("name", NAMES)
def test_pre_v3_api_prompts_validate_against_the_v3_nodes(name):
    """The API prompts saved before the port pass ComfyUI's validation of the V3 nodes unchanged."""
    _, api = pre_v3(name)
    for node in api.values():
        if node["class_type"] in CORE:
            continue
        assert node["class_type"] in NODES, f"missing node type {node['class_type']}"
        assert core_validation_errors(node["class_type"], node["inputs"]) == [], node["class_type"]


def test_core_validation_double_refuses_what_comfyui_refuses():
    """The checks above can fail: a shifted value, a seed past 2^64-1, an escaping prefix, a non-number width."""
    _, api = pre_v3("actavatar_timeline")
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "ActAvatarSampler")
    assert any("seed" in e for e in core_validation_errors("ActAvatarSampler", {**sampler, "seed": 2**64}))
    assert any("seed" in e for e in core_validation_errors("ActAvatarSampler", {**sampler, "seed": -1}))
    errors = core_validation_errors("ActAvatarSampler", {**sampler, "width": "wide"})
    assert errors == ["width: not a INT (invalid literal for int() with base 10: 'wide')"]  # once, on width
    errors = core_validation_errors("ActAvatarSampler", {**sampler, "frames": 4097})
    assert len(errors) == 1 and "4093 frames" in errors[0]
    save = next(n for n in api.values() if n["class_type"] == "ActAvatarSaveVideo")["inputs"]
    errors = core_validation_errors("ActAvatarSaveVideo", {**save, "filename_prefix": "../../etc/x"})
    assert len(errors) == 1 and "outside the output folder" in errors[0]
    assert core_validation_errors("ActAvatarSampler", {k: v for k, v in sampler.items() if k != "phase_cfg"}) == []


def test_demo_script_fits_the_demo_speech(tmp_path):
    """The shipped workflows' phases lie inside the example speech the pack puts into ComfyUI's input folder."""
    from actavatar_core.audio import load_waveform
    from nodes import conventions as glue

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
