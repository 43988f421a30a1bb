"""Running a test worker under ``torchrun --standalone`` with two CPU processes (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_two_processes(worker: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/<worker>`` on two ranks; skips the test where torchrun is not installed beside this Python."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / worker),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
