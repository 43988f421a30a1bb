"""diffusers' context parallelism splits ActAvatar's video tokens across processes (here 2 CPU processes over
gloo, Ulysses attention) and gives the same output as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_context_parallel_matches_single_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "result"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "cp_worker.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for r in results:
        assert r["world"] == 2 and r["max_diff"] < 1e-5
        assert r["seen"][0]["tokens"] == 8  # each rank holds half of the 16 video tokens ...
    assert results[0]["seen"][0]["frames"] == [0, 0, 0, 0, 1, 1, 1, 1]  # ... with the frame index of exactly those
    assert results[1]["seen"][0]["frames"] == [2, 2, 2, 2, 3, 3, 3, 3]
