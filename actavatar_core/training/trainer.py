"""Two-stage ActAvatar training (plus the mini recipe's VAE and backbone stages), on accelerate.

* ``stage1`` (paper): backbone, text encoder and wav2vec2 frozen; only the audio adapter trains, on brief captions.
* ``stage2`` (paper): the transformer (full, or LoRA through peft), the adapter and the phase embeddings train on
  phase-annotated clips with PACA prompts.
* ``stage0`` (mini only): pretrain the small backbone as an ordinary TI2V model on flat global prompts, so that,
  like Wan2.2, it knows the actions from text but not when to do them. Skip it when starting from Wan2.2 weights.
* ``vae`` (mini only): train the small Wan2.2-class VAE on the dataset's frames.

Runs on one CPU process as is, and on many GPUs under ``accelerate launch`` or ``torchrun`` (DDP, or FSDP through an
accelerate config): each process takes its own slice of every global batch. Checkpoints hold the trainable weights,
the optimiser, the learning-rate schedule, the step, the data position and every RNG state; they are written to a
temporary file and renamed, so a killed run loses at most the steps since the last checkpoint, and a resumed run
continues exactly as if it had not stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..attention import BatchRouting
from .config import SCHEDULES, TrainConfig
from .data import CachedClips, iterate_forever, pad_text
from .flow import flow_matching_loss

ADAPTER_PREFIXES = ("audio_proj.",)


def is_audio_adapter_param(name: str) -> bool:
    return name.startswith(ADAPTER_PREFIXES) or ".audio_attn." in name or ".norm_audio." in name


def select_trainable(model: torch.nn.Module, stage: str, train: str = "full") -> list[str]:
    """Names of the parameters a stage trains (everything else is frozen)."""
    names = []
    for name, p in model.named_parameters():
        if stage == "stage0":
            keep = not is_audio_adapter_param(name) and not name.startswith("phase_embedding.")
        elif stage == "stage1":
            keep = is_audio_adapter_param(name)
        elif stage == "stage2":
            keep = train == "full" or "lora_" in name or is_audio_adapter_param(name) or name.startswith("phase_embedding.")
        else:
            raise ValueError(stage)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream training reads, as tensors (so ``weights_only`` loading works)."""
    version, words, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "python": torch.tensor(list(words), dtype=torch.int64), "python_version": version}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model: torch.nn.Module, trainable: list[str], optimizer: Any, scheduler: Any,
                    step: int, epoch: int, position: int, generator: torch.Generator, extra: dict | None = None) -> Path:
    """Atomic checkpoint, loadable with ``torch.load(weights_only=True)`` (tensors and plain values only)."""
    params = dict(model.named_parameters())
    state = {
        "model": {n: params[n].detach().cpu() for n in trainable},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step, "epoch": epoch, "position": position,
        "rng": _rng_state(generator),
        "extra": json.dumps(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: stay on fp32 rather than guess
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``auto`` becomes ``bf16`` where the hardware computes it natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX:
    on this project's 2-core EPYC the VAE decoder stage runs 2.3x and the transformer steps 1.2x faster), else ``no``.
    Weights and optimiser state stay fp32 either way (autocast), as on GPUs."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "no"


def lr_factor(warmup: int, steps: int, schedule: str = "constant") -> Callable[[int], float]:
    """Linear warmup, then constant or cosine decay to 10 % at the last step (a decayed run ends on sharper weights)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: use one of {SCHEDULES} (e.g. 'cosine')")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class StageRunner:
    """One training stage of the transformer (stage0, stage1 or stage2)."""

    def __init__(self, cfg: TrainConfig, stage: str, model: Any, dataset: CachedClips, *,
                 log: Callable[[str], None] = print, progress: bool = True,
                 on_checkpoint: Callable[[int], None] | None = None,
                 validator: Callable[[str, int, Any], Any] | None = None):
        self.cfg, self.stage, self.model, self.dataset = cfg, stage, model, dataset
        self.validator = validator
        self.scfg = cfg.stage_config(stage)
        self.log, self.progress, self.on_checkpoint = log, progress, on_checkpoint
        self.dir = Path(cfg.output_dir) / stage
        self.ckpt = self.dir / "checkpoint.pt"

    def _batch_inputs(self, batch_idx: list[int], generator: torch.Generator, device: torch.device):
        items = [self.dataset[i] for i in batch_idx]
        prompt = self.scfg.prompt
        texts, ids = [], []
        for it in items:
            drop = torch.rand(1, generator=generator).item() < self.cfg.caption_dropout
            if drop:
                texts.append(self.dataset.empty)
                ids.append(torch.zeros(self.dataset.empty.shape[0], dtype=torch.long))
            elif prompt == "phased":
                texts.append(it["text_phased"]); ids.append(it["ids_phased"])
            else:
                texts.append(it[f"text_{prompt}"]); ids.append(torch.zeros(it[f"text_{prompt}"].shape[0], dtype=torch.long))
        text, phase_ids = pad_text(texts, ids, self.dataset.text_len)
        latents = torch.stack([it["latents"] for it in items])
        audio = None
        if self.stage != "stage0":
            audio = torch.stack([it["audio"] for it in items])
            keep = (torch.rand(len(items), generator=generator) >= self.cfg.audio_dropout).float()
            audio = audio * keep.view(-1, 1, 1, 1, 1)
        mode = self.cfg.paca_mode if prompt == "phased" else "global"
        routing = None
        if mode == "routed":  # each clip attends through its own windows (dropped captions have only block 0)
            frames = latents.shape[2]
            routing = BatchRouting.build(phase_ids, [self.dataset.script(i).active_phases(frames, self.dataset.fps(i))
                                                     for i in batch_idx])
        return latents.to(device), text.to(device), (phase_ids.to(device) if prompt == "phased" else None), \
            (audio.to(device) if audio is not None else None), mode, routing

    def run(self) -> dict[str, Any]:
        from accelerate import Accelerator
        from tqdm import tqdm

        cfg, scfg = self.cfg, self.scfg
        if (self.dir / "done.json").is_file():
            self.log(f"{self.stage}: already complete, skipping")
            return json.loads((self.dir / "done.json").read_text())
        use_cuda = torch.cuda.is_available()
        mp = resolve_mixed_precision(cfg.stage_mixed_precision(self.stage), torch.device("cuda" if use_cuda else "cpu"))
        acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp, cpu=not use_cuda)
        model = self.model
        if scfg.train == "lora" and self.stage == "stage2":
            from ..lora import add_lora

            add_lora(model, scfg.lora_rank)
        trainable = select_trainable(model, self.stage, scfg.train)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        warmup = max(0, cfg.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(warmup, scfg.steps, scfg.schedule))
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + {"stage0": 0, "stage1": 1, "stage2": 2}[self.stage])
        step, epoch, position = 0, 0, 0
        if self.ckpt.is_file():
            state = load_checkpoint(self.ckpt)
            with torch.no_grad():
                named = dict(model.named_parameters())
                for n, v in state["model"].items():
                    named[n].copy_(v)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, position = state["step"], state["epoch"], state["position"]
            _set_rng_state(state["rng"], generator)
            self.log(f"{self.stage}: resumed at step {step}")
        model, optimizer = acc.prepare(model, optimizer)
        batch = scfg.batch_size or cfg.batch_size
        world, rank = acc.num_processes, acc.process_index
        batches = iterate_forever(self.dataset, batch * world, cfg.seed, epoch, position)
        patch = tuple(acc.unwrap_model(model).config.patch_size)
        bar = tqdm(total=scfg.steps, initial=step, desc=self.stage, unit="step", disable=not (self.progress and acc.is_main_process))
        ema, started, losses = None, time.time(), []
        while step < scfg.steps:
            for _ in range(cfg.grad_accum):
                epoch, position, idx = next(batches)
                mine = idx[rank * batch:(rank + 1) * batch]
                latents, text, ids, audio, mode, routing = self._batch_inputs(mine, generator, acc.device)
                with acc.accumulate(model):
                    with acc.autocast():
                        loss = flow_matching_loss(model, latents, text, phase_ids=ids, audio=audio, shift=cfg.shift,
                                                  generator=generator, paca_mode=mode, patch_size=patch,
                                                  motion_weight=scfg.motion_weight, routing=routing)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            value = float(loss.detach())
            losses.append(value)
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if self.validator and cfg.validate_every and step % cfg.validate_every == 0 and acc.is_main_process:
                unwrapped = acc.unwrap_model(model)
                unwrapped.eval()
                path = self.validator(self.stage, step, unwrapped)
                unwrapped.train()
                bar.write(f"{self.stage} step {step}: validation sample {path}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < scfg.steps and acc.is_main_process:
                save_checkpoint(self.ckpt, model=acc.unwrap_model(model), trainable=trainable, optimizer=optimizer,
                                scheduler=scheduler, step=step, epoch=epoch, position=position, generator=generator)
                if self.on_checkpoint:
                    self.on_checkpoint(step)
        bar.close()
        acc.wait_for_everyone()
        # without the autocast accelerate wrapped forward in: the next stage, the export and any in-process sampling
        # get the model in the precision it is loaded in, as a reloaded copy is
        unwrapped = acc.unwrap_model(model, keep_fp32_wrapper=False)
        unwrapped.eval()
        summary = {"stage": self.stage, "steps": scfg.steps, "mixed_precision": mp, "clips": len(self.dataset), "seconds": round(time.time() - started, 1),
                   "final_loss_ema": ema, "first_losses": losses[:10], "last_losses": losses[-10:],
                   "trainable_parameters": sum(p.numel() for n, p in unwrapped.named_parameters() if n in set(trainable))}
        if acc.is_main_process:
            from ..model import save_actavatar_weights

            self.dir.mkdir(parents=True, exist_ok=True)
            lora_state, lora_cfg = None, None
            if scfg.train == "lora" and self.stage == "stage2":
                from ..lora import lora_state_dict

                lora_state, lora_cfg = lora_state_dict(unwrapped), {"rank": scfg.lora_rank}
            save_actavatar_weights(unwrapped, self.dir / "final.safetensors",
                                   contents="full" if lora_state is None else "adapter",
                                   lora_state=lora_state, lora_config=lora_cfg)
            (self.dir / "done.json").write_text(json.dumps(summary, indent=2))
            self.ckpt.unlink(missing_ok=True)
        acc.wait_for_everyone()  # the other ranks load these weights for the next stage: wait until they exist
        self.model = unwrapped
        return summary

