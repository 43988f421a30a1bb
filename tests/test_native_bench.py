"""``actavatar bench native`` without a ComfyUI to measure: exit 2 with the fix, before anything is built."""

from __future__ import annotations

from actavatar_core.bench import main


def test_bench_native_without_comfyui_exits_2_with_the_fix(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    assert main(["bench", "native", "--frames", "2"]) == 2
    err = capsys.readouterr().err
    assert "no ComfyUI to measure" in err and "Fix: pass --comfyui" in err


def test_bench_usage_lists_native(capsys):
    assert main(["bench", "nope"]) == 2
    assert "actavatar bench native" in capsys.readouterr().err
