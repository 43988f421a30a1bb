"""Run the JavaScript unit tests (node --test web/tests/) inside pytest, so one pytest command covers them too."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _node() -> str | None:
    for candidate in (shutil.which("node"), "/usr/bin/node"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def test_node_unit_tests_pass():
    node = _node()
    if node is None:
        pytest.skip("node is not installed (the JS unit tests need Node.js >= 18)")
    proc = subprocess.run(
        [node, "--test", "web/tests/"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"node --test failed:\n{out[-6000:]}"
    passed = re.search(r"^# pass (\d+)", out, re.M)
    failed = re.search(r"^# fail (\d+)", out, re.M)
    assert passed and int(passed.group(1)) >= 50, f"too few JS tests ran:\n{out[-2000:]}"
    assert failed and int(failed.group(1)) == 0
