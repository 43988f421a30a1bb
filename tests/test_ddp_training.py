"""Training under torchrun: two CPU processes over gloo (DDP through accelerate) make the data, encoders and cache
once, train every stage in step and end with the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_training_ends_with_one_model(tmp_path):
    from actavatar_core.synth.writer import write_dataset

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    dataset = tmp_path / "data"
    write_dataset(dataset, clips=4, seed=0, size=64, fps=25.0, duration=1.0, workers=1, voice="synthetic")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "ddp_worker.py"),
                           str(tmp_path), str(dataset)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["stages"] == ["stage0", "stage2"] for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the two replicas identical through both stages
    run = tmp_path / "run"
    index = json.loads((run / "cache" / "index.json").read_text())
    assert index["complete"] and len(index["clips"]) == 4
    assert (run / "stage2" / "final.safetensors").is_file() and (run / "models" / "spiece.model").is_file()
