"""Run by tests/test_context_parallel.py under torchrun: compare one forward with and without context parallelism."""

import json
import os
import sys

import torch

from actavatar_core.attention import PhaseRouting
from actavatar_core.model import ActAvatarTransformer
from actavatar_core.parallel import enable_context_parallel, init_distributed, shutdown_distributed
from actavatar_core.tiny import tiny_wan_transformer


def main(out_path: str) -> None:
    rank, _, world, _ = init_distributed()
    torch.manual_seed(0)
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), audio_feature_dim=16, audio_num_layers=3)
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.audio_attn.to_out[0].weight, std=0.05)
        model.phase_embedding.weight.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, 4, 4, 4, generator=g)
    ctx = torch.randn(1, 12, 32, generator=g)
    ts = torch.full((1, 16), 500.0)
    ts[:, :4] = 0
    ids = torch.zeros(1, 12, dtype=torch.long)
    ids[:, 3:8], ids[:, 8:10] = 1, 2
    feats = torch.randn(1, 4, 8, 3, 16, generator=g)
    active = [frozenset({1}), frozenset({1}), frozenset({2}), frozenset()]
    kwargs = dict(phase_ids=ids, audio_features=feats, paca_mode="routed", return_dict=False)
    with torch.no_grad():
        reference = model(x, ts, ctx, routing=PhaseRouting.build(ids, active), **kwargs)[0]
    enable_context_parallel(model, world)
    seen = []
    model.blocks[1].register_forward_pre_hook(
        lambda mod, args, kw: seen.append({"tokens": args[0].shape[1], "frames": kw["token_frame"].flatten().tolist()}),
        with_kwargs=True)
    with torch.no_grad():
        parallel = model(x, ts, ctx, routing=PhaseRouting.build(ids, active), **kwargs)[0]
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"rank": rank, "world": world, "max_diff": float((parallel - reference).abs().max()), "seen": seen}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: under load, torch's gloo/functional-collective threads occasionally abort the process
    # ("terminate called without an active exception") after the results are written and the group is destroyed,
    # which failed this test about one run in ten without any wrong result.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
