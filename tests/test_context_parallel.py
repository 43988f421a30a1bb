"""diffusers' context parallelism splits ActAvatar's video tokens across processes (here 2 CPU processes over
gloo, Ulysses attention) and gives the same output as one process."""

import json
from pathlib import Path

import pytest
from torchrun_helper import run_two_processes


@pytest.mark.slow
def test_two_process_context_parallel_matches_single_process(tmp_path):
    out = tmp_path / "result"
    run_two_processes("cp_worker.py", out, timeout=300)
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for r in results:
        assert r["world"] == 2 and r["max_diff"] < 1e-5
        assert r["seen"][0]["tokens"] == 8  # each rank holds half of the 16 video tokens ...
    assert results[0]["seen"][0]["frames"] == [0, 0, 0, 0, 1, 1, 1, 1]  # ... with the frame index of exactly those
    assert results[1]["seen"][0]["frames"] == [2, 2, 2, 2, 3, 3, 3, 3]
