"""One rank of the two-process DDP training test (run by torchrun from tests/test_ddp_training.py)."""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_training import SMALL  # noqa: E402  (the tiny model sizes of the training tests)

from accelerate import PartialState  # noqa: E402

from actavatar_core.training.config import config_from_dict  # noqa: E402
from actavatar_lab.recipe import run_training  # noqa: E402

out, dataset = Path(sys.argv[1]), sys.argv[2]
cfg = config_from_dict({
    "output_dir": str(out / "run"), "data": {"dataset": dataset}, "text_len": 96, "models": dict(SMALL),
    "stages": ["stage0", "stage2"], "stage0": {"steps": 3, "lr": 1e-3, "prompt": "global"},
    "stage2": {"steps": 3, "lr": 1e-3, "prompt": "phased"}, "batch_size": 1, "checkpoint_every": 0, "warmup_steps": 0})
result = run_training(cfg, progress=False, log=lambda m: None)
digest = hashlib.sha256()
for name, tensor in sorted(result["models"].transformer.state_dict().items()):
    digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
state = PartialState(cpu=True)
(out / f"rank{state.process_index}.json").write_text(json.dumps({
    "world": state.num_processes, "digest": digest.hexdigest(), "stages": sorted(result["report"]["stages"])}))
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown, where gloo's threads can abort after correct results (see cp_worker.py)
