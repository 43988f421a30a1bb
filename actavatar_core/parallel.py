"""Multi-GPU inference through diffusers' own context parallelism (Ulysses or ring attention).

Launch with ``torchrun --nproc_per_node N actavatar generate ...``: every rank holds the whole model and samples the
same seeded noise, and diffusers splits the video tokens across ranks inside the transformer (``_cp_plan`` of
:class:`~actavatar_core.model.ActAvatarTransformer`); rank 0 writes the file. A single process runs unchanged.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

CP_KINDS = ("ulysses", "ring")


def distributed_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def _cpu_ranks_share_the_cpu() -> Iterator[None]:
    """diffusers computes ``rank % torch.accelerator.device_count()`` for the rank's device, which fails without an
    accelerator; on a CPU-only machine (tests, gloo) every rank uses the CPU."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def init_distributed() -> tuple[int, int, int, Any]:
    """Initialise the process group when launched by torchrun: (rank, local rank, world, device)."""
    import torch
    import torch.distributed as dist

    rank, local_rank, world = distributed_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def shutdown_distributed() -> None:
    """Destroy the process group before the process exits: left to interpreter shutdown, gloo's worker threads can be
    torn down while still joinable, and the process aborts (SIGABRT) after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def enable_context_parallel(transformer: Any, world: int, kind: str = "ulysses") -> None:
    """Split the transformer's video tokens over ``world`` ranks. Ulysses needs the head count divisible by
    ``world`` (24 heads for Wan2.2 5B: 2, 3, 4, 6 or 8 GPUs); ring attention needs a backend that returns the
    log-sum-exp (e.g. ``transformer.set_attention_backend("flash")``)."""
    from diffusers import ContextParallelConfig

    if kind not in CP_KINDS:
        raise ValueError(f"unknown context-parallel kind {kind!r}; choose {', '.join(CP_KINDS)}")
    heads = transformer.config.num_attention_heads
    if kind == "ulysses" and heads % world:
        raise ValueError(f"Ulysses context parallelism needs the {heads} heads divisible by {world} processes; "
                         f"use a divisor of {heads} GPUs or --context-parallel ring")
    config = ContextParallelConfig(ulysses_degree=world) if kind == "ulysses" else ContextParallelConfig(ring_degree=world)
    with _cpu_ranks_share_the_cpu():
        transformer.enable_parallelism(config=config)
