"""What every training run needs whatever the model's size: its models from a folder or users' files, the device,
the cache encoders on the accelerator, a finished stage's weights, periodic validation samples, and the exported
model folder. The run itself (the mini recipe's order of stages) is :mod:`actavatar_lab.recipe`."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..bundle import ActAvatarModels, load_model_folder, save_model_folder
from .config import TrainConfig
from .data import Annotation


def load_models(cfg: TrainConfig) -> tuple[ActAvatarModels, Any]:
    """(frozen encoders + VAE, base transformer) of an existing model, as the config's ``models.init`` says:
    ``folder`` (an ActAvatar model folder) or ``files`` (users' checkpoints, read by :mod:`actavatar_core.loading`).
    A folder's weights train in float32 whatever they are stored in (the bundled mini model is stored in half
    precision): AdamW's small updates vanish in half-precision parameters; autocast gives the half-precision speed."""
    init = cfg.models.get("init", "mini-scratch")
    if init == "folder":
        models = load_model_folder(cfg.models["folder"], dtype=torch.float32)
        return models, models.transformer
    if init == "files":
        from .. import loading
        from ..model import build_from_weights

        files = cfg.models["files"]
        base = loading.load_wan_transformer(files["transformer"])
        transformer = build_from_weights(base, files.get("actavatar"))
        vae = loading.load_wan_vae(files["vae"])
        text_encoder, tokenizer = loading.load_umt5(files["text_encoder"])
        audio_encoder, audio_cfg = loading.load_wav2vec2(files["audio_encoder"])
        return ActAvatarModels(transformer, vae, text_encoder, tokenizer, audio_encoder, audio_cfg), transformer
    raise ValueError(f"models.init {init!r} does not name an existing model; choose folder or files (mini-scratch "
                     "builds the mini model's encoders: actavatar_lab.recipe.build_models)")


def training_device() -> torch.device:
    """The GPU of this process (torchrun's LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def frozen_encoders_on_accelerator(*modules: torch.nn.Module) -> Iterator[None]:
    """Encode the cache on the GPU when there is one (the real Wan VAE is far too slow on a CPU), then hand the
    memory back to training: the encoders return to the CPU afterwards, since the stages never run them."""
    device = training_device()
    if device.type == "cpu":
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
        torch.cuda.empty_cache()


def read_run_config(run_dir: "str | Path") -> TrainConfig:
    """The config a run folder was trained with (its ``config.json``), pointed at where the folder is now."""
    from ..errors import ActAvatarError

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ActAvatarError(f"'{run}' has no config.json, so it is not a training run folder.",
                             "Point at the output_dir of an `actavatar train` run.")
    cfg = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    cfg.output_dir = str(run)
    return cfg


def make_validator(cfg: TrainConfig, models: ActAvatarModels, ann: Annotation) -> Callable[[str, int, Any], Path] | None:
    """Periodic validation samples: the first clip of the dataset generated from its first frame, audio and script
    with the weights of the moment, written to ``output_dir/samples/<stage>_<step>.mp4``. Sampling draws its noise
    from its own seeded generator, so validation does not disturb training's random streams (exact resume holds)."""
    if not cfg.validate_every:
        return None
    from ..pipeline import ActAvatarPipeline, GenerationRequest
    from ..sampling import SamplingOptions
    from ..video import read_video

    frames, _, audio, rate = read_video(ann.video)
    samples = Path(cfg.output_dir) / "samples"

    def validate(stage: str, step: int, transformer: Any) -> Path:
        phased = cfg.stage_config(stage).prompt == "phased"
        request = GenerationRequest(
            image=frames[0], audio={"waveform": audio[None], "sample_rate": rate}, phases=ann.script,
            width=frames.shape[2], height=frames.shape[1], fps=ann.fps, num_frames=ann.num_frames, negative="",
            phased_prompt=phased, options=SamplingOptions(steps=cfg.validate_steps, text_cfg=3.0, audio_cfg=2.0,
                                                          shift=cfg.shift, seed=0,
                                                          paca_mode=cfg.paca_mode if phased else "global"))
        bundle = ActAvatarModels(transformer, models.vae, models.text_encoder, models.tokenizer, models.audio_encoder,
                                 models.audio_config, models.info)
        with torch.no_grad():
            return ActAvatarPipeline(bundle).generate_to_file(request, samples / f"{stage}_{step:06d}.mp4",
                                                              overwrite=True).path

    return validate


def load_stage_weights(transformer: Any, stage_dir: Path) -> None:
    """Load a finished stage's weights into the transformer (in place)."""
    from ..model import apply_actavatar_weights, read_actavatar_weights

    tensors, meta = read_actavatar_weights(stage_dir / "final.safetensors")
    apply_actavatar_weights(transformer, tensors, meta, f"{stage_dir.name}/final.safetensors")


def export_model(models: ActAvatarModels, folder: "str | Path", info: dict[str, Any]) -> Path:
    """The trained model as an ActAvatar model folder (what ``--model-dir`` and the bundled default load), with the
    tokenizer's SentencePiece model beside it wherever the run's tokenizer came from (built by the recipe, or loaded
    from an earlier model folder): without it the folder could not be exported to ComfyUI's files."""
    from ..bundle import spiece_bytes
    from ..errors import WeightsError

    try:
        spm = spiece_bytes(models)
    except WeightsError:
        spm = None
    out = save_model_folder(models, folder, info=info)
    if spm:
        (Path(out) / "tokenizer" / "spiece.model").write_bytes(spm)
    return Path(out)
