import copy
import math
from pathlib import Path

import pytest
import torch

from actavatar_core.errors import GenerationCancelled
from actavatar_core.sampling import Conditioning, SamplingOptions, cancel_check, make_scheduler, sample


class CountingModel(torch.nn.Module):
    """Wraps a transformer and records the conditions of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    @property
    def config(self):
        return self.inner.config

    def forward(self, x, t, ctx, **kw):
        self.calls.append((ctx.abs().sum().item(), None if kw.get("audio_features") is None else kw["audio_features"].abs().sum().item(), t))
        return self.inner(x, t, ctx, **kw)


def _cond(models, frames=3, audio=True):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 16, 32, generator=g)
    neg = torch.randn(1, 16, 32, generator=g)
    feats = torch.randn(1, frames, 8, 4, 32, generator=g) if audio else None
    return Conditioning(text=text, phase_ids=torch.zeros(1, 16, dtype=torch.long), negative=neg, audio=feats)


def test_seed_repeats_bit_for_bit_and_first_frame_is_the_reference(tiny_models):
    first = torch.randn(1, 48, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    opts = SamplingOptions(steps=3, seed=7)
    a = sample(tiny_models.transformer, _cond(tiny_models), first, 3, opts)
    b = sample(tiny_models.transformer, _cond(tiny_models), first, 3, opts)
    c = sample(tiny_models.transformer, _cond(tiny_models), first, 3, SamplingOptions(steps=3, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :, :1], first)


@pytest.mark.parametrize("text_cfg, audio_cfg, audio, passes", [
    (5.0, 5.0, True, 3), (1.0, 1.0, True, 1), (5.0, 1.0, True, 2), (5.0, 5.0, False, 2), (1.0, 5.0, True, 3),
])
def test_guidance_runs_only_the_passes_it_needs(tiny_models, text_cfg, audio_cfg, audio, passes):
    model = CountingModel(tiny_models.transformer)
    first = torch.zeros(1, 48, 1, 4, 4)
    sample(model, _cond(tiny_models, audio=audio), first, 3, SamplingOptions(steps=2, text_cfg=text_cfg, audio_cfg=audio_cfg))
    assert len(model.calls) == 2 * passes
    if passes == 3:
        audio_sums = [c[1] for c in model.calls[:3]]
        assert audio_sums[0] > 0 and audio_sums[1] > 0 and audio_sums[2] == 0  # last pass: no audio
    # the reference frame's tokens get timestep 0, the rest the current timestep
    t = model.calls[0][2]
    assert t.shape == (1, 3 * 4) and (t[0, :4] == 0).all() and (t[0, 4:] > 0).all()


def _one_euler_step(first, opts):
    """What a one-step Euler ``sample`` feeds the model, rebuilt by hand for 3 latent frames of 4x4:
    (scheduler, timestep, noise, model input with the clean first frame, per-token timesteps)."""
    from actavatar_core.sampling import initial_noise

    sched = make_scheduler("euler", opts.shift, 1)
    t = sched.timesteps[0]
    x = initial_noise((1, 48, 3, 4, 4), opts.seed, "cpu")
    mask = torch.ones_like(x); mask[:, :, 0] = 0
    return sched, t, x, (1 - mask) * first + mask * x, (mask[0, 0, :, ::2, ::2].flatten() * t)[None]


def test_guidance_formula(tiny_models):
    """v = v(-,-) + a (v(-,A) - v(-,-)) + t (v(T,A) - v(-,A)), checked on one Euler step against manual passes."""
    tr = tiny_models.transformer
    cond = _cond(tiny_models)
    first = torch.randn(1, 48, 1, 4, 4)
    opts = SamplingOptions(steps=1, text_cfg=3.0, audio_cfg=2.0, sampler="euler", seed=3, paca_mode="learned")
    out = sample(tr, cond, first, 3, opts)
    sched, t, x, inp, ts = _one_euler_step(first, opts)
    with torch.no_grad():
        v = lambda ctx, ids, a: tr(inp, ts, ctx, phase_ids=ids, audio_features=a, paca_mode="learned").sample
        full, text_off, none = v(cond.text, cond.phase_ids, cond.audio), v(cond.negative, None, cond.audio), v(cond.negative, None, torch.zeros_like(cond.audio))
    guided = none + 2.0 * (text_off - none) + 3.0 * (full - text_off)
    expected = sched.step(guided, t, x, return_dict=False)[0]
    torch.testing.assert_close(out[:, :, 1:], expected[:, :, 1:], rtol=1e-4, atol=1e-4)


def _phased_cond(models, frames=3):
    """A prompt of 6 base tokens, phase 1 (tokens 6-9, active on latent frames 1-2) and padding."""
    from actavatar_core.attention import PhaseRouting

    cond = _cond(models, frames)
    ids = torch.zeros(1, 16, dtype=torch.long)
    ids[0, 6:10] = 1
    cond.phase_ids = ids
    cond.routing = PhaseRouting.build(ids, [frozenset(), frozenset({1}), frozenset({1})])
    return cond


@pytest.mark.parametrize("mode", ["routed", "learned", "relay"])
def test_phase_guidance_formula(tiny_models, mode):
    """v = (text/audio guidance) + p (v(T,A) - v(B,A)), B the prompt with its phase blocks hidden from every frame
    (hard base-only routing in every mode); relay's T attends through the relay bias at the options' width."""
    from actavatar_core.attention import PhaseRouting, RelayRouting

    tr = tiny_models.transformer
    cond = _phased_cond(tiny_models)
    first = torch.randn(1, 48, 1, 4, 4)
    opts = SamplingOptions(steps=1, text_cfg=3.0, audio_cfg=2.0, sampler="euler", seed=3, paca_mode=mode, phase_cfg=2.5,
                           relay_width=0.8)
    out = sample(tr, cond, first, 3, opts)
    sched, t, x, inp, ts = _one_euler_step(first, opts)
    no_phase = PhaseRouting.build(cond.phase_ids, [frozenset()] * 3)
    with torch.no_grad():
        v = lambda ctx, ids, a, r, m=mode: tr(inp, ts, ctx, phase_ids=ids, audio_features=a, routing=r, paca_mode=m).sample
        full = v(cond.text, cond.phase_ids, cond.audio, RelayRouting(cond.routing, 0.8) if mode == "relay" else cond.routing)
        text_off = v(cond.negative, None, cond.audio, None)
        none = v(cond.negative, None, torch.zeros_like(cond.audio), None)
        base = v(cond.text, cond.phase_ids, cond.audio, no_phase, "routed")
    assert not torch.allclose(full, base)  # the phase tokens matter, so the check below can fail
    guided = none + 2.0 * (text_off - none) + 3.0 * (full - text_off) + 2.5 * (full - base)
    expected = sched.step(guided, t, x, return_dict=False)[0]
    torch.testing.assert_close(out[:, :, 1:], expected[:, :, 1:], rtol=1e-4, atol=1e-4)
    off = sample(tr, cond, first, 3, SamplingOptions(steps=1, text_cfg=3.0, audio_cfg=2.0, sampler="euler", seed=3,
                                                     paca_mode=mode))
    assert not torch.allclose(out, off)


def test_phase_guidance_costs_one_pass_and_only_when_there_are_phases(tiny_models):
    first = torch.zeros(1, 48, 1, 4, 4)
    opts = SamplingOptions(steps=2, text_cfg=5.0, audio_cfg=5.0, paca_mode="routed", phase_cfg=2.0)
    model = CountingModel(tiny_models.transformer)
    sample(model, _phased_cond(tiny_models), first, 3, opts)
    assert len(model.calls) == 2 * 4
    # a prompt with no phase block has nothing to guide towards: no extra pass, the same clip as without
    plain = _cond(tiny_models)
    from actavatar_core.attention import PhaseRouting
    plain.routing = PhaseRouting.build(plain.phase_ids, [frozenset()] * 3)
    model = CountingModel(tiny_models.transformer)
    with_pg = sample(model, plain, first, 3, opts)
    assert len(model.calls) == 2 * 3
    opts.phase_cfg = 0.0
    assert torch.equal(with_pg, sample(tiny_models.transformer, plain, first, 3, opts))


def test_cancel_stops_before_the_next_step(tiny_models):
    seen = []
    flag = {"stop": False}

    def on_step(info):
        seen.append(info.step)
        flag["stop"] = info.step == 2

    with pytest.raises(GenerationCancelled):
        sample(tiny_models.transformer, _cond(tiny_models), torch.zeros(1, 48, 1, 4, 4), 3, SamplingOptions(steps=5),
               on_step=on_step, check_cancel=cancel_check(lambda: flag["stop"]))
    assert seen == [1, 2]


def test_options_are_checked():
    for bad in (dict(sampler="ddim"), dict(paca_mode="mask"), dict(steps=0), dict(shift=0), dict(feather=-1),
                dict(phase_cfg=-1), dict(relay_width=0), dict(relay_width=-1), dict(relay_width=math.inf),
                dict(relay_width=math.nan), dict(paca_mode="relay", feather=1)):
        with pytest.raises(ValueError):
            SamplingOptions(**bad).check()
    SamplingOptions(paca_mode="relay", relay_width=0.5).check()
    SamplingOptions(paca_mode="routed", feather=1).check()


def test_relay_mode_samples_between_routed_and_learned(tiny_models):
    """sample() wraps the conditioning's routing with the options' width: a tiny width samples the routed clip, a
    huge one the learned clip, and the width really reaches the model in between."""
    tr = copy.deepcopy(tiny_models.transformer)  # the fixture is shared by the session
    with torch.no_grad():
        for block in tr.blocks:
            torch.nn.init.normal_(block.attn2.to_out[0].weight, std=0.2)  # make the text attention matter
    cond = _phased_cond(tiny_models)
    first = torch.randn(1, 48, 1, 4, 4)
    run = lambda **kw: sample(tr, cond, first, 3, SamplingOptions(steps=2, text_cfg=1.0, audio_cfg=1.0, seed=1, **kw))
    routed, learned = run(paca_mode="routed"), run(paca_mode="learned")
    assert (routed - learned).abs().max() > 1e-4
    torch.testing.assert_close(run(paca_mode="relay", relay_width=1e-3), routed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(paca_mode="relay", relay_width=1e6), learned, rtol=1e-4, atol=1e-5)
    middle = run(paca_mode="relay", relay_width=1.0)
    assert (middle - routed).abs().max() > 1e-6 and (middle - learned).abs().max() > 1e-6


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_schedulers_are_flow_matching_with_shift(sampler):
    s1, s5 = make_scheduler(sampler, 1.0, 10), make_scheduler(sampler, 5.0, 10)
    assert len(s5.timesteps) == 10 and s5.timesteps[0] > s5.timesteps[-1]
    assert s5.timesteps[5] > s1.timesteps[5]  # a larger shift keeps more steps at high noise


def test_generation_defaults_accept_relay_and_training_refuses_it(tmp_path):
    """A model's generation defaults may ask for relay (and its width); training cannot run in relay mode."""
    from actavatar_core.training.config import config_from_dict

    base = {"output_dir": str(tmp_path), "data": {"dataset": str(tmp_path)}}
    cfg = config_from_dict({**base, "paca_mode": "routed", "generation": {"paca_mode": "relay", "relay_width": 1.5}})
    assert cfg.generation == {"paca_mode": "relay", "relay_width": 1.5}
    SamplingOptions(paca_mode=cfg.generation["paca_mode"], relay_width=cfg.generation["relay_width"]).check()
    with pytest.raises(ValueError, match="training-free sampling mode"):
        config_from_dict({**base, "paca_mode": "relay"})


def test_mode_specs_of_the_method_bench():
    from actavatar_core.errors import ActAvatarError
    from actavatar_core.sampling import mode_options

    assert mode_options("relay") == {"paca_mode": "relay"} and mode_options(" routed") == {"paca_mode": "routed"}
    assert mode_options("relay=1.5") == {"paca_mode": "relay", "relay_width": 1.5}
    assert mode_options("feather=2") == {"paca_mode": "routed", "feather": 2.0}
    SamplingOptions(**mode_options("relay=0.5")).check()
    for bad in ("masked", "relay=0", "relay=wide", "feather=-1", "learned=2", "relay="):
        with pytest.raises(ActAvatarError, match="Fix:"):
            mode_options(bad)


def test_the_cli_offers_every_paca_mode_and_a_relay_width():
    from actavatar_core.attention import PACA_MODES
    from actavatar_core.pipeline_cli import _parser

    p = _parser("generate")
    modes = next(a.choices for a in p._actions if a.dest == "paca_mode")
    assert list(modes) == list(PACA_MODES)
    args = p.parse_args(["--image", "i", "--audio", "a", "--phases", "p", "--out", "o", "--paca-mode", "relay",
                         "--relay-width", "1.5"])
    assert (args.paca_mode, args.relay_width) == ("relay", 1.5)


def test_method_bench_modes_reach_the_sampler_and_bad_ones_stop_it_at_once(monkeypatch, capsys):
    import numpy as np

    import actavatar_core.pipeline as pipeline
    import actavatar_core.video as video
    from actavatar_lab import evaluation

    with pytest.raises(SystemExit) as stop:  # before any test set is written or model loaded
        evaluation.main(["method", "--modes", "learned,relay=0", "--test-set", "/nonexistent/never-written"])
    assert stop.value.code == 2 and "relay=0" in capsys.readouterr().err
    seen = []

    class Pipeline:
        def __init__(self, models):
            pass

        def generate(self, request):
            seen.append(request.options)
            raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "ActAvatarPipeline", Pipeline)
    monkeypatch.setattr(video, "read_video", lambda path: (np.zeros((5, 32, 32, 3), np.uint8), 25.0, np.zeros(800), 16000))
    ann = {"video": "x.mp4", "base": "b", "phases": [], "width": 32, "height": 32, "fps": 25.0, "num_frames": 5}
    for spec in ("relay=1.5", "feather=1", "learned"):
        with pytest.raises(RuntimeError, match="stop here"):
            evaluation.generate_clip(None, ann, Path("."), steps=1, text_cfg=1.0, audio_cfg=1.0, paca_mode=spec)
    assert [(o.paca_mode, o.relay_width, o.feather) for o in seen] == [("relay", 1.5, 0.0), ("routed", 2.0, 1.0),
                                                                     ("learned", 2.0, 0.0)]


def test_a_schedule_diffusers_cannot_finish_is_refused_up_front():
    """UniPC with a large shift squeezes its timesteps until diffusers' step asserts on the last steps; the options'
    check runs the schedule first and refuses with the fix, while the steps users run pass."""
    from actavatar_core.errors import ActAvatarError
    from actavatar_core.sampling import check_schedule

    check_schedule("unipc", 5.0, 40)
    check_schedule("unipc", 5.0, 200)
    check_schedule("euler", 5.0, 1000)
    with pytest.raises(ActAvatarError, match=r"cannot take 201 steps at shift 5.*Fix: .*euler"):
        check_schedule("unipc", 5.0, 201)
    with pytest.raises(ActAvatarError, match="cannot take 60 steps at shift 20"):
        SamplingOptions(steps=60, shift=20.0).check()
