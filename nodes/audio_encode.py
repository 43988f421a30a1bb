"""Audio Encode: the speech -> ACTAVATAR_AUDIO (wav2vec2 hidden states, windowed per latent frame by the engine)."""

from __future__ import annotations

from comfy_api.latest import io

from . import comfy_bridge as bridge
from . import conventions as conv
from .values import AudioEmbeds, AudioEncoderType


def _encoder_function(audio_encoder):
    """wav2vec2 on a (clip-fitted) 16 kHz waveform, run under ComfyUI's model management."""

    def encode(waveform):
        from actavatar_core.audio import wav2vec2_hidden_states

        with audio_encoder.managed.use() as model:
            bridge.throw_if_interrupted()
            return wav2vec2_hidden_states(model, waveform, audio_encoder.do_normalize).to(bridge.intermediate_device())

    return encode


class ActAvatarAudioEncode(io.ComfyNode):
    """Speech for the avatar: ComfyUI AUDIO + our audio encoder, or core's AUDIO_ENCODER_OUTPUT (from core's
    AudioEncoderLoader/AudioEncoderEncode, so your wav2vec2 file can be reused) -> ACTAVATAR_AUDIO.

    The speech is checked here (rate, silence, corruption). The windows per latent frame need the clip's frame rate
    and length, which the Sampler knows (from the Phase Prompt), so the wav2vec2 features are computed for that
    clip when the Sampler runs and cached for re-runs.
    """

    REQUIRES = ("transformers",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarAudioEncode", display_name="ActAvatar Audio Encode", category="ActAvatar",
            description=("The speech the avatar says: connect AUDIO + an ActAvatar audio encoder, or core's "
                         "AudioEncoderEncode output (AUDIO_ENCODER_OUTPUT) from a wav2vec2 audio encoder."),
            inputs=[
                io.Audio.Input("audio", optional=True, tooltip="The speech (e.g. from LoadAudio)."),
                AudioEncoderType.Input("audio_encoder", optional=True,
                                       tooltip="ActAvatar Audio Encoder Loader's wav2vec2."),
                io.AudioEncoderOutput.Input("audio_encoder_output", optional=True,
                                            tooltip="Instead of audio_encoder: core's AudioEncoderEncode output "
                                                    "(wav2vec2 only). Connect the same AUDIO too, so the saved "
                                                    "video carries the speech."),
            ],
            outputs=[AudioEmbeds.Output(display_name="audio_embeds")],
        )

    @classmethod
    def execute(cls, audio=None, audio_encoder=None, audio_encoder_output=None) -> io.NodeOutput:
        from actavatar_core.errors import AudioInputError

        if audio_encoder_output is not None:
            return io.NodeOutput(conv.speech_from_encoder_output(audio_encoder_output, audio))
        if audio is None or audio_encoder is None:
            raise AudioInputError("ActAvatar Audio Encode needs the speech AUDIO and an audio encoder (or core's "
                                  "AUDIO_ENCODER_OUTPUT).",
                                  "Connect LoadAudio -> audio and ActAvatar Audio Encoder Loader -> audio_encoder.")
        return io.NodeOutput(conv.speech_from_audio(audio, _encoder_function(audio_encoder)))
