"""actavatar_core.phases against the shared phase-script vectors (the same file web/tests/phase_model.test.mjs reads).

A case with "py_bug" describes a disagreement between phases.py and the intended behaviour that has been reported
to the lead; it fails here until phases.py is fixed (the message says so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actavatar_core.errors import PhaseScriptError
from actavatar_core.phases import PhaseScript

VECTORS = json.loads((Path(__file__).parent / "vectors" / "phase_scripts.json").read_text(encoding="utf-8"))["cases"]


def _run(case: dict) -> tuple[PhaseScript | None, list[str]]:
    fps = float(case["fps"])
    try:
        script = PhaseScript.parse(case["script"])
    except PhaseScriptError as exc:
        return None, [str(exc)]
    return script, script.problems(case["duration"], fps)


def test_vector_file_is_well_formed():
    names = [c["name"] for c in VECTORS]
    assert len(names) >= 50
    assert len(set(names)) == len(names), "case names must be unique"
    for case in VECTORS:
        assert {"name", "script", "duration", "fps", "valid", "errors_contain"} <= set(case), case["name"]
        assert isinstance(case["valid"], bool)
        assert case["valid"] or "errors_exact" not in case or case["errors_exact"], case["name"]


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_phases_py_matches_vector(case):
    bug = f" [known phases.py issue reported to the lead: {case['py_bug']}]" if case.get("py_bug") else ""
    try:
        script, errors = _run(case)
    except Exception as exc:  # anything but a PhaseScriptError is a bug in itself
        pytest.fail(f"phases.py raised {type(exc).__name__}: {exc}{bug}")
    text = "\n".join(errors)
    assert (not errors) == case["valid"], f"verdict differs; phases.py said: {text or 'valid'}{bug}"
    for part in case["errors_contain"]:
        assert part in text, f"{part!r} not in:\n{text}{bug}"
    if "errors_exact" in case:
        assert errors == case["errors_exact"]
    if "canonical" in case:
        assert script is not None
        assert script.dumps() == case["canonical"], f"canonical form differs{bug}"
        assert PhaseScript.parse(case["canonical"]).dumps() == case["canonical"]
