"""``actavatar bench native`` runs on a tiny shape against a real ComfyUI (COMFYUI_DIR) and reports every mode."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_bench_native_runs_and_writes_its_figures(tmp_path, capsys):
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR is not set: point it at a copy of ComfyUI 0.33.0 to run the native bench")
    pytest.importorskip("einops", reason="ComfyUI's requirements are not installed in this environment")
    from actavatar_core.bench import main

    out = tmp_path / "native.json"
    assert main(["bench", "native", "--comfyui", comfy_dir, "--frames", "3", "--height", "4", "--width", "4",
                 "--dim", "256", "--layers", "1", "--ffn-dim", "128", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["plain (unpatched)", "routed", "feathered 2", "relay width=2"]
    assert all(r["time_ms"] > 0 for r in result["rows"]) and result["rows"][0]["time_ratio"] == 1.0
    assert result["shape"]["latent"] == [1, 48, 3, 4, 4] and result["met"] in (True, False, None)
    assert "routed" in text and "target: routed <= 1.05x time" in text
