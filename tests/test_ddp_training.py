"""Training under torchrun: two CPU processes over gloo (DDP through accelerate) make the data, encoders and cache
once, train every stage in step and end with the same weights."""

import json

import pytest
from torchrun_helper import run_two_processes


@pytest.mark.slow
def test_two_process_ddp_training_ends_with_one_model(tmp_path):
    from actavatar_lab.synth.writer import write_dataset

    dataset = tmp_path / "data"
    write_dataset(dataset, clips=4, seed=0, size=64, fps=25.0, duration=1.0, workers=1, voice="synthetic")
    run_two_processes("ddp_worker.py", tmp_path, dataset)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["stages"] == ["stage0", "stage2"] for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the two replicas identical through both stages
    run = tmp_path / "run"
    index = json.loads((run / "cache" / "index.json").read_text())
    assert index["complete"] and len(index["clips"]) == 4
    assert (run / "stage2" / "final.safetensors").is_file() and (run / "models" / "spiece.model").is_file()
