"""The mini recipe: the mini model's encoders built from scratch (SentencePiece vocabulary from the prompts,
small umT5/wav2vec2/VAE configs), its stand-in VAE stages, the synthetic dataset when a config asks for it, and the
whole run (every configured stage in order). The parts that do not depend on the model's size (config, cache,
loss, the stage trainer, validation samples, export) are the engine's :mod:`actavatar_core.training`."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from actavatar_core.bundle import ActAvatarModels
from actavatar_core.training.config import TrainConfig
from actavatar_core.training.data import Annotation, CachedClips, global_prompt, preprocess, read_annotations
from actavatar_core.training.runs import (frozen_encoders_on_accelerator, load_models, load_stage_weights,
                                          make_validator, read_run_config, training_device)

#: Small configurations of the real classes for the mini model (trained from scratch on this CPU). The geometry is
#: Wan2.2-TI2V-5B's: a four-stage Wan2.2 VAE (48 latent channels, stride 16 x 16 x 4) and 2x2 patches, so one token
#: stands for 32x32 pixels and carries 48 x 2 x 2 = 192 latent values. The width must exceed those 192 values: the
#: velocity a flow model predicts includes the noise, and a narrower token cannot pass it through (a 128-wide try
#: with 768 values per token left noise in every frame).
MINI_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=48,
                        out_channels=48, text_dim=64, freq_dim=64, ffn_dim=768, num_layers=4, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
MINI_ADAPTER = dict(audio_window=8, audio_tokens=4, audio_hidden_dim=128, max_phases=8)
MINI_VAE = dict(base_dim=16, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, is_residual=True,
                in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
MINI_UMT5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                 relative_attention_max_distance=64, feed_forward_proj="gated-gelu", dropout_rate=0.0)
MINI_WAV2VEC2 = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                     conv_dim=(32,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=False,
                     feat_extract_norm="group")
# The wav2vec2-base layout (group norm in the first conv only, as chinese-wav2vec2-base that most avatar models use):
# the frozen encoder is random at mini scale, and the large layout's per-frame layer norm in every conv layer erases
# loudness, so a mouth could not follow it (ridge readout of the mouth opening per latent frame: r 0.42 against 0.93).


# ---------------------------------------------------------------------------------------------- tokenizer
def prompt_corpus(annotations: list[Annotation]) -> list[str]:
    """Every text the mini model will be prompted with, for the SentencePiece vocabulary."""
    from actavatar_core.text import assemble_prompt

    lines = set()
    for a in annotations:
        lines.add(a.caption)
        lines.add(global_prompt(a.script))
        lines.add("".join(assemble_prompt(a.script)))
    digits = " ".join(f"Phase {k} [{s / 10:g}s-{e / 10:g}s]:" for k in range(1, 9) for s, e in ((3, 17), (25, 40), (0, 99)))
    lines.add(digits)
    return sorted(lines)


def train_sentencepiece(corpus: list[str], vocab_size: int = 320) -> bytes:
    """A small SentencePiece model with umT5's special ids (pad 0, eos 1, bos 2, unk 3) and umT5's model type,
    Unigram. SentencePiece's Unigram trainer stops at ~100 pieces on a corpus this repetitive (most of them single
    letters), so the pieces are learned with its BPE trainer and stored as a Unigram model with equal scores:
    segmentation then takes the fewest pieces, whole words where the vocabulary has them."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2,
                                   unk_id=3, hard_vocab_limit=False, split_digits=True, num_threads=1,
                                   minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    for piece in proto.pieces:
        if piece.type == pb.ModelProto.SentencePiece.NORMAL:
            piece.score = -1.0
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------------------- models
def models_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "models"


def build_models(cfg: TrainConfig, annotations: list[Annotation], log: Callable[[str], None] = print) -> tuple[ActAvatarModels, Any]:
    """(frozen encoders + VAE, base transformer) as the config's ``models.init`` says. The mini encoders are built
    once and saved under ``output_dir/models`` so that restarts and later stages see the same ones."""
    init = cfg.models.get("init", "mini-scratch")
    if init == "mini-scratch":
        return _mini_models(cfg, annotations, log)
    if init in ("folder", "files"):
        return load_models(cfg)
    raise ValueError(f"unknown models.init {init!r}; choose mini-scratch, folder or files")


def _mini_models(cfg: TrainConfig, annotations: list[Annotation], log: Callable[[str], None]) -> tuple[ActAvatarModels, Any]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    from actavatar_core.convert.spm import build_tokenizer
    from actavatar_core.model import ActAvatarTransformer

    folder = models_dir(cfg)
    tcfg = {**MINI_TRANSFORMER, **cfg.models.get("transformer", {})}
    acfg = {**MINI_ADAPTER, **cfg.models.get("adapter", {})}
    if not (folder / "spiece.model").is_file() and cfg.models.get("encoders_from"):
        _copy_encoders(cfg.models["encoders_from"], folder, log)
    if (folder / "spiece.model").is_file():
        spm_bytes = (folder / "spiece.model").read_bytes()
        tokenizer = build_tokenizer(spm_bytes, extra_ids=0, model_max_length=cfg.text_len)
        text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
        audio_encoder = Wav2Vec2Model.from_pretrained(folder / "audio_encoder", local_files_only=True).eval()
        vae_dir = next(folder / d for d in ("vae_tuned", "vae_trained", "vae") if (folder / d).is_dir())
        vae = AutoencoderKLWan.from_pretrained(vae_dir, local_files_only=True).eval()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        spm_bytes = train_sentencepiece(prompt_corpus(annotations))
        tokenizer = build_tokenizer(spm_bytes, extra_ids=0, model_max_length=cfg.text_len)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **{**MINI_UMT5, **cfg.models.get("text_encoder", {})})).eval()
        audio_encoder = Wav2Vec2Model(Wav2Vec2Config(**{**MINI_WAV2VEC2, **cfg.models.get("audio_encoder", {})})).eval()
        vae = AutoencoderKLWan(**{**MINI_VAE, **cfg.models.get("vae", {})}).eval()
        (folder / "spiece.model").write_bytes(spm_bytes)
        text_encoder.save_pretrained(folder / "text_encoder")
        audio_encoder.save_pretrained(folder / "audio_encoder")
        vae.save_pretrained(folder / "vae")
        log(f"built mini encoders: tokenizer {len(tokenizer)} pieces, umT5 {_count(text_encoder)}, wav2vec2 "
            f"{_count(audio_encoder)}, VAE {_count(vae)} parameters")
    if tcfg["text_dim"] != text_encoder.config.d_model:
        tcfg["text_dim"] = text_encoder.config.d_model
    torch.manual_seed(cfg.seed + 1)
    base = WanTransformer3DModel(**tcfg)
    transformer = ActAvatarTransformer.from_base(base, audio_feature_dim=audio_encoder.config.hidden_size,
                                                 audio_num_layers=audio_encoder.config.num_hidden_layers + 1,
                                                 audio_schedule=cfg.audio_schedule, audio_gamma=cfg.audio_gamma, **acfg)
    models = ActAvatarModels(transformer, vae, text_encoder, tokenizer, audio_encoder, {"do_normalize": True},
                             {"spiece_model": spm_bytes})
    return models, transformer


def _copy_encoders(model_folder: "str | Path", folder: Path, log: Callable[[str], None]) -> None:
    """Seed a mini-scratch run with an existing model's frozen encoders, tokenizer and VAE (``models.encoders_from``),
    so that only the transformer starts from scratch: how a variant is trained on the shipped model's encoders."""
    from actavatar_core.bundle import load_model_folder, spiece_bytes

    models = load_model_folder(model_folder, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    models.text_encoder.save_pretrained(folder / "text_encoder")
    models.audio_encoder.save_pretrained(folder / "audio_encoder")
    models.vae.save_pretrained(folder / "vae")
    (folder / "spiece.model").write_bytes(spiece_bytes(models))  # last: its presence marks the folder complete
    log(f"mini encoders, tokenizer and VAE from {model_folder}; the transformer starts from scratch")


def _count(module: torch.nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


# ---------------------------------------------------------------------------------------------- VAE stage
def _frame_pool(annotations: list[Annotation]) -> list[np.ndarray]:
    """The frames of the first 200 clips, held in memory for the VAE stages."""
    from actavatar_core.video import read_video

    return [read_video(a.video)[0] for a in annotations[: min(len(annotations), 200)]]


def _clip_batch(pool: list[np.ndarray], rng: np.random.Generator, batch: int, frames: int,
                crop: int | None) -> torch.Tensor:
    """(batch, 3, frames, crop, crop) random clips in [-1, 1]; crops start on the 16-pixel latent grid. The VAE is
    convolutional: crops train it for the whole frame, cheaper."""
    from actavatar_core.vae import frames_to_tensor

    clips = []
    for _ in range(batch):
        video = pool[int(rng.integers(len(pool)))]
        start = int(rng.integers(0, len(video) - frames + 1))
        h, w = video.shape[1:3]
        size = min(crop or h, h, w)
        y = int(rng.integers(0, (h - size) // 16 + 1)) * 16
        x0 = int(rng.integers(0, (w - size) // 16 + 1)) * 16
        clips.append(frames_to_tensor(video[start:start + frames, y:y + size, x0:x0 + size]))
    return torch.cat(clips)


def _optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, lr: float) -> float:
    """One step of a VAE stage: backward, clip the gradient norm to 1, step at ``lr``; the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return float(loss.detach())


def vae_autocast(cfg: TrainConfig, device: torch.device, stage: str) -> torch.autocast:
    """bf16 autocast for a VAE stage when its ``mixed_precision`` resolves to bf16 (fp16 would need loss scaling:
    fp32)."""
    from actavatar_core.training.trainer import resolve_mixed_precision

    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=resolve_mixed_precision(cfg.stage_mixed_precision(stage), device) == "bf16")


def train_vae(cfg: TrainConfig, vae: Any, annotations: list[Annotation], log: Callable[[str], None] = print,
              progress: bool = True) -> Any:
    """Train the mini VAE to reconstruct the dataset's frames (L1 + MSE), then set its per-channel latent mean and std
    as Wan's VAEs carry them, so the transformer sees unit-scale latents. Clips must be long (5+ latent frames): a
    causal VAE trained on short clips drifts when it decodes a whole video."""
    from tqdm import tqdm

    from actavatar_core.vae import frames_to_tensor

    folder = models_dir(cfg) / "vae_trained"
    if (folder / "config.json").is_file():
        from diffusers import AutoencoderKLWan

        log("vae: already trained, loading")
        return AutoencoderKLWan.from_pretrained(folder, local_files_only=True).eval()
    scfg = cfg.stage_config("vae")
    clip_frames = scfg.frames
    rng = np.random.default_rng(cfg.seed)
    pool = _frame_pool(annotations)
    device = training_device()
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=scfg.lr, weight_decay=0.0)
    batch = scfg.batch_size or 2
    bar = tqdm(total=scfg.steps, desc="vae", unit="step", disable=not progress)
    ema = None
    for step in range(scfg.steps):
        x = _clip_batch(pool, rng, batch, clip_frames, scfg.crop).to(device)
        # A deterministic autoencoder (the posterior mean): the diffusion model only ever sees that mean (Wan's
        # pipelines encode with the mode), and without sampling noise the small decoder learns several times faster.
        with vae_autocast(cfg, device, "vae"):
            z = vae.encode(x).latent_dist.mode()
            recon = vae.decode(z).sample
        recon = recon.float()
        loss = (recon - x).abs().mean() + (recon - x).square().mean()
        lr = scfg.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / scfg.steps)))
        value = _optimizer_step(loss, opt, lr)
        ema = value if ema is None else 0.97 * ema + 0.03 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
    bar.close()
    vae.eval()
    with torch.no_grad():
        zs = [vae.encode(frames_to_tensor(f[: 4 * ((len(f) - 1) // 4) + 1]).to(device)).latent_dist.mode()
              for f in pool[:32]]
        flat = torch.cat([z.transpose(0, 1).flatten(1) for z in zs], dim=1)
        mean, std = flat.mean(dim=1).cpu(), flat.std(dim=1).clamp_min(1e-3).cpu()
    vae.to("cpu")  # the transformer stages need the GPU memory; preprocessing moves the VAE back when it encodes
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    vae.save_pretrained(folder)
    log(f"vae: trained {scfg.steps} steps, final loss {ema:.4f}")
    return vae


def train_vae_decoder(cfg: TrainConfig, vae: Any, annotations: list[Annotation], log: Callable[[str], None] = print,
                      progress: bool = True) -> Any:
    """Fine-tune the VAE's decoder with its encoder frozen (as Stable Diffusion's ft-MSE VAE was made): sharper frames
    and mouths from the same latents, so the cache and every transformer stage trained on it stay valid. Trains on
    whole frames, with the loss weighted towards what moves in the clip (mouth, hands) when ``motion_weight`` > 0."""
    from tqdm import tqdm

    from actavatar_core.training.flow import motion_weights, weighted_mean
    from actavatar_core.training.trainer import lr_factor

    folder = models_dir(cfg) / "vae_tuned"
    if (folder / "config.json").is_file():
        from diffusers import AutoencoderKLWan

        log("vae_decoder: already fine-tuned, loading")
        return AutoencoderKLWan.from_pretrained(folder, local_files_only=True).eval()
    scfg = cfg.stage_config("vae_decoder")
    if (scfg.frames - 1) % 4:
        raise ValueError(f"vae_decoder.frames must be 4k+1 (the VAE's temporal stride is 4), not {scfg.frames}")
    rng = np.random.default_rng(cfg.seed + 11)
    pool = _frame_pool(annotations)
    trainable = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    device = training_device()
    vae.to(device).eval()  # no dropout or norm statistics to update; eval keeps the frozen encoder exactly as cached
    opt = torch.optim.AdamW(trainable, lr=scfg.lr, weight_decay=0.0)
    factor = lr_factor(min(50, scfg.steps // 10), scfg.steps, scfg.schedule)
    batch = scfg.batch_size or 1
    bar = tqdm(total=scfg.steps, desc="vae_decoder", unit="step", disable=not progress)
    ema = None
    for step in range(scfg.steps):
        x = _clip_batch(pool, rng, batch, scfg.frames, scfg.crop).to(device)
        with torch.no_grad():  # fp32, exactly the latents the cache holds
            z = vae.encode(x).latent_dist.mode()
        with vae_autocast(cfg, device, "vae_decoder"):
            recon = vae.decode(z).sample
        recon = recon.float()
        weights = motion_weights(x, scfg.motion_weight) if scfg.motion_weight > 0 else None
        diff = recon - x
        loss = weighted_mean(diff.abs(), weights) + weighted_mean(diff.square(), weights)
        value = _optimizer_step(loss, opt, scfg.lr * factor(step))
        ema = value if ema is None else 0.97 * ema + 0.03 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
    bar.close()
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.to("cpu").eval()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    os.replace(tmp, folder)
    log(f"vae_decoder: fine-tuned {scfg.steps} steps, final loss {ema:.4f}")
    return vae


# ---------------------------------------------------------------------------------------------- whole run
def ensure_dataset(cfg: TrainConfig, log: Callable[[str], None] = print, *, dataset: str | None = None,
                   synth: dict[str, Any] | None = None) -> None:
    """Write the synthetic dataset when the folder has none and the config says how (``dataset``/``synth``: a
    stage's own data instead of the run's)."""
    dataset, synth = (dataset, synth) if dataset is not None else (cfg.dataset, cfg.synth)
    if (Path(dataset) / "annotations.jsonl").is_file() or not synth:
        return
    from .synth.writer import write_dataset

    log(f"generating the synthetic dataset in {dataset}")
    s = dict(synth)
    duration = s.get("duration", 4.0)
    write_dataset(dataset, clips=int(s.get("clips", 100)), seed=int(s.get("seed", 0)), size=int(s.get("size", 128)),
                  fps=float(s.get("fps", 25.0)), duration=tuple(duration) if isinstance(duration, list) else duration,
                  split=s.get("split", "train"), workers=int(s.get("workers", 1)), voice=s.get("voice", "synthetic"))


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True,
                 on_checkpoint: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run every configured stage in order (finished stages are skipped, an interrupted one resumes)."""
    from accelerate import PartialState

    from actavatar_core.training.trainer import StageRunner

    started = time.time()
    out = Path(cfg.output_dir)
    # One process, or this rank under torchrun / accelerate launch; cpu=True is what makes accelerate use gloo on a
    # machine without CUDA (and the state is shared with the stages' Accelerator, so it must agree with it).
    state = PartialState(cpu=not torch.cuda.is_available())
    report: dict[str, Any] = {"name": cfg.name, "stages": {}}
    # Rank 0 writes the dataset, the encoders, the VAE stages and the cache; the other ranks then find them made
    # (and load them) instead of racing it to the same files.
    with state.main_process_first():
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
            ensure_dataset(cfg, log)
        annotations = read_annotations(cfg.dataset)
        report["clips"] = len(annotations)
        models, transformer = build_models(cfg, annotations, log)
        if "vae" in cfg.stages:
            t0 = time.time()
            models.vae = train_vae(cfg, models.vae, annotations, log, progress)
            report["stages"]["vae"] = {"seconds": round(time.time() - t0, 1)}
        if "vae_decoder" in cfg.stages:
            t0 = time.time()
            models.vae = train_vae_decoder(cfg, models.vae, annotations, log, progress)
            report["stages"]["vae_decoder"] = {"seconds": round(time.time() - t0, 1)}
        t0 = time.time()
        with frozen_encoders_on_accelerator(models.vae, models.text_encoder, models.audio_encoder):
            cache = preprocess(annotations, cfg.cache_dir, vae=models.vae, text_encoder=models.text_encoder,
                               tokenizer=models.tokenizer, audio_encoder=models.audio_encoder,
                               audio_config=models.audio_config, text_len=cfg.text_len,
                               window=transformer.config.audio_window, shard_size=cfg.shard_size,
                               progress=progress and state.is_main_process)
        report["preprocess_seconds"] = round(time.time() - t0, 1)
        stage_caches = {}
        for stage in [s for s in cfg.stages if cfg.stage_config(s).data]:
            data = cfg.stage_config(stage).data
            if state.is_main_process:
                ensure_dataset(cfg, log, dataset=data["dataset"], synth=data.get("synth"))
            stage_annotations = read_annotations(data["dataset"])
            log(f"{stage}: its own {len(stage_annotations)} clips from {data['dataset']}")
            t0 = time.time()
            with frozen_encoders_on_accelerator(models.vae, models.text_encoder, models.audio_encoder):
                stage_caches[stage] = preprocess(
                    stage_annotations, cfg.stage_cache_dir(stage), vae=models.vae, text_encoder=models.text_encoder,
                    tokenizer=models.tokenizer, audio_encoder=models.audio_encoder, audio_config=models.audio_config,
                    text_len=cfg.text_len, window=transformer.config.audio_window, shard_size=cfg.shard_size,
                    progress=progress and state.is_main_process, reuse=cache)
            report[f"preprocess_seconds_{stage}"] = round(time.time() - t0, 1)
    dataset = CachedClips(cache)
    previous = None
    validator = make_validator(cfg, models, annotations[0])
    for stage in [s for s in cfg.stages if s not in ("vae", "vae_decoder")]:
        if previous is not None:
            load_stage_weights(transformer, out / previous)
        stage_clips = CachedClips(stage_caches[stage]) if stage in stage_caches else dataset
        runner = StageRunner(cfg, stage, transformer, stage_clips, log=log, progress=progress,
                             on_checkpoint=(lambda step, s=stage: on_checkpoint(s, step)) if on_checkpoint else None,
                             validator=validator)
        report["stages"][stage] = runner.run()
        transformer = runner.model
        previous = stage
    if previous is not None and cfg.stage_config(previous).train != "lora":
        load_stage_weights(transformer, out / previous)
    models.transformer = transformer.eval()
    report["seconds"] = round(time.time() - started, 1)
    if state.is_main_process:
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return {"report": report, "models": models}


def load_trained_run(run_dir: "str | Path") -> ActAvatarModels:
    """A finished run's model straight from its folder (``config.json``, ``models/`` and the last stage's weights),
    without its dataset or cache: how runs trained on another machine (a lent GPU, a cluster) are scored here."""
    from actavatar_core.errors import ActAvatarError

    run = Path(run_dir)
    cfg = read_run_config(run)
    stages = [s for s in cfg.stages if s not in ("vae", "vae_decoder")]
    if not stages or not (run / stages[-1] / "done.json").is_file():
        raise ActAvatarError(f"'{run}' has not finished {stages[-1] if stages else 'any transformer stage'}.",
                             "Finish the run (actavatar train resumes it) before scoring it.")
    if cfg.stage_config(stages[-1]).train == "lora":
        raise ActAvatarError(f"'{run}' ends in a LoRA stage, which this loader does not merge.",
                             "Score its exported model folder instead (bench method --model).")
    if cfg.models.get("init", "mini-scratch") == "mini-scratch" and not (models_dir(cfg) / "spiece.model").is_file():
        raise ActAvatarError(f"'{run}' lacks its encoders (models/spiece.model).", "Copy the run's models/ folder too.")
    models, transformer = build_models(cfg, [], log=lambda _msg: None)
    load_stage_weights(transformer, run / stages[-1])
    models.transformer = transformer.eval()
    return models
