"""Audio Encode: the speech -> its wav2vec2 features (ACTAVATAR_AUDIO, shaped like core's AUDIO_ENCODER_OUTPUT)."""

from __future__ import annotations

from comfy_api.latest import io

from . import comfy_bridge as bridge
from . import conventions as conv
from .values import AudioEmbeds, AudioEncoderType


class ActAvatarAudioEncode(io.ComfyNode):
    """Speech for the avatar: ComfyUI AUDIO + our wav2vec2 -> the speech's features, as core's AudioEncoderEncode
    gives AUDIO_ENCODER_OUTPUT (every hidden state of the whole speech at 50 Hz), plus the speech itself.

    wav2vec2 runs here, once per speech (ComfyUI caches the output across seeds and settings); the Sampler windows
    the features per latent frame for the clip's frame rate and length (in the engine). Core's own
    AUDIO_ENCODER_OUTPUT can come in instead of our encoder (connect the same AUDIO so the saved video carries it),
    or go straight to the Sampler.
    """

    REQUIRES = ("transformers",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarAudioEncode", display_name="ActAvatar Audio Encode", category="ActAvatar",
            description=("Encodes the speech the avatar says with wav2vec2: connect AUDIO + an ActAvatar audio "
                         "encoder, or core's AudioEncoderEncode output (AUDIO_ENCODER_OUTPUT) from a wav2vec2 "
                         "audio encoder."),
            inputs=[
                io.Audio.Input("audio", optional=True, tooltip="The speech (e.g. from LoadAudio)."),
                AudioEncoderType.Input("audio_encoder", optional=True,
                                       tooltip="ActAvatar Audio Encoder Loader's wav2vec2."),
                io.AudioEncoderOutput.Input("audio_encoder_output", optional=True,
                                            tooltip="Instead of audio_encoder: core's AudioEncoderEncode output "
                                                    "(wav2vec2 only). Connect the same AUDIO too, so the saved "
                                                    "video carries the speech."),
            ],
            outputs=[AudioEmbeds.Output(display_name="audio_embeds",
                                        tooltip="The speech's wav2vec2 features (all layers, 50 Hz) and the speech.")],
        )

    @classmethod
    def execute(cls, audio=None, audio_encoder=None, audio_encoder_output=None) -> io.NodeOutput:
        from actavatar_core.audio import load_waveform
        from actavatar_core.errors import AudioInputError
        from actavatar_core.pipeline import encode_speech

        if audio_encoder_output is not None:
            speech, original = conv.speech_from_encoder_output(audio_encoder_output, audio)
            return io.NodeOutput(conv.encoder_output(speech, original))
        if audio is None or audio_encoder is None:
            raise AudioInputError("ActAvatar Audio Encode needs the speech AUDIO and an audio encoder (or core's "
                                  "AUDIO_ENCODER_OUTPUT).",
                                  "Connect LoadAudio -> audio and ActAvatar Audio Encoder Loader -> audio_encoder.")
        wave = load_waveform(conv.first_item(audio))  # silent, broken or unusable speech: refused before wav2vec2 loads
        with audio_encoder.managed.use() as model:
            bridge.throw_if_interrupted()
            speech = encode_speech(model, wave.samples, sample_rate=wave.sample_rate,
                                   do_normalize=audio_encoder.do_normalize)
        speech.features = speech.features.to(bridge.intermediate_device())
        return io.NodeOutput(conv.encoder_output(speech, audio))
