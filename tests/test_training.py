"""Training smoke tests on a few tiny synthetic clips: preprocessing cache, loss going down, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from actavatar_core.training.config import config_from_dict
from actavatar_core.training.data import CachedClips, read_annotations
from actavatar_lab.recipe import build_models, run_training
from actavatar_core.training.trainer import StageRunner, load_checkpoint

SMALL = {"transformer": {"patch_size": [1, 2, 2], "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "freq_dim": 32},
         "vae": {"base_dim": 8, "decoder_base_dim": 8}, "text_encoder": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64},
         "audio_encoder": {"hidden_size": 32, "conv_dim": [16] * 7, "num_attention_heads": 2, "intermediate_size": 64,
                           "num_conv_pos_embedding_groups": 2}, "adapter": {"audio_hidden_dim": 32}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from actavatar_lab.synth.writer import write_dataset

    root = tmp_path_factory.mktemp("ds")
    write_dataset(root, clips=3, seed=0, size=64, fps=25.0, duration=1.0, workers=1, voice="synthetic")
    return root


def _cfg(tmp, dataset, **kw):
    raw = {"output_dir": str(tmp / "run"), "data": {"dataset": str(dataset)}, "text_len": 96, "models": dict(SMALL),
           "stages": ["stage0", "stage1", "stage2"], "stage0": {"steps": 4, "lr": 1e-3, "prompt": "global"},
           "stage1": {"steps": 4, "lr": 1e-3, "prompt": "caption"}, "stage2": {"steps": 4, "lr": 1e-3, "prompt": "phased"},
           "batch_size": 1, "checkpoint_every": 2, "warmup_steps": 0, "caption_dropout": 0.2, "audio_dropout": 0.2}
    raw.update(kw)
    return config_from_dict(raw)


def test_annotations_and_cache(tmp_path, dataset):
    anns = read_annotations(dataset)
    assert len(anns) == 3 and all(a.num_frames == 25 for a in anns)
    cfg = _cfg(tmp_path, dataset, stages=["stage0"], stage0={"steps": 1, "prompt": "global"})
    run_training(cfg, progress=False, log=lambda m: None)
    clips = CachedClips(cfg.cache_dir)
    item = clips[0]
    assert item["latents"].shape == (48, 7, 4, 4) and item["audio"].shape[:2] == (7, 8)  # 64 px / VAE stride 16
    assert item["ids_phased"].max() >= 1 and item["text_phased"].shape[0] == item["ids_phased"].shape[0]
    assert item["text_caption"].shape[0] < item["text_phased"].shape[0]
    index = json.loads((cfg.cache_dir / "index.json").read_text())
    assert index["complete"] and len(index["clips"]) == 3
    # a second run reuses the cache (same fingerprint) and skips the finished stage
    stamp = (cfg.cache_dir / "shard_00000.safetensors").stat().st_mtime_ns
    run_training(cfg, progress=False, log=lambda m: None)
    assert (cfg.cache_dir / "shard_00000.safetensors").stat().st_mtime_ns == stamp


def test_loss_goes_down(tmp_path, dataset):
    cfg = _cfg(tmp_path, dataset, stages=["stage0"], stage0={"steps": 60, "lr": 3e-3, "prompt": "global"},
               caption_dropout=0.0, checkpoint_every=0)
    report = run_training(cfg, progress=False, log=lambda m: None)["report"]["stages"]["stage0"]
    first, last = sum(report["first_losses"]) / 10, sum(report["last_losses"]) / 10
    assert last < 0.8 * first, (first, last)


def test_stages_train_what_the_paper_says(tmp_path, dataset):
    cfg = _cfg(tmp_path, dataset, validate_every=4, validate_steps=2)
    result = run_training(cfg, progress=False, log=lambda m: None)
    stages = result["report"]["stages"]
    model = result["models"].transformer
    adapter = sum(p.numel() for n, p in model.named_parameters() if "audio" in n)
    assert stages["stage1"]["trainable_parameters"] == adapter  # stage 1: the audio adapter only
    total = sum(p.numel() for p in model.parameters())
    assert stages["stage2"]["trainable_parameters"] == total  # stage 2: everything (full fine-tune)
    assert stages["stage0"]["trainable_parameters"] == total - adapter - model.phase_embedding.weight.numel()
    assert (tmp_path / "run" / "stage2" / "final.safetensors").is_file()
    from actavatar_core.video import probe_video

    sample = probe_video(tmp_path / "run" / "samples" / "stage2_000004.mp4")  # periodic validation sample
    assert sample["frames"] == 25 and sample["width"] == 64 and "audio_codec" in sample
    assert not (tmp_path / "run" / "stage2" / "checkpoint.pt").exists()


class Killed(Exception):
    pass


def test_checkpoint_resumes_to_the_same_state(tmp_path, dataset):
    def fresh(run):
        cfg = _cfg(tmp_path / run, dataset, stages=["stage2"], stage2={"steps": 6, "lr": 1e-3, "prompt": "phased"},
                   checkpoint_every=3, validate_every=2, validate_steps=1)  # validation must not disturb resuming
        anns = read_annotations(dataset)
        models, transformer = build_models(cfg, anns, log=lambda m: None)
        from actavatar_core.training.data import preprocess
        cache = preprocess(anns, cfg.cache_dir, vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                           audio_encoder=models.audio_encoder, audio_config=models.audio_config, text_len=cfg.text_len,
                           window=transformer.config.audio_window, progress=False)
        from actavatar_core.training.runs import make_validator

        return cfg, transformer, CachedClips(cache), make_validator(cfg, models, anns[0])

    cfg, model, data, validator = fresh("straight")
    straight = StageRunner(cfg, "stage2", model, data, progress=False, log=lambda m: None, validator=validator)
    straight.run()
    expected = {k: v.clone() for k, v in straight.model.state_dict().items()}

    cfg, model, data, validator = fresh("killed")

    def kill(step):
        raise Killed()

    with pytest.raises(Killed):
        StageRunner(cfg, "stage2", model, data, progress=False, log=lambda m: None, on_checkpoint=kill,
                    validator=validator).run()
    ckpt = load_checkpoint(tmp_path / "killed" / "run" / "stage2" / "checkpoint.pt")  # weights_only=True
    assert ckpt["step"] == 3
    cfg, model, data, validator = fresh("killed")  # a new process: fresh model, same config
    resumed = StageRunner(cfg, "stage2", model, data, progress=False, log=lambda m: None, validator=validator)
    resumed.run()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert (tmp_path / "killed" / "run" / "samples" / "stage2_000006.mp4").is_file()


def test_routed_stage2_attends_through_each_clips_own_windows(tmp_path, dataset):
    from actavatar_core.training.flow import flow_matching_loss

    cfg = _cfg(tmp_path, dataset, stages=["stage2"], paca_mode="routed", batch_size=3, caption_dropout=0.0,
               audio_dropout=0.0, checkpoint_every=0)
    result = run_training(cfg, progress=False, log=lambda m: None)
    assert result["report"]["stages"]["stage2"]["steps"] == 4
    data = CachedClips(cfg.cache_dir)
    runner = StageRunner(cfg, "stage2", result["models"].transformer, data, progress=False, log=lambda m: None)
    latents, text, ids, audio, mode, routing = runner._batch_inputs([0, 1, 2], torch.Generator().manual_seed(0),
                                                                    torch.device("cpu"))
    frames = latents.shape[2]
    assert mode == "routed" and routing.visible.shape == (3, frames, cfg.text_len)
    hidden = 0
    for b in range(3):
        active = data.script(b).active_phases(frames, data.fps(b))
        for f in range(frames):
            expected = torch.isin(ids[b], torch.tensor(sorted({0} | set(active[f]))))
            assert torch.equal(routing.visible[b, f], expected), (b, f)
            hidden += int((~expected).sum())
    assert hidden > 0  # some frames of these clips really lose sight of a phase
    model = result["models"].transformer

    def loss(route):
        return flow_matching_loss(model, latents, text, phase_ids=ids, audio=audio, shift=3.0, paca_mode="routed",
                                  generator=torch.Generator().manual_seed(1), routing=route)

    with torch.no_grad():
        assert abs(float(loss(routing)) - float(loss(None))) > 1e-6  # the mask reaches the text attention


def test_config_rejects_unknown_paca_mode(tmp_path):
    with pytest.raises(ValueError, match="paca_mode must be one of"):
        config_from_dict({"output_dir": str(tmp_path), "data": {"dataset": str(tmp_path)}, "paca_mode": "masked"})


def test_stage2_lora_trains_adapters_and_reloads(tmp_path, dataset):
    from actavatar_core.model import build_from_weights, read_actavatar_weights

    cfg = _cfg(tmp_path, dataset, stages=["stage2"], stage2={"steps": 3, "lr": 1e-2, "prompt": "phased", "train": "lora",
                                                             "lora_rank": 4})
    result = run_training(cfg, progress=False, log=lambda m: None)
    model = result["models"].transformer
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and not any(n.endswith("attn1.to_q.base_layer.weight") for n in trained)
    tensors, meta = read_actavatar_weights(tmp_path / "run" / "stage2" / "final.safetensors")
    assert meta["lora"] == {"rank": 4} and any(k.startswith("lora.") for k in tensors)
    # a fresh base with the same initial weights + the saved file reproduces the trained model's output
    _, base = build_models(cfg, read_annotations(dataset), log=lambda m: None)
    from diffusers import WanTransformer3DModel

    plain = WanTransformer3DModel(**base.base_config())
    plain.load_state_dict({k: v for k, v in base.state_dict().items() if k in plain.state_dict()})
    reloaded = build_from_weights(plain, tmp_path / "run" / "stage2" / "final.safetensors").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 16, model.config.text_dim, generator=g)
    ts = torch.full((1, 2 * 16), 400.0)
    with torch.no_grad():
        a = model.eval()(x, ts, ctx, paca_mode="learned").sample
        b = reloaded(x, ts, ctx, paca_mode="learned").sample
    torch.testing.assert_close(a, b)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    from actavatar_core.training.trainer import lr_factor

    cosine, constant = lr_factor(10, 110, "cosine"), lr_factor(10, 110, "constant")
    assert cosine(0) == pytest.approx(1 / 11) and constant(0) == pytest.approx(1 / 11)
    assert cosine(10) == pytest.approx(1.0) and constant(109) == 1.0
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    values = [cosine(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(10, 110, "linear")


def test_config_rejects_unknown_schedule(tmp_path):
    from actavatar_core.training.config import config_from_dict

    with pytest.raises(ValueError, match="stage2.schedule"):
        config_from_dict({"output_dir": str(tmp_path), "data": {"dataset": str(tmp_path)},
                          "stage2": {"steps": 2, "schedule": "step"}})


def test_cache_fingerprint_ignores_thread_count_but_sees_any_weight_change():
    from actavatar_core.training.data import fingerprints

    def fingerprint(module, extra):
        return fingerprints(module, extras=[extra])[0]

    torch.manual_seed(0)
    net = torch.nn.Linear(512, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(net, extra={"n": 1})
        torch.set_num_threads(max(2, threads))
        assert fingerprint(net, extra={"n": 1}) == one
    finally:
        torch.set_num_threads(threads)
    assert fingerprint(net, extra={"n": 2}) != one
    with torch.no_grad():
        net.weight[3, 7] = torch.nextafter(net.weight[3, 7], torch.tensor(1.0))
    assert fingerprint(net, extra={"n": 1}) != one


def test_generation_defaults_of_the_config_go_into_the_exported_model(tmp_path):
    from actavatar_lab.train_cli import _defaults

    raw = {"output_dir": str(tmp_path), "data": {"dataset": str(tmp_path)}, "shift": 3.0,
           "generation": {"text_cfg": 4.5, "paca_mode": "routed"}}
    defaults = _defaults(config_from_dict(dict(raw)))
    assert defaults["text_cfg"] == 4.5 and defaults["paca_mode"] == "routed" and defaults["shift"] == 3.0
    with pytest.raises(ValueError, match="cfg_scale"):
        config_from_dict({**raw, "generation": {"cfg_scale": 2}})


def test_vae_is_batched_over_clips_of_the_same_shape_and_matches_one_clip_at_a_time(tmp_path, dataset, monkeypatch):
    """Preprocessing encodes the VAE on several clips at once (the CPU throughput win); each clip's tensors must be
    what encoding it alone gives, and a batch must stop at the pixel budget."""
    import actavatar_core.vae as vae_module
    from actavatar_core.training import data

    cfg = _cfg(tmp_path, dataset, stages=["stage0"], stage0={"steps": 1, "prompt": "global"})
    anns = read_annotations(dataset)
    models, transformer = build_models(cfg, anns, log=lambda m: None)
    args = (models.vae, models.text_encoder, models.tokenizer, models.audio_encoder, models.audio_config,
            cfg.text_len, transformer.config.audio_window)
    alone = [data.encode_clip(a, *args) for a in anns]
    real, batches = vae_module.encode_video, []
    monkeypatch.setattr(vae_module, "encode_video", lambda vae, video: batches.append(video.shape[0]) or real(vae, video))
    clip_pixels = anns[0].num_frames * 64 * 64
    together = list(data.encode_clips(anns, *args, batch_pixels=2 * clip_pixels))
    assert batches == [2, 1]
    assert len(together) == len(alone)
    for a, b in zip(alone, together):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    batches.clear()
    list(data.encode_clips(anns, *args, batch_pixels=1))  # a budget below one clip still encodes each clip alone
    assert batches == [1, 1, 1]


def test_interrupted_cache_build_resumes_at_the_first_missing_shard(tmp_path, dataset, monkeypatch):
    import actavatar_core.training.data as data

    cfg = _cfg(tmp_path, dataset, stages=["stage0"], stage0={"steps": 1, "prompt": "global"})
    models, transformer = build_models(cfg, read_annotations(dataset), log=lambda m: None)
    real, calls = data.encode_clip, []

    def dies_on_the_third_clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "encode_clip", dies_on_the_third_clip)
    kwargs = dict(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                  audio_encoder=models.audio_encoder, audio_config=models.audio_config, text_len=cfg.text_len,
                  window=transformer.config.audio_window, shard_size=1, progress=False)
    cfg.cache_dir.mkdir(parents=True)
    (cfg.cache_dir / "index.json").write_text(json.dumps({"fingerprint": "other encoders", "complete": True}))
    with pytest.raises(KeyboardInterrupt):  # a rebuild of a stale cache, killed half-way
        data.preprocess(read_annotations(dataset), cfg.cache_dir, **kwargs)
    first = (cfg.cache_dir / "shard_00000.safetensors").stat().st_mtime_ns
    assert not json.loads((cfg.cache_dir / "index.json").read_text())["complete"]
    data.preprocess(read_annotations(dataset), cfg.cache_dir, **kwargs)
    assert len(calls) == 4  # only the missing third clip was encoded again
    assert (cfg.cache_dir / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert json.loads((cfg.cache_dir / "index.json").read_text())["complete"]


def test_motion_weights_favour_what_moves_and_keep_the_loss_scale():
    from actavatar_core.training.flow import motion_weights, weighted_mean

    clip = torch.zeros(2, 4, 5, 6, 6)
    clip[0, :, :, 2, 3] = torch.arange(5.0)  # clip 0: one moving position; clip 1: static
    w = motion_weights(clip, 3.0)
    assert w.shape == (2, 1, 5, 6, 6)
    assert torch.all(w[1] == 1.0)  # a static clip is weighted uniformly
    assert w[0, 0, 0, 2, 3] > 10 and w[0, 0, 0, 0, 0] == 1.0
    assert torch.allclose(w[0].mean(), torch.tensor(4.0))  # mean 1 + weight
    err = torch.full((2, 4, 5, 6, 6), 0.25)
    assert torch.isclose(weighted_mean(err, w), torch.tensor(0.25))  # a uniform error keeps its value
    err[0, :, :, 2, 3] = 1.0
    assert weighted_mean(err, w) > err.mean()


def test_flow_loss_without_motion_weight_is_the_plain_mse():
    import torch.nn.functional as F

    from actavatar_core.training.flow import flow_matching_loss

    class Echo(torch.nn.Module):  # predicts the noisy input: a fixed, non-trivial velocity
        def forward(self, x, t, text, **kw):
            return (x * 0.5,)

    latents = torch.randn(2, 3, 4, 4, 4)
    seen = {}

    def loss(weight):
        gen = torch.Generator().manual_seed(0)
        return flow_matching_loss(Echo(), latents, torch.zeros(2, 1, 8), phase_ids=None, audio=None, shift=3.0,
                                  generator=gen, motion_weight=weight)

    gen = torch.Generator().manual_seed(0)
    from actavatar_core.training.flow import shifted_sigmas

    s = shifted_sigmas(2, 3.0, gen).view(2, 1, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=gen)
    noisy = (1 - s) * latents + s * noise
    noisy[:, :, 0] = latents[:, :, 0]
    expected = F.mse_loss((noisy * 0.5)[:, :, 1:], (noise - latents)[:, :, 1:])
    assert torch.isclose(loss(0.0), expected)
    assert not torch.isclose(loss(2.0), expected)


def test_config_rejects_negative_motion_weight(tmp_path):
    with pytest.raises(ValueError, match="stage2.motion_weight"):
        config_from_dict({"output_dir": str(tmp_path), "data": {"dataset": str(tmp_path)},
                          "stage2": {"steps": 2, "motion_weight": -1}})
    with pytest.raises(ValueError, match="4k\\+1"):
        from actavatar_lab.recipe import train_vae_decoder

        cfg = config_from_dict({"output_dir": str(tmp_path), "data": {"dataset": str(tmp_path)},
                                "vae_decoder": {"steps": 1, "frames": 8}})
        train_vae_decoder(cfg, None, [], log=lambda m: None, progress=False)


def test_vae_decoder_stage_keeps_the_encoder_and_the_cache(tmp_path, dataset):
    from actavatar_core.training.data import fingerprints, vae_encoding_modules

    def fingerprint(*modules):
        return fingerprints(*modules, extras=[None])[0]

    cfg = _cfg(tmp_path, dataset, stages=["stage0"], stage0={"steps": 1, "prompt": "global"})
    run_training(cfg, progress=False, log=lambda m: None)
    index = json.loads((cfg.cache_dir / "index.json").read_text())
    stamp = (cfg.cache_dir / "shard_00000.safetensors").stat().st_mtime_ns
    models, _ = build_models(cfg, read_annotations(dataset), log=lambda m: None)
    before = {k: v.clone() for k, v in models.vae.state_dict().items()}
    encoder_fp = fingerprint(*vae_encoding_modules(models.vae))

    cfg = _cfg(tmp_path, dataset, stages=["vae_decoder", "stage0"], stage0={"steps": 1, "prompt": "global"},
               vae_decoder={"steps": 3, "lr": 1e-3, "frames": 9, "motion_weight": 2.0})
    result = run_training(cfg, progress=False, log=lambda m: None)
    after = result["models"].vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    assert fingerprint(*vae_encoding_modules(result["models"].vae)) == encoder_fp
    # the cache made before the decoder changed is still valid: not rebuilt
    assert json.loads((cfg.cache_dir / "index.json").read_text())["fingerprint"] == index["fingerprint"]
    assert (cfg.cache_dir / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    # a later run loads the fine-tuned decoder instead of training it again
    reloaded, _ = build_models(cfg, read_annotations(dataset), log=lambda m: None)
    assert all(torch.equal(v, after[k]) for k, v in reloaded.vae.state_dict().items())


def test_a_model_folder_exported_from_a_run_on_a_model_folder_keeps_its_tokenizer(tmp_path, dataset):
    """A run initialised from an exported folder (models.init folder) exports a folder that still carries
    tokenizer/spiece.model, so it can be exported again to ComfyUI's files (whose umT5 file holds the tokenizer)."""
    from actavatar_core.bundle import export_comfyui_files, load_model_folder
    from actavatar_core.training.runs import export_model

    first, transformer = build_models(_cfg(tmp_path / "a", dataset), read_annotations(dataset), log=lambda m: None)
    first.transformer = transformer
    export_model(first, tmp_path / "first", {"name": "first"})
    again = load_model_folder(tmp_path / "first", dtype=torch.float32)  # what a folder-initialised run trains
    export_model(again, tmp_path / "second", {"name": "second"})
    assert (tmp_path / "second" / "tokenizer" / "spiece.model").read_bytes() == first.info["spiece_model"]
    files = export_comfyui_files(load_model_folder(tmp_path / "second"), tmp_path / "comfyui")
    assert all(path.is_file() for path in files.values())


def test_a_scratch_run_can_take_its_encoders_from_a_model_folder(tmp_path, dataset):
    """models.encoders_from: the encoders, tokenizer and VAE of an existing model (so its caches stay valid), and a
    transformer built from scratch: how the untrained-for-phases variant is trained beside the shipped model."""
    from actavatar_core.training.data import fingerprints, vae_encoding_modules
    from actavatar_core.training.runs import export_model

    anns = read_annotations(dataset)
    donor, donor_transformer = build_models(_cfg(tmp_path / "a", dataset), anns, log=lambda m: None)
    with torch.no_grad():
        for p in donor_transformer.parameters():
            p.add_(1.0)  # a trained transformer that must not be carried over
    donor.transformer = donor_transformer
    export_model(donor, tmp_path / "donor", {"name": "donor"})
    cfg = _cfg(tmp_path / "b", dataset, models={**SMALL, "encoders_from": str(tmp_path / "donor")})
    messages = []
    models, transformer = build_models(cfg, anns, log=messages.append)
    assert any("from scratch" in m for m in messages)
    assert (tmp_path / "b" / "run" / "models" / "spiece.model").read_bytes() == donor.info["spiece_model"]

    def fingerprint(m):
        return fingerprints(*vae_encoding_modules(m.vae), m.text_encoder, m.audio_encoder, extras=[None])[0]

    assert fingerprint(models) == fingerprint(donor)  # the donor's caches are this run's caches
    assert all(torch.equal(v, donor.vae.state_dict()[k]) for k, v in models.vae.state_dict().items())
    donor_weights = donor_transformer.state_dict()
    assert not any(torch.equal(v, donor_weights[k]) for k, v in transformer.state_dict().items() if v.numel() > 1)


def test_vae_stage_trains_the_whole_vae_and_records_latent_statistics(tmp_path, dataset):
    cfg = _cfg(tmp_path, dataset, stages=["vae", "stage0"], stage0={"steps": 1, "prompt": "global"},
               vae={"steps": 2, "lr": 1e-3, "batch_size": 1, "frames": 9, "crop": 32})
    models, _ = build_models(cfg, read_annotations(dataset), log=lambda m: None)
    before = {k: v.clone() for k, v in models.vae.state_dict().items()}
    vae = run_training(cfg, progress=False, log=lambda m: None)["models"].vae
    after = vae.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder", "decoder"} <= changed
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == vae.config.z_dim
    assert min(vae.config.latents_std) > 0
    assert (tmp_path / "run" / "models" / "vae_trained" / "config.json").is_file()


def test_a_finished_run_reloads_from_its_folder_alone(tmp_path, dataset):
    """load_trained_run needs no dataset or cache: runs trained on another machine are scored this way."""
    import shutil

    from actavatar_core.errors import ActAvatarError
    from actavatar_lab.recipe import load_trained_run

    cfg = _cfg(tmp_path, dataset, stages=["stage0", "stage2"], checkpoint_every=0)
    trained = run_training(cfg, progress=False, log=lambda m: None)["models"].transformer.state_dict()
    moved = tmp_path / "elsewhere"
    shutil.copytree(cfg.output_dir, moved, ignore=shutil.ignore_patterns("cache"))
    shutil.rmtree(cfg.cache_dir)
    loaded = load_trained_run(moved).transformer.state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    (moved / "stage2" / "done.json").unlink()
    with pytest.raises(ActAvatarError, match="has not finished stage2"):
        load_trained_run(moved)


def test_config_json_round_trips(tmp_path, dataset):
    from actavatar_core.training.config import TrainConfig

    cfg = _cfg(tmp_path, dataset, stage2={"steps": 7, "prompt": "global", "schedule": "cosine", "motion_weight": 2.0})
    again = TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg and again.stage_config("stage2").motion_weight == 2.0


def test_mini_audio_encoder_keeps_the_loudness_a_mouth_follows():
    """The mini recipe's frozen wav2vec2 is random, so its layout decides what survives: the large layout's per-frame
    layer norm in every conv layer erased loudness (readout r about 0.5, and the shipped model's lip sync with it).
    A ridge readout of the mouth opening per latent frame from the windowed features must work on held-out clips."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from actavatar_lab.audio_readout import mouth_features, readout_r
    from actavatar_lab.recipe import MINI_WAV2VEC2

    torch.manual_seed(0)
    encoder = Wav2Vec2Model(Wav2Vec2Config(**MINI_WAV2VEC2)).eval()
    fit, test = mouth_features(encoder, range(16)), mouth_features(encoder, range(16, 24))  # 16 clips fit, 8 test
    r = readout_r(fit, test)
    assert r > 0.75, f"the mini audio encoder's features predict the mouth opening with r={r:.2f} only"


def test_a_stage_can_train_on_its_own_clips(tmp_path, dataset):
    """The paper's stage 2 fine-tunes on other (phase-annotated) clips than stage 1: a stage's own ``data`` block is
    synthesised when missing, cached with the run's frozen encoders, and only that stage trains on it."""
    own = tmp_path / "own"
    synth = {"clips": 2, "seed": 50, "size": 64, "fps": 25, "duration": 1.0}
    cfg = _cfg(tmp_path, dataset, stages=["stage0", "stage2"], checkpoint_every=0,
               stage2={"steps": 2, "lr": 1e-3, "prompt": "phased", "data": {"dataset": str(own), "synth": synth}})
    report = run_training(cfg, progress=False, log=lambda m: None)["report"]
    assert report["stages"]["stage0"]["clips"] == 3 and report["stages"]["stage2"]["clips"] == 2
    own_ids = [a.id for a in read_annotations(own)]
    assert own_ids == ["train_000000050", "train_000000051"]
    assert cfg.stage_cache_dir("stage2") == tmp_path / "run" / "cache-stage2"
    index = json.loads((cfg.stage_cache_dir("stage2") / "index.json").read_text())
    assert [e["id"] for e in index["clips"]] == own_ids
    assert len(json.loads((cfg.cache_dir / "index.json").read_text())["clips"]) == 3


def test_a_stage_cache_copies_the_clips_the_run_cache_already_holds(tmp_path, dataset, monkeypatch):
    """Stage 2's clips often contain the run's: those are copied from the run's cache (same encoders, same video
    bytes and script), bit for bit, and only the others are encoded."""
    import shutil

    from actavatar_lab.synth.writer import write_dataset
    from actavatar_core.training import data

    own = tmp_path / "own"
    shutil.copytree(dataset, own)
    extra = tmp_path / "extra"
    write_dataset(extra, clips=1, seed=7, size=64, fps=25.0, duration=1.0, workers=1, voice="synthetic")
    with open(own / "annotations.jsonl", "a") as f:
        f.write((extra / "annotations.jsonl").read_text())
    shutil.copy(extra / "clips" / "train_000000007.mp4", own / "clips")
    encoded = []
    real_encode = data.encode_clip
    monkeypatch.setattr(data, "encode_clip", lambda ann, *a, **k: encoded.append(ann.id) or real_encode(ann, *a, **k))
    cfg = _cfg(tmp_path, dataset, stages=["stage0", "stage2"], checkpoint_every=0, stage0={"steps": 1, "prompt": "global"},
               stage2={"steps": 1, "prompt": "phased", "data": {"dataset": str(own)}})
    run_training(cfg, progress=False, log=lambda m: None)
    assert encoded == [a.id for a in read_annotations(dataset)] + ["train_000000007"]  # the run's 3, then 1 new
    run_cache, stage_cache = CachedClips(cfg.cache_dir), CachedClips(cfg.stage_cache_dir("stage2"))
    for i in range(3):
        a, b = run_cache[i], stage_cache[i]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    # a clip whose video changed is encoded again, not copied
    shutil.rmtree(cfg.stage_cache_dir("stage2"))
    (own / "clips" / "train_000000001.mp4").write_bytes((own / "clips" / "train_000000000.mp4").read_bytes())
    encoded.clear()
    (tmp_path / "run" / "stage2" / "done.json").unlink()
    run_training(cfg, progress=False, log=lambda m: None)
    assert encoded == ["train_000000001", "train_000000007"]


def test_config_checks_a_stages_own_data_block(tmp_path, dataset):
    with pytest.raises(ValueError, match="stage2.data needs a 'dataset'"):
        _cfg(tmp_path, dataset, stage2={"steps": 1, "data": {"cache": "x"}})
    with pytest.raises(ValueError, match="unknown key"):
        _cfg(tmp_path, dataset, stage2={"steps": 1, "data": {"dataset": "x", "clips": 5}})
    with pytest.raises(ValueError, match="VAE stages train on the run's dataset"):
        _cfg(tmp_path, dataset, vae={"steps": 1, "data": {"dataset": "x"}})
    cfg = _cfg(tmp_path, dataset, stage2={"steps": 1, "data": {"dataset": "rel/ds", "cache": "rel/cache"}})
    assert cfg.stage_cache_dir("stage2") == Path("rel/cache") and cfg.stage_cache_dir("stage1") == cfg.cache_dir


def test_mixed_precision_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    from actavatar_core.training import trainer

    cpu, native = torch.device("cpu"), trainer.cpu_has_native_bf16()
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert trainer.resolve_mixed_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert trainer.resolve_mixed_precision("auto", cpu) == "no"
    assert trainer.resolve_mixed_precision("no", cpu) == "no" and trainer.resolve_mixed_precision("bf16", cpu) == "bf16"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    assert native == (("avx512_bf16" in flags or "amx_bf16" in flags)
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _train_watching_dtypes(cfg, dataset, monkeypatch):
    """Run ``cfg`` and record the output dtypes of the VAE decoder's and encoder's first conv and of one transformer
    layer, as (result, {"decoder", "encoder", "block"} -> set of dtypes); the hooks stay on the returned models."""
    import actavatar_lab.recipe as recipe

    seen: dict[str, set] = {"decoder": set(), "encoder": set(), "block": set()}
    models, transformer = build_models(cfg, read_annotations(dataset), log=lambda m: None)
    for name, module in (("decoder", models.vae.decoder.conv_in), ("encoder", models.vae.encoder.conv_in),
                         ("block", transformer.blocks[0].ffn.net[0].proj)):
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].add(out.dtype))
    monkeypatch.setattr(recipe, "build_models", lambda *a, **k: (models, transformer))
    return run_training(cfg, progress=False, log=lambda m: None), seen


def test_bf16_stages_compute_in_bf16_and_keep_fp32_weights(tmp_path, dataset, monkeypatch):
    """mixed_precision bf16 on the CPU: the transformer and the VAE decoder run their matmuls and convolutions in bf16
    (autocast), while the weights they update stay fp32 and the frozen encoder still encodes in fp32."""
    cfg = _cfg(tmp_path, dataset, stages=["vae_decoder", "stage0"], mixed_precision="bf16",
               stage0={"steps": 2, "prompt": "global"}, vae_decoder={"steps": 2, "lr": 1e-3, "frames": 9})
    result, seen = _train_watching_dtypes(cfg, dataset, monkeypatch)
    assert torch.bfloat16 in seen["decoder"] and torch.bfloat16 in seen["block"]
    assert seen["encoder"] == {torch.float32}  # cache encoding and the frozen encoder's training inputs stay exact
    assert result["report"]["stages"]["stage0"]["mixed_precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in result["models"].vae.parameters())
    assert all(p.dtype == torch.float32 for p in result["models"].transformer.parameters())
    assert all(torch.isfinite(torch.tensor(v)) for v in result["report"]["stages"]["stage0"]["last_losses"])
    # the trained model comes back without accelerate's autocast around its forward: it runs in fp32, as reloaded
    seen["block"].clear()
    trained = result["models"].transformer
    with torch.no_grad():
        trained(torch.randn(1, 48, 2, 8, 8), torch.full((1, 32), 400.0), torch.randn(1, 16, trained.config.text_dim))
    assert seen["block"] == {torch.float32}


def test_a_stage_pins_its_own_precision(tmp_path, dataset, monkeypatch):
    """A stage's own ``mixed_precision`` wins over the run's: here the decoder stays fp32 in a bf16 run and stage 0
    trains in bf16 (the shipped recipe keeps its VAE stages in fp32 and trains the transformer stages in bf16)."""
    cfg = _cfg(tmp_path, dataset, stages=["vae_decoder", "stage0"], mixed_precision="no",
               stage0={"steps": 2, "prompt": "global", "mixed_precision": "bf16"},
               vae_decoder={"steps": 2, "lr": 1e-3, "frames": 9, "mixed_precision": "no"})
    assert cfg.stage_mixed_precision("stage0") == "bf16" and cfg.stage_mixed_precision("vae_decoder") == "no"
    assert cfg.stage_mixed_precision("stage1") == "no"  # no pin: the run's
    result, seen = _train_watching_dtypes(cfg, dataset, monkeypatch)
    assert seen["decoder"] == {torch.float32} and torch.bfloat16 in seen["block"]
    assert result["report"]["stages"]["stage0"]["mixed_precision"] == "bf16"
    with pytest.raises(ValueError, match="stage1.mixed_precision must be one of"):
        _cfg(tmp_path, dataset, stage1={"mixed_precision": "bf17"})


def test_config_rejects_unknown_mixed_precision_and_the_cli_overrides_it(tmp_path, dataset):
    from actavatar_core.training.config import load_config

    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        _cfg(tmp_path, dataset, mixed_precision="bf17")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "r"), "data": {"dataset": str(dataset)}, "mixed_precision": "no"}))
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, {"mixed_precision": "auto"}).mixed_precision == "auto"
    shipped = json.loads((Path(__file__).resolve().parents[1] / "actavatar_lab/configs/mini.json").read_text())
    # the recipe remakes the shipped weights: transformer stages in bf16 autocast (on this CPU), the VAE in fp32
    assert shipped["mixed_precision"] == "auto"
    assert shipped["vae"]["mixed_precision"] == shipped["vae_decoder"]["mixed_precision"] == "no"


class _Lengths:
    """A stand-in for CachedClips with only what batching reads: the entries' frame counts."""

    def __init__(self, frames: list[int]):
        self.entries = [{"num_frames": f} for f in frames]

    def __len__(self) -> int:
        return len(self.entries)


def test_length_batches_is_plain_chunking_for_one_length():
    from actavatar_core.training.data import length_batches

    order = [5, 2, 7, 0, 1, 6, 3, 4, 8]
    assert length_batches([25] * 9, order, 4) == [[5, 2, 7, 0], [1, 6, 3, 4]]


def test_batches_of_mixed_lengths_hold_one_length_and_resume_exactly():
    import itertools

    from actavatar_core.training.data import iterate_forever

    frames = [49, 53, 101, 49, 53, 101, 149] * 6  # 42 clips, four lengths
    data = _Lengths(frames)
    first = list(itertools.islice(iterate_forever(data, 3, seed=7), 30))
    for _epoch, _pos, batch in first:
        assert len(batch) == 3 and len({frames[i] for i in batch}) == 1
    per_epoch = [b for e, _p, b in first if e == 0]
    seen = [i for b in per_epoch for i in b]
    assert len(seen) == len(set(seen)) and len(per_epoch) == 14  # 12, 12, 12 and 6 clips per length: every bucket fills
    # resuming at any saved (epoch, position) continues with the very same batches
    for k in (0, 5, 13, 17):
        epoch, position, _ = first[k]
        resumed = list(itertools.islice(iterate_forever(data, 3, seed=7, start_epoch=epoch, start_position=position), 8))
        assert [b for _e, _p, b in resumed] == [b for _e, _p, b in first[k + 1:k + 9]]


def test_batching_refuses_a_dataset_where_no_batch_fits():
    from actavatar_core.errors import ActAvatarError
    from actavatar_core.training.data import iterate_forever

    with pytest.raises(ActAvatarError, match="share a length.*Fix: Lower batch_size"):
        next(iterate_forever(_Lengths([49, 53, 57]), 2, seed=0))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "actavatar_lab/configs").glob("*.json")))
def test_every_shipped_training_config_loads_and_chains_onto_a_run_the_recipe_writes(name):
    """The committed configs are how the shipped weights are remade: each must load, and one that starts from a model
    folder must name one that another committed config writes (or the model before it, restored by git archive)."""
    from actavatar_core.training.config import load_config

    root = Path(__file__).resolve().parents[1] / "actavatar_lab/configs"
    cfg = load_config(root / name)
    assert cfg.stages and cfg.output_dir
    if cfg.models.get("init") == "folder":
        writers = {str(Path(load_config(p).output_dir) / "model") for p in root.glob("*.json")}
        assert cfg.models["folder"] in writers or cfg.models["folder"].startswith("runs/mini-prev/"), cfg.models["folder"]
