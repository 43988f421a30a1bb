import json

import pytest

from actavatar_core.errors import PhaseScriptError
from actavatar_core.phases import (
    MAX_PHASES, Phase, PhaseScript, frames_for_duration, latent_frame_count, latent_frame_times,
)


def test_compact_and_json_forms_round_trip():
    s = PhaseScript.parse("A woman talks | 0-2s: waves with the right hand | 2-4.5s: points down | negative: blurry")
    assert s.base == "A woman talks" and s.negative == "blurry"
    assert s.phases == (Phase(0, 2, "waves with the right hand"), Phase(2, 4.5, "points down"))
    assert PhaseScript.parse(s.dumps()) == s
    assert PhaseScript.parse(s.to_compact()) == s
    assert json.loads(s.dumps())["version"] == 1


def test_phases_are_kept_in_time_order():
    s = PhaseScript.parse({"base": "x", "phases": [{"start": 2, "end": 3, "text": "b"}, {"start": 0, "end": 1, "text": "a"}]})
    assert [p.text for p in s.phases] == ["a", "b"]


@pytest.mark.parametrize("bad, words", [
    ("{not json", ["not valid JSON"]),
    ('{"version": 2, "base": "x", "phases": []}', ["version 2"]),
    ('{"base": "x", "phases": [{"start": 0, "end": 1}]}', ["lacks text"]),
    ('{"base": "x", "phases": [{"start": "a", "end": 1, "text": "t"}]}', ["not a finite number"]),
    ('{"base": "x", "phases": [], "colour": 1}', ["Unknown phase script field", "colour"]),
    ("A man | 0-2: waves | talks more", ["no time anchor"]),
    ("A man | 0-2x: waves", ["time anchor"]),
])
def test_malformed_scripts_name_the_problem(bad, words):
    with pytest.raises(PhaseScriptError) as info:
        PhaseScript.parse(bad)
    for w in words:
        assert w in str(info.value)
    assert "Fix:" in str(info.value)


def test_validation_names_phase_and_fix():
    s = PhaseScript.parse('{"base": "a man", "phases": [{"start": 0, "end": 3, "text": "waves"}, '
                          '{"start": 2, "end": 6, "text": "points"}]}')
    problems = s.problems(duration=5.0, fps=25)
    assert any("overlap" in p and "phase 1" in p and "Fix: end phase 1 at 2 s" in p for p in problems)
    assert any("Phase 2" in p and "ends after the clip" in p and "5 s" in p for p in problems)
    with pytest.raises(PhaseScriptError) as info:
        s.validate(duration=5.0, fps=25)
    assert "overlap" in str(info.value) and "ends after the clip" in str(info.value)


@pytest.mark.parametrize("script, duration, needle", [
    ({"base": "", "phases": []}, 5, "base prompt is empty"),
    ({"base": "x", "phases": [{"start": 0, "end": 1, "text": "  "}]}, 5, "has no text"),
    ({"base": "x", "phases": [{"start": 1, "end": 1, "text": "a"}]}, 5, "ends at or before its start"),
    ({"base": "x", "phases": [{"start": -1, "end": 1, "text": "a"}]}, 5, "before 0 s"),
    ({"base": "x", "phases": [{"start": 6, "end": 7, "text": "a"}]}, 5, "starts after the clip"),
    ({"base": "x", "phases": [{"start": 1.0, "end": 1.05, "text": "a"}]}, 5, "too short"),
    ({"base": "x", "phases": [{"start": 0, "end": 1, "text": "a" * 301}]}, 5, "more than 300"),
    ({"base": "x", "phases": [{"start": i * 0.5, "end": i * 0.5 + 0.5, "text": "a"} for i in range(MAX_PHASES + 1)]}, 10,
     f"at most {MAX_PHASES}"),
])
def test_each_rule(script, duration, needle):
    problems = PhaseScript.parse(script).problems(duration=duration, fps=25)
    assert any(needle in p for p in problems), problems


def test_touching_phases_are_valid_and_half_open():
    s = PhaseScript.parse("x | 0-2s: a | 2-4s: b")
    assert s.problems(duration=4.2, fps=25) == []
    active = s.active_phases(latent_frame_count(105), 25)
    assert all(len(a) <= 1 for a in active)
    times = latent_frame_times(len(active), 25)
    for t, a in zip(times, active):
        assert a == (frozenset({1}) if t < 2 else frozenset({2}) if t < 4 else frozenset())


def test_latent_grid_matches_vae_stride():
    assert latent_frame_count(125) == 32 and latent_frame_count(1) == 1
    with pytest.raises(PhaseScriptError, match="4k\\+1"):
        latent_frame_count(124)
    assert latent_frame_times(3, 25) == [0.0, 2.5 / 25, 6.5 / 25]
    assert frames_for_duration(5.0, 25) == 125 and frames_for_duration(5.0, 24) == 121
    assert frames_for_duration(4.97, 24) == 121 and (frames_for_duration(4.97, 24) - 1) % 4 == 0


def test_fps_changes_the_grid():
    s = PhaseScript.parse("x | 1-1.2s: a")
    # 0.2 s holds a latent-frame centre at 24 fps? centres every 4/24 s = 0.167 s
    assert s.problems(duration=3, fps=24) == []
    assert any("too short" in p for p in PhaseScript.parse("x | 1-1.1s: a").problems(duration=3, fps=8))


@pytest.mark.parametrize("value, words", [
    ('{"a": ' * 100000 + "1" + "}" * 100000, "nested too deeply"),
    ('{"version": 1, "base": "x", "phases": [{"start": ' + "1" * 5000 + ', "end": 2, "text": "t"}]}', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, None),  # not JSON the parser can take: read as compact text, refused as a prompt
    ("[" + "1" * 5000 + "]", None),
])
def test_pathological_json_is_refused_with_a_message(value, words):
    try:
        script = PhaseScript.parse(value)
    except PhaseScriptError as exc:
        assert words is None or words in str(exc)
        assert "Fix:" in str(exc)
    else:
        assert words is None and script.problems(None, 25.0)  # taken as compact text, whose prompt is refused
