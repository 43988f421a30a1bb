"""The ComfyUI nodes (V3 classes on the real ``comfy_api``) called in-process on tiny models, with doubles of the
ComfyUI server modules they use at run time (``tests/comfy_doubles.py``).

The strongest check: the node chain (Phase Prompt -> Phase Encode -> Audio Encode -> Sampler -> Decode) gives the
same frames, bit for bit, as the engine's one-call pipeline with the same models and seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_doubles import Interrupted, comfy, require_comfy_api  # noqa: F401 - comfy is a fixture

require_comfy_api()

from comfy_api.latest import io  # noqa: E402

from actavatar_core.errors import (  # noqa: E402
    AudioInputError, OutputPathError, PhaseScriptError, SizeError, WeightsError,
)
from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest  # noqa: E402
from actavatar_core.sampling import SamplingOptions  # noqa: E402
from actavatar_core.video import probe_video  # noqa: E402
from nodes import NODES, build_mappings, comfy_bridge as bridge, conventions as conv  # noqa: E402
from nodes.audio_encode import ActAvatarAudioEncode  # noqa: E402
from nodes.output import ActAvatarDecode, ActAvatarSaveVideo  # noqa: E402
from nodes.prompt import ActAvatarPhaseEncode, ActAvatarPhasePrompt  # noqa: E402
from nodes.sampler import ActAvatarSampler  # noqa: E402
from nodes.values import AudioEncoder, LoadedModel, TextEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "A man talks | 0-0.6s: raises the left hand | 0.6-1.2s: waves the right hand"
SAMPLER_DEFAULTS = dict(width=64, height=64, frames=0, steps=2, text_cfg=5.0, audio_cfg=5.0, shift=5.0, seed=1,
                        sampler="unipc", paca_mode="routed", feather=0.0, audio_schedule="trained", audio_gamma=1.5)


# ============================================================================================ helpers
def write_tiny_comfy_models(models: Path, seed: int = 0) -> dict[str, str]:
    """Tiny checkpoints in the community layouts under a ComfyUI ``models/`` folder, plus ActAvatar weights that fit
    them (random adapter, so audio and phases change the output). Returns {folder: file name}."""
    from community_checkpoints import COMFY_FILE_NAMES, WAV2VEC2_DEFAULTS, fill_comfy_models_folder

    from actavatar_core.loading import load_wan_transformer
    from actavatar_core.model import ActAvatarTransformer, save_actavatar_weights

    written = fill_comfy_models_folder(models, seed=seed)
    base = load_wan_transformer(written["transformer"].path, dtype=torch.float32)
    model = ActAvatarTransformer.from_base(base, audio_feature_dim=WAV2VEC2_DEFAULTS["hidden_size"],
                                           audio_num_layers=WAV2VEC2_DEFAULTS["num_layers"] + 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "audio" in name or "phase_embedding" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    save_actavatar_weights(model, models / "actavatar" / "tiny_actavatar.safetensors")
    names = {folder: Path(COMFY_FILE_NAMES[key]).name for key, folder in (
        ("transformer", "diffusion_models"), ("vae", "vae"), ("text_encoder", "text_encoders"),
        ("audio_encoder", "audio_encoders"))}
    names["actavatar"] = "tiny_actavatar.safetensors"
    return names


def handles(models):
    """Node-level handles of engine models (what the loaders return)."""
    return (LoadedModel(bridge.manage(models.transformer, "diffusion"), "tiny"),
            TextEncoder(bridge.manage(models.text_encoder, "text"), "tiny", tokenizer=models.tokenizer),
            LoadedModel(bridge.manage(models.vae, "vae"), "tiny"),
            AudioEncoder(bridge.manage(models.audio_encoder, "audio"), "tiny", do_normalize=True))


def comfy_audio(speech, seconds: float = 1.2, rate: int = 22050, channels: int = 1) -> dict:
    return {"waveform": torch.from_numpy(speech(seconds, rate, channels))[None], "sample_rate": rate}


def comfy_image(portrait: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(portrait)[None].float() / 255.0


def run(node, *args, **kwargs):
    """A node's execute as ComfyUI calls it (V3: a classmethod returning io.NodeOutput): the output tuple."""
    return node.execute(*args, **kwargs).result


def run_chain(tiny, audio, image, script=SCRIPT, fps=25.0, negative="", **sampler):
    model, te, vae, ae = handles(tiny)
    with torch.inference_mode():  # as ComfyUI runs nodes
        phase, = run(ActAvatarPhasePrompt, script, 0.0, fps, audio)
        cond, = run(ActAvatarPhaseEncode, te, phase, negative)
        embeds, = run(ActAvatarAudioEncode, audio=audio, audio_encoder=ae)
        latent, out_fps, clip_audio = run(ActAvatarSampler, model, cond, embeds, image, vae,
                                          **{**SAMPLER_DEFAULTS, **sampler})
        frames, = run(ActAvatarDecode, vae, latent, 4)
    return latent, out_fps, clip_audio, frames, embeds


@pytest.fixture(autouse=True)
def _comfy_output(comfy, tmp_path):
    comfy.set_directory("output", tmp_path / "output")
    (tmp_path / "output").mkdir()
    return comfy


# ============================================================================================ registry and schema
EXPECTED = {
    "ActAvatarModelLoader": ("ActAvatar/loaders", ("ACTAVATAR_MODEL",)),
    "ActAvatarTextEncoderLoader": ("ActAvatar/loaders", ("ACTAVATAR_TEXT_ENCODER",)),
    "ActAvatarVAELoader": ("ActAvatar/loaders", ("ACTAVATAR_VAE",)),
    "ActAvatarAudioEncoderLoader": ("ActAvatar/loaders", ("ACTAVATAR_AUDIO_ENCODER",)),
    "ActAvatarPhasePrompt": ("ActAvatar", ("PHASE_PROMPT",)),
    "ActAvatarPhaseEncode": ("ActAvatar", ("ACTAVATAR_CONDITIONING",)),
    "ActAvatarAudioEncode": ("ActAvatar", ("ACTAVATAR_AUDIO",)),
    "ActAvatarSampler": ("ActAvatar", ("LATENT", "FLOAT", "AUDIO")),
    "ActAvatarDecode": ("ActAvatar", ("IMAGE",)),
    "ActAvatarSaveVideo": ("ActAvatar", ("VIDEO",)),
    "ActAvatarPhaseTextEncode": ("ActAvatar/native", ("CONDITIONING", "CONDITIONING")),
    "ActAvatarPhaseControl": ("ActAvatar/native", ("MODEL",)),
    "ActAvatarPhaseGuider": ("ActAvatar/native", ("GUIDER",)),
}


def test_node_ids_categories_and_outputs_are_the_public_contract():
    classes, names, skipped = build_mappings()
    assert set(classes) == set(EXPECTED) and skipped == {}
    for node_id, (category, outputs) in EXPECTED.items():
        cls = classes[node_id]
        assert issubclass(cls, io.ComfyNode), node_id  # V3
        schema = cls.GET_SCHEMA()
        assert (schema.node_id, schema.category, tuple(cls.RETURN_TYPES)) == (node_id, category, outputs), node_id
        assert names[node_id] == schema.display_name == NODES[node_id][1] and names[node_id].startswith("ActAvatar ")
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)


def test_input_names_and_defaults():
    phase = ActAvatarPhasePrompt.INPUT_TYPES()
    assert list(phase["required"]) == ["phase_script", "duration", "fps"] and list(phase["optional"]) == ["audio"]
    assert phase["required"]["fps"][1]["default"] == 25.0 and phase["required"]["duration"][1]["default"] == 0.0
    default_script = conv.PhaseScript.parse(phase["required"]["phase_script"][1]["default"])
    assert len(default_script.phases) == 2 and default_script.problems() == []
    sampler = ActAvatarSampler.INPUT_TYPES()["required"]
    assert list(sampler)[:5] == ["model", "conditioning", "audio_embeds", "image", "vae"]
    assert list(sampler)[5:] == ["width", "height", "frames", "steps", "text_cfg", "audio_cfg", "shift", "seed",
                                 "sampler", "paca_mode", "feather", "audio_schedule", "audio_gamma"]
    assert (sampler["steps"][1]["default"], sampler["text_cfg"][1]["default"], sampler["audio_cfg"][1]["default"],
            sampler["shift"][1]["default"]) == (40, 5.0, 5.0, 5.0)
    assert sampler["seed"][1]["control_after_generate"] is True
    assert sampler["sampler"][0] == "COMBO" and sampler["sampler"][1]["options"] == ["unipc", "euler"]
    from actavatar_core.attention import PACA_MODES

    assert sampler["paca_mode"][1]["options"] == list(PACA_MODES)  # new engine modes appear without node edits
    assert {"routed", "learned", "global"} <= set(PACA_MODES)
    # added later: optional, so API prompts saved without it still validate, and off unless asked for
    assert "phase_cfg" not in sampler
    assert ActAvatarSampler.INPUT_TYPES()["optional"]["phase_cfg"][1]["default"] == 0.0
    assert list(ActAvatarSampler.INPUT_TYPES()["optional"]) == ["phase_cfg", "relay_width"]
    assert "relay_width" not in sampler and ActAvatarSampler.INPUT_TYPES()["optional"]["relay_width"][1]["default"] == 2.0
    classes, _, _ = build_mappings()
    control = classes["ActAvatarPhaseControl"].INPUT_TYPES()["required"]
    guider = classes["ActAvatarPhaseGuider"].INPUT_TYPES()["required"]
    # the native nodes' defaults for weights never trained for phases follow the measurement (docs/RESULTS.md):
    # no mode put more actions in their windows than routed, and phase guidance lifted none
    assert (control["mode"][1]["default"], guider["phase_cfg"][1]["default"]) == ("routed", 0.0)
    save = ActAvatarSaveVideo.INPUT_TYPES()
    assert save["hidden"] == {"prompt": ("PROMPT",), "extra_pnginfo": ("EXTRA_PNGINFO",)} and ActAvatarSaveVideo.OUTPUT_NODE


def test_widget_limits_carry_the_model_constraints():
    """Sizes by 32 up to core's MAX_RESOLUTION, frames in 4k+1 steps up to the rotary table's 4093, seeds 0..2^64-1."""
    from actavatar_core.limits import DEFAULT_LIMITS

    sampler = ActAvatarSampler.INPUT_TYPES()["required"]
    for name in ("width", "height"):
        assert {k: sampler[name][1][k] for k in ("min", "max", "step")} == {"min": 32, "max": 16384, "step": 32}
    frames = sampler["frames"][1]
    assert (frames["min"] % frames["step"], frames["step"], frames["max"]) == (1, 4, 4093)  # 1, 5, 9, ... 4093
    assert frames["max"] == DEFAULT_LIMITS.max_frames and (frames["max"] - 1) % 4 == 0 and frames["default"] == 0
    assert (sampler["seed"][1]["min"], sampler["seed"][1]["max"]) == (0, 2**64 - 1)


def test_missing_dependency_skips_only_the_nodes_that_need_it():
    classes, _, skipped = build_mappings(lambda names: [n for n in names if n == "diffusers"])
    assert "ActAvatarPhasePrompt" in classes and "ActAvatarModelLoader" not in classes
    assert skipped["ActAvatarModelLoader"] == ["diffusers"] and "ActAvatarSampler" in skipped


def _load_pack(block: str = "diffusers") -> subprocess.CompletedProcess:
    """The pack's root __init__ loaded the way ComfyUI 0.33 loads a custom node folder (exec_module, then the
    awaited comfy_entrypoint), with ``block`` unimportable; ComfyUI's own ``nodes`` module is already loaded."""
    from comfy_doubles import comfyui_dir

    code = f"""
import asyncio, importlib.abc, importlib.util, logging, sys, types
sys.path.append({str(comfyui_dir())!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if {block!r} and (name == {block!r} or name.startswith({block!r} + '.')):
            raise ImportError('blocked for the test')
sys.meta_path.insert(0, Block())
sys.modules['nodes'] = types.SimpleNamespace(MAX_RESOLUTION=16384)  # core's nodes.py, loaded before any pack
logging.basicConfig(level=logging.INFO, format='%(message)s')
spec = importlib.util.spec_from_file_location('pack_under_test', {str(ROOT / '__init__.py')!r})
module = importlib.util.module_from_spec(spec); sys.modules['pack_under_test'] = module
spec.loader.exec_module(module)
from comfy_api.latest import ComfyExtension
assert not hasattr(module, 'NODE_CLASS_MAPPINGS')  # ComfyUI would take the V1 path and skip comfy_entrypoint
extension = asyncio.run(module.comfy_entrypoint())
assert isinstance(extension, ComfyExtension)
nodes = asyncio.run(extension.get_node_list())
print('NODES', sorted(cls.GET_SCHEMA().node_id for cls in nodes), module.WEB_DIRECTORY)
"""
    env = {**os.environ, "PYTHONPATH": "", "ACTAVATAR_NO_DEMO_INPUTS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=180)


def test_pack_registers_through_comfy_entrypoint_without_diffusers():
    """No exception, the nodes that do not need diffusers registered, a log line naming what is missing."""
    out = _load_pack("diffusers")
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("NODES")][0]
    assert "ActAvatarPhasePrompt" in line and "ActAvatarSaveVideo" in line and "./web" in line
    assert "ActAvatarModelLoader" not in line and "ActAvatarSampler" not in line
    assert "missing Python package(s) diffusers" in out.stderr and "pip install -r" in out.stderr


def test_pack_without_comfy_api_loads_no_node_and_says_why():
    """A ComfyUI without the V3 API (or a broken one): ComfyUI starts, the log names the missing package."""
    out = _load_pack("comfy_api")
    assert out.returncode != 0 or "NODES []" in out.stdout  # the entry point itself needs comfy_api
    assert "ActAvatar: not loaded, a Python package is missing" in out.stderr and "comfy_api" in out.stderr


# ============================================================================================ phase prompt
@pytest.mark.parametrize("script, duration, fps, needle", [
    ("{not json", 0.0, 25.0, "not valid JSON"),
    ('{"base": "x", "phases": [{"start": 0, "end": 2, "text": "a"}, {"start": 1, "end": 3, "text": "b"}]}', 0, 25,
     "overlap"),
    ("A man | 0-5s: waves", 4.0, 25.0, "ends after the clip"),
    ("A man | 0.5-0.55s: waves", 0.0, 25.0, "too short"),
    ("| 0-1s: waves", 0.0, 25.0, "base prompt is empty"),
    ("A man | 0-1s: waves", 0.0, 0.5, "fps 0.5 is outside"),
    ("A man | 0-1s: waves", -1.0, 25.0, "duration -1 is outside"),
])
def test_validate_inputs_returns_the_engine_message(script, duration, fps, needle):
    message = ActAvatarPhasePrompt.validate_inputs(script, duration, fps)
    assert isinstance(message, str) and needle in message and "Fix:" in message


def test_validate_inputs_accepts_json_compact_and_linked_scripts():
    assert ActAvatarPhasePrompt.validate_inputs(ActAvatarPhasePrompt.INPUT_TYPES()["required"]["phase_script"][1]["default"], 0.0, 25.0) is True
    assert ActAvatarPhasePrompt.validate_inputs("A man talks | 0-2s: waves | 2-4.5s: points down", 5.0, 24.0) is True
    assert ActAvatarPhasePrompt.validate_inputs(None, 0.0, 25.0) is True  # linked: checked when it runs


def test_phase_prompt_checks_against_the_connected_audio(speech):
    audio = comfy_audio(speech, 1.0)
    with pytest.raises(PhaseScriptError, match="ends after the clip"):
        run(ActAvatarPhasePrompt, "A man | 0-2s: waves", 0.0, 25.0, audio)
    phase, = run(ActAvatarPhasePrompt, "A man | 0-1s: waves", 0.0, 24.0, audio)
    assert (phase.fps, phase.duration, phase.audio_duration) == (24.0, None, 1.0)
    assert phase.script.phases[0].text == "waves"


# ============================================================================================ end to end
def test_node_chain_equals_the_pipeline_bit_for_bit(tiny_models, portrait, speech, comfy):
    audio = comfy_audio(speech)
    latent, fps, clip_audio, frames, _ = run_chain(tiny_models, audio, comfy_image(portrait))
    reference = ActAvatarPipeline(tiny_models).generate(GenerationRequest(
        image=portrait, audio=audio, phases=SCRIPT, width=64, height=64, fps=25,
        options=SamplingOptions(steps=2, seed=1, paca_mode=SAMPLER_DEFAULTS["paca_mode"])))
    assert frames.shape == (33, 64, 64, 3) and frames.dtype == torch.float32
    assert np.array_equal((frames.numpy() * 255).round().astype(np.uint8), reference.frames)
    assert fps == 25.0 and latent["samples"].shape == (1, 48, 9, 4, 4)
    # The clip's audio: same rate and channels as the input, exactly 33 frames / 25 fps long.
    assert clip_audio["sample_rate"] == 22050 and clip_audio["waveform"].shape == (1, 1, round(33 / 25 * 22050))
    # A progress tick per sampling step, then per decoded chunk.
    assert comfy.progress_log[:2] == [(1, 2, False), (2, 2, False)]
    # Every model went through ComfyUI's load_models_gpu, the transformer with its activation memory estimate.
    loaded = dict(comfy.loads)
    assert {"ActAvatarTransformer", "ActAvatarAutoencoderKLWan"} <= set(loaded) and loaded["ActAvatarTransformer"] > 0


def test_fps_comes_from_the_phase_prompt(tiny_models, portrait, speech):
    """fps is set once: 24 fps makes a different clip length and audio windows than 25, and is the fps output."""
    audio = comfy_audio(speech)
    latent, fps, clip_audio, frames, embeds = run_chain(tiny_models, audio, comfy_image(portrait), fps=24.0)
    assert fps == 24.0 and frames.shape[0] == 29  # 1.2 s * 24 = 28.8 -> 29 frames (4k+1)
    assert latent["samples"].shape[2] == 8
    from actavatar_core.pipeline import window_speech

    speech, _ = conv.speech_from_encoder_output(embeds)
    emb = window_speech(speech, fps=24.0, num_frames=29, window=tiny_models.transformer.config.audio_window)
    assert emb.fps == 24.0 and emb.features.shape[1] == 8


def test_fixed_frames_and_bad_frames(tiny_models, portrait, speech):
    audio = comfy_audio(speech)
    latent, _, clip_audio, frames, _ = run_chain(tiny_models, audio, comfy_image(portrait), frames=41)
    assert frames.shape[0] == 41 and clip_audio["waveform"].shape[-1] == round(41 / 25 * 22050)
    with pytest.raises(PhaseScriptError, match="Use 45 or 49 frames"):
        run_chain(tiny_models, audio, comfy_image(portrait), frames=48)
    assert "Use 45 or 49 frames" in ActAvatarSampler.validate_inputs(frames=48)
    assert ActAvatarSampler.validate_inputs(frames=49) is True and ActAvatarSampler.validate_inputs(frames=0) is True
    with pytest.raises(SizeError, match="multiple of 32"):  # a size off the widget grid (API prompt): before sampling
        run_chain(tiny_models, audio, comfy_image(portrait), width=70)


def test_queue_time_clip_length_limit_names_the_longest_clip():
    """frames above the rotary table (4093 = 1024 latent frames) are refused at queue time, with the longest clip
    at the chosen fps; the Phase Prompt's duration too, at its own fps."""
    message = ActAvatarSampler.validate_inputs(frames=4097)
    assert "4093 frames" in message and "163.7 s at 25 fps" in message and "Fix:" in message
    assert ActAvatarSampler.validate_inputs(frames=4093) is True
    assert "negative" in ActAvatarSampler.validate_inputs(frames=-5)
    message = ActAvatarPhasePrompt.validate_inputs("A man talks", 300.0, 25.0)
    assert "300 s" in message and "163.7 s at 25 fps" in message and "Fix:" in message
    assert ActAvatarPhasePrompt.validate_inputs("A man talks", 300.0, 12.5) is True  # 3751 frames at 12.5 fps


def test_queue_time_checks_leave_non_numbers_to_comfyui():
    """ComfyUI reports a value it cannot convert ('abc' for an INT) on that input itself; the nodes' own checks
    must neither crash on it nor repeat a message under their other inputs."""
    assert ActAvatarSampler.validate_inputs(frames="abc") is True
    assert ActAvatarPhasePrompt.validate_inputs("A man talks", "long", 25.0) is True
    assert ActAvatarPhasePrompt.validate_inputs("A man talks", 0.0, "fast") is True
    assert "fps nan" in ActAvatarPhasePrompt.validate_inputs("A man talks", 0.0, float("nan")) or \
        "must be a number" in ActAvatarPhasePrompt.validate_inputs("A man talks", 0.0, float("nan"))


def test_each_queue_time_check_reads_only_the_inputs_it_is_about():
    """ComfyUI files a validate_inputs message under every input the function takes: the Sampler's takes only
    frames, Save Video's only filename_prefix (width, height and seed keep ComfyUI's own per-input range check)."""
    import inspect

    def params(cls):
        return [p for p in inspect.signature(cls.validate_inputs).parameters]

    assert params(ActAvatarSampler) == ["frames"]
    assert params(ActAvatarSaveVideo) == ["filename_prefix"]
    assert params(ActAvatarPhasePrompt) == ["phase_script", "duration", "fps"]


def test_script_longer_than_fixed_clip_fails_before_sampling(tiny_models, portrait, speech, comfy):
    with pytest.raises(PhaseScriptError, match="ends after the clip"):
        run_chain(tiny_models, comfy_audio(speech), comfy_image(portrait), frames=9)
    assert comfy.progress_log == []  # refused before any step


def test_audio_schedule_override_is_restored(tiny_models, portrait, speech):
    model = tiny_models.transformer
    trained = model.audio_block_scales()
    run_chain(tiny_models, comfy_audio(speech), comfy_image(portrait), audio_schedule="uniform")
    assert model.audio_block_scales() == trained and model._audio_scale_override is None


def test_interrupt_stops_within_a_step_and_restores_the_model(tiny_models, portrait, speech, monkeypatch, comfy):
    ticks = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            ticks.append(value)
            comfy.request_interrupt(True)  # the user presses Cancel during step 1

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    with pytest.raises(Interrupted):
        run_chain(tiny_models, comfy_audio(speech), comfy_image(portrait), steps=6, audio_schedule="uniform")
    assert ticks == [1]  # stopped before step 2
    assert tiny_models.transformer._audio_scale_override is None


def test_latent_preview_is_passed_to_the_progress_bar(tiny_models, portrait, speech, comfy):
    seen = []

    class Previewer:  # what latent_preview.get_previewer gives for --preview-method latent2rgb/taesd
        def decode_latent_to_preview_image(self, kind, x0):
            seen.append((kind, tuple(x0.shape)))
            return ("JPEG", None, 512)

    comfy.previewer = Previewer()
    run_chain(tiny_models, comfy_audio(speech), comfy_image(portrait))
    assert seen == [("JPEG", (1, 48, 1, 4, 4))] * 2  # one middle latent frame per step
    assert comfy.progress_log[:2] == [(1, 2, True), (2, 2, True)]


# ============================================================================================ audio
def test_audio_encode_checks_the_speech_before_any_sampling(tiny_models):
    _, _, _, ae = handles(tiny_models)
    with pytest.raises(AudioInputError, match="silent"):
        run(ActAvatarAudioEncode, audio={"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, audio_encoder=ae)
    with pytest.raises(AudioInputError, match="needs the speech AUDIO and an audio encoder"):
        run(ActAvatarAudioEncode, audio=None, audio_encoder=ae)


def core_encoder_output(model, audio: dict) -> dict:
    """What core's AudioEncoderEncode gives for this speech with the same wav2vec2: every hidden state of the whole
    speech at 16 kHz (its ``encoded_audio_all_layers``), the last as ``encoded_audio``, the sample count."""
    from actavatar_core.audio import load_waveform, wav2vec2_hidden_states

    wave = load_waveform({"waveform": audio["waveform"][0], "sample_rate": audio["sample_rate"]})
    hidden = wav2vec2_hidden_states(model, wave)  # (T, L, C)
    return {"encoded_audio": hidden[None, :, -1], "audio_samples": wave.samples.numel(),
            "encoded_audio_all_layers": [hidden[None, :, layer] for layer in range(hidden.shape[1])]}


def test_audio_encode_outputs_the_speech_features_like_core(tiny_models, speech, comfy):
    """Audio Encode runs wav2vec2 (once, here) and outputs what core's AudioEncoderEncode outputs for the same
    encoder: all hidden states of the whole speech at 50 Hz; the Sampler only windows them."""
    _, _, _, ae = handles(tiny_models)
    audio = comfy_audio(speech)
    ours, = run(ActAvatarAudioEncode, audio=audio, audio_encoder=ae)
    core = core_encoder_output(tiny_models.audio_encoder, audio)
    assert ours["audio_samples"] == core["audio_samples"] == round(1.2 * 16000)
    assert len(ours["encoded_audio_all_layers"]) == len(core["encoded_audio_all_layers"]) == 4
    for a, b in zip(ours["encoded_audio_all_layers"], core["encoded_audio_all_layers"]):
        assert a.shape == b.shape == (1, 59, 32) and torch.equal(a, b)
    assert torch.equal(ours["encoded_audio"], core["encoded_audio"])
    assert [name for name, _ in comfy.loads] == ["ActAvatarWav2Vec2Model"]  # wav2vec2 ran in Audio Encode


def test_core_audio_encoder_output_gives_the_same_clip(tiny_models, portrait, speech):
    """Core's AUDIO_ENCODER_OUTPUT through Audio Encode (with the AUDIO) gives the same latents as our own encoder's
    features; the Sampler reads the bare dict too (its socket stays ACTAVATAR_AUDIO), then with a silent audio out."""
    model, te, vae, ae = handles(tiny_models)
    audio = comfy_audio(speech)
    core = core_encoder_output(tiny_models.audio_encoder, audio)
    with torch.inference_mode():
        phase, = run(ActAvatarPhasePrompt, SCRIPT, 0.0, 25.0, audio)
        cond, = run(ActAvatarPhaseEncode, te, phase, "")
        ours, = run(ActAvatarAudioEncode, audio=audio, audio_encoder=ae)
        theirs, = run(ActAvatarAudioEncode, audio=audio, audio_encoder_output=core)
        outputs = [run(ActAvatarSampler, model, cond, embeds, comfy_image(portrait), vae, **SAMPLER_DEFAULTS)
                   for embeds in (ours, theirs, core)]
    assert torch.equal(outputs[0][0]["samples"], outputs[1][0]["samples"])
    assert torch.equal(outputs[0][0]["samples"], outputs[2][0]["samples"])
    assert torch.equal(outputs[0][2]["waveform"], outputs[1][2]["waveform"])  # the speech, fitted to the clip
    assert outputs[2][2]["waveform"].abs().max() == 0 and outputs[2][2]["waveform"].shape[-1] == round(33 / 25 * 16000)
    assert ActAvatarSampler.INPUT_TYPES()["required"]["audio_embeds"][0] == "ACTAVATAR_AUDIO"  # saved links hold


def test_audio_features_of_the_wrong_encoder_are_refused(tiny_models, portrait, speech, comfy):
    model, te, vae, _ = handles(tiny_models)
    wide = {"encoded_audio_all_layers": [torch.randn(1, 60, 768) for _ in range(13)], "audio_samples": 19200}
    embeds, = run(ActAvatarAudioEncode, audio=comfy_audio(speech), audio_encoder_output=wide)
    phase, = run(ActAvatarPhasePrompt, SCRIPT, 0.0, 25.0, None)
    cond, = run(ActAvatarPhaseEncode, te, phase, "")
    with pytest.raises(WeightsError, match="13 layers of width 768") as info:
        run(ActAvatarSampler, model, cond, embeds, comfy_image(portrait), vae, **SAMPLER_DEFAULTS)
    assert "trained on 4 layers of width 32" in str(info.value) and "Fix:" in str(info.value)
    assert comfy.progress_log == [] and not any(name == "ActAvatarAutoencoderKLWan" for name, _ in comfy.loads)


# ============================================================================================ latents
def test_latent_holds_raw_vae_latents(portrait):
    """LATENT["samples"] = normalised * std + mean with the VAE's own statistics (ComfyUI's Wan22 convention), and
    Decode of a raw LATENT equals the engine's decode of the normalised latents."""
    from actavatar_core.tiny import tiny_vae
    from actavatar_core.vae import decode_latents, encode_reference

    g = torch.Generator().manual_seed(3)
    mean = (0.3 * torch.randn(48, generator=g)).tolist()
    std = (0.5 + torch.rand(48, generator=g)).tolist()
    vae = tiny_vae(seed=0, latents_mean=mean, latents_std=std)
    normalised = torch.randn(1, 48, 3, 4, 4, generator=g)
    raw = conv.raw_latents(normalised, vae)
    expected = normalised * torch.tensor(std).view(1, 48, 1, 1, 1) + torch.tensor(mean).view(1, 48, 1, 1, 1)
    assert torch.allclose(raw, expected, atol=1e-6)
    assert torch.allclose(conv.normalised_latents(raw, vae), normalised, atol=1e-5)
    handle = LoadedModel(bridge.manage(vae, "vae"), "tiny")
    frames, = run(ActAvatarDecode, handle, {"samples": raw}, 2)
    got = (frames.numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got, decode_latents(vae, conv.normalised_latents(raw, vae)))
    # ...and matches decoding the engine's latents up to float rounding of the round trip (at most 1 level).
    assert np.abs(got.astype(int) - decode_latents(vae, normalised).astype(int)).max() <= 1


def test_decode_refuses_a_wan21_latent():
    from actavatar_core.errors import ImageInputError
    from actavatar_core.tiny import tiny_vae

    handle = LoadedModel(bridge.manage(tiny_vae(seed=0), "vae"), "tiny")
    with pytest.raises(ImageInputError, match="48 channels"):
        run(ActAvatarDecode, handle, {"samples": torch.zeros(1, 16, 3, 8, 8)}, 4)


def test_decode_is_interruptible(tiny_models, monkeypatch, comfy):
    handle = LoadedModel(bridge.manage(tiny_models.vae, "vae"), "tiny")
    comfy.request_interrupt(True)
    with pytest.raises(Interrupted):
        run(ActAvatarDecode, handle, {"samples": torch.zeros(1, 48, 5, 4, 4)}, 1)


# ============================================================================================ saving
def _frames(count=9, size=64):
    t = torch.linspace(0, 1, count)[:, None, None, None]
    return (t * torch.ones(count, size, size, 3)).float()


def save_video(*args, prompt=None, extra_pnginfo=None) -> io.NodeOutput:
    """Save Video as ComfyUI runs it: on a class clone holding the hidden PROMPT and EXTRA_PNGINFO values."""
    hidden = {io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: extra_pnginfo}
    return ActAvatarSaveVideo.PREPARE_CLASS_CLONE({"hidden_inputs": hidden}).execute(*args)


def test_save_video_writes_mp4_with_audio_metadata_and_preview(tmp_path, speech):
    audio = comfy_audio(speech, 2.0, 44100, 2)
    prompt = {"12": {"class_type": "ActAvatarSaveVideo", "inputs": {}}}
    workflow = {"nodes": [{"id": 12}], "links": []}
    result = save_video(_frames(), 25.0, "clips/AA", 18, audio, prompt=prompt, extra_pnginfo={"workflow": workflow})
    ui = result.ui.as_dict()
    assert ui["images"] == [{"filename": "AA_00001_.mp4", "subfolder": "clips", "type": "output"}]
    assert ui["animated"] == (True,)
    path = tmp_path / "output" / "clips" / "AA_00001_.mp4"
    assert result.result[0].get_stream_source() == str(path)
    info = probe_video(path)
    assert (info["video_codec"], info["frames"], info["fps"], info["width"]) == ("h264", 9, 25.0, 64)
    assert info["audio_codec"] == "aac" and info["audio_channels"] == 2 and abs(info["audio_duration"] - 9 / 25) < 0.05
    assert json.loads(info["metadata"]["prompt"]) == prompt and json.loads(info["metadata"]["workflow"]) == workflow
    assert oct(path.stat().st_mode & 0o077) != "0o0"  # readable like any new file, not private
    second = save_video(_frames(), 25.0, "clips/AA", 18, None)
    assert second.ui.as_dict()["images"][0]["filename"] == "AA_00002_.mp4"
    assert "audio_codec" not in probe_video(tmp_path / "output" / "clips" / "AA_00002_.mp4")


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", "a/../../escape", "C:/x", "..\\win"])
def test_save_video_never_writes_outside_the_output_folder(tmp_path, prefix):
    message = ActAvatarSaveVideo.validate_inputs(filename_prefix=prefix)  # at queue time: before anything runs
    assert "outside the output folder" in message and "Fix:" in message
    with pytest.raises(OutputPathError, match="outside the output folder"):
        save_video(_frames(), 25.0, prefix, 18, None)
    written = [p for p in tmp_path.rglob("*.mp4")]
    assert written == []


def test_save_video_accepts_good_prefixes_at_queue_time():
    assert ActAvatarSaveVideo.validate_inputs(filename_prefix="ActAvatar/ActAvatar") is True
    assert ActAvatarSaveVideo.validate_inputs(filename_prefix="%year%-%month%/clip_%width%") is True
    assert ActAvatarSaveVideo.validate_inputs(filename_prefix=None) is True  # linked: checked when it runs
    assert "characters" in ActAvatarSaveVideo.validate_inputs(filename_prefix="bad|name")


def test_save_video_expands_date_variables(tmp_path):
    result = save_video(_frames(), 25.0, "%year%/AA_%width%x%height%", 18, None)
    entry = result.ui.as_dict()["images"][0]
    assert entry["subfolder"].isdigit() and len(entry["subfolder"]) == 4 and entry["filename"] == "AA_64x64_00001_.mp4"


def test_cancelled_save_leaves_no_file(tmp_path, monkeypatch):
    calls = {"n": 0}

    def cancel_on_second_chunk():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupted("Processing interrupted")

    monkeypatch.setattr(bridge, "throw_if_interrupted", cancel_on_second_chunk)
    with pytest.raises(Interrupted):
        save_video(_frames(40), 25.0, "AA", 18, None)
    assert list((tmp_path / "output").rglob("*")) == []  # neither the video nor its temporary file


def test_save_video_refuses_odd_sizes(tmp_path):
    from actavatar_core.errors import ImageInputError

    with pytest.raises(ImageInputError, match="even width and height"):
        save_video(torch.zeros(5, 63, 64, 3), 25.0, "AA", 18, None)


# ============================================================================================ loaders
@pytest.fixture(scope="module")
def tiny_comfy_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    return models, write_tiny_comfy_models(models)


def _use_models_folder(comfy, models: Path):
    for folder in ("diffusion_models", "text_encoders", "vae", "audio_encoders", "actavatar"):
        comfy.set_folder_paths(folder, [models / folder])


def test_loaders_read_community_files_and_the_chain_runs(tiny_comfy_models, portrait, speech, comfy):
    from nodes.loaders import (ActAvatarAudioEncoderLoader, ActAvatarModelLoader, ActAvatarTextEncoderLoader,
                               ActAvatarVAELoader)

    models, names = tiny_comfy_models
    _use_models_folder(comfy, models)
    picker = ActAvatarModelLoader.INPUT_TYPES()["required"]["actavatar_weights"]
    assert picker[0] == "COMBO" and picker[1]["options"] == ["none", names["actavatar"]]
    model, = run(ActAvatarModelLoader, names["diffusion_models"], names["actavatar"], "auto", "auto")
    te, = run(ActAvatarTextEncoderLoader, names["text_encoders"], "fp32", "cpu")
    vae, = run(ActAvatarVAELoader, names["vae"], "auto", "auto")
    ae, = run(ActAvatarAudioEncoderLoader, names["audio_encoders"], "auto", "offload_after_use")
    assert model.module.config.audio_feature_dim == 64 and te.tokenizer is not None and ae.do_normalize is True
    assert next(model.module.parameters()).dtype == torch.float32  # auto on the CPU
    audio = comfy_audio(speech)
    with torch.inference_mode():
        phase, = run(ActAvatarPhasePrompt, SCRIPT, 0.0, 25.0, audio)
        cond, = run(ActAvatarPhaseEncode, te, phase, "")
        embeds, = run(ActAvatarAudioEncode, audio=audio, audio_encoder=ae)
        latent, fps, _ = run(ActAvatarSampler, model, cond, embeds, comfy_image(portrait), vae, **SAMPLER_DEFAULTS)
        frames, = run(ActAvatarDecode, vae, latent, 4)
    assert frames.shape == (33, 64, 64, 3) and torch.isfinite(frames).all()


def test_loader_cache_key_follows_the_file(tiny_comfy_models, comfy):
    from nodes.loaders import ActAvatarVAELoader

    models, names = tiny_comfy_models
    _use_models_folder(comfy, models)
    first = ActAvatarVAELoader.fingerprint_inputs(names["vae"], "auto", "auto")
    assert ActAvatarVAELoader.fingerprint_inputs(names["vae"], "fp32", "cpu") == first  # stable: ComfyUI's cache holds
    path = models / "vae" / names["vae"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert ActAvatarVAELoader.fingerprint_inputs(names["vae"], "auto", "auto") != first  # a replaced file reloads


def test_loader_refuses_the_wrong_kind_of_file(tiny_comfy_models, tmp_path, comfy):
    from nodes.loaders import ActAvatarModelLoader

    models, names = tiny_comfy_models
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    (folder / "oops.safetensors").write_bytes((models / "vae" / names["vae"]).read_bytes())
    comfy.set_folder_paths("diffusion_models", [folder])
    comfy.set_folder_paths("actavatar", [])
    with pytest.raises(WeightsError, match="expected") as info:
        run(ActAvatarModelLoader, "oops.safetensors", "none", "auto", "auto")
    assert "Fix:" in str(info.value)
    with pytest.raises(WeightsError, match="not in the 'diffusion_models' model folder"):
        run(ActAvatarModelLoader, "gone.safetensors", "none", "auto", "auto")


def test_bundled_mini_model_folders_are_registered(tmp_path, comfy):
    from nodes.model_folders import MINI_FILES, default_choice, register_model_folders

    for folder, name in MINI_FILES.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"x")
        comfy.set_folder_paths(folder, [])
    register_model_folders(tmp_path)
    for folder, name in MINI_FILES.items():
        assert name in bridge.filename_list(folder)
        assert default_choice(folder, bridge.filename_list(folder)) == name


# ============================================================================================ demo inputs
def test_demo_inputs_are_written_once(tmp_path):
    written = conv.write_demo_inputs(tmp_path, "ref.png", "speech.wav")
    assert [p.name for p in written] == ["ref.png", "speech.wav"]
    from PIL import Image

    from actavatar_core.audio import load_waveform

    assert Image.open(tmp_path / "ref.png").size[0] >= 64
    assert load_waveform(str(tmp_path / "speech.wav")).duration >= 2.8  # covers the shipped workflows' phases
    (tmp_path / "speech.wav").write_bytes(b"mine")
    assert conv.write_demo_inputs(tmp_path, "ref.png", "speech.wav") == []
    assert (tmp_path / "speech.wav").read_bytes() == b"mine"  # the user's file is kept


def test_memory_estimates_grow_with_the_clip():
    """What the nodes ask ComfyUI to keep free beside the weights (load_models_gpu's memory_required)."""
    from actavatar_core.tiny import TI2V_5B_TRANSFORMER

    config = type("C", (), TI2V_5B_TRANSFORMER)
    short = conv.sampling_memory_bytes(9, 80, 44, config, 2)
    long = conv.sampling_memory_bytes(31, 80, 44, config, 2)
    assert 0 < short < long and 1e9 < long < 2e10  # 704x1280, 121 frames in bf16: a few GB
    assert conv.vae_decode_memory_bytes(80, 44, 2) > conv.vae_decode_memory_bytes(40, 22, 2) > 0
    assert conv.vae_encode_memory_bytes(1280, 704, 2) == 3300 * 1280 * 704 * 2

