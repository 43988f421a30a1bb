"""Speech-like audio for the synthetic clips, and the audio envelope that drives (and measures) the mouth.

Why not plain noise: the mini model's wav2vec2 features and the lip-sync metric both need speech-like structure
(voiced syllables with formants, consonant bursts, pauses between words and phrases) so that "mouth open" has an
audible cause. espeak-ng is used when it is on PATH (real phonetics); otherwise a small additive formant
synthesiser produces babble with the same timing statistics. Both are deterministic from the seed.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000

#: (F1, F2, F3) in Hz for a few vowels (adult averages).
_VOWELS = np.array([
    (730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240), (500, 1500, 2500),
    (660, 1700, 2400),
], dtype=np.float64)
_BANDWIDTHS = np.array([90.0, 110.0, 160.0])
_WORDS = (
    "the a we you they this that time day people way thing world life hand part child eye place work week case "
    "point number group problem fact good new first last long great little own other old right big high small "
    "large next early young important few public bad same able say make go know take see come think look want "
    "give use find tell ask seem feel try leave call keep let begin show hear play run move live believe bring "
    "happen write sit stand lose pay meet include continue set learn change lead understand watch follow stop "
    "create speak read spend grow open walk win teach offer remember consider appear buy serve die send build "
    "stay fall cut reach kill raise pass sell decide return explain hope develop carry break receive agree"
).split()


def _control_track(rng: np.random.Generator, duration: float, hop: float) -> dict[str, np.ndarray]:
    """Per-control-frame (hop seconds) amplitude, formants, f0 and noise level of a babbling speaker."""
    n = int(math.ceil(duration / hop)) + 1
    amp = np.zeros(n)
    noise = np.zeros(n)
    formants = np.tile(_VOWELS[5], (n, 1)).astype(np.float64)
    f0_base = float(rng.uniform(95, 230))
    tract = float(rng.uniform(0.92, 1.15))
    rate = float(rng.uniform(0.85, 1.2))
    f0 = np.full(n, f0_base)
    t = float(rng.uniform(0.0, 0.4))
    words_in_phrase = int(rng.integers(2, 6))
    phrase_start = t
    while t < duration:
        for _ in range(int(rng.integers(1, 4))):  # syllables of one word
            if rng.random() < 0.7:  # consonant onset: short noise burst
                c_len = float(rng.uniform(0.03, 0.07)) / rate
                i0, i1 = int(t / hop), int((t + c_len) / hop)
                noise[i0:i1] = rng.uniform(0.15, 0.35)
                t += c_len * 0.7
            v_len = float(rng.uniform(0.09, 0.22)) / rate
            i0, i1 = int(t / hop), max(int((t + v_len) / hop), int(t / hop) + 2)
            m = i1 - i0
            env = np.sin(np.linspace(0, math.pi, m + 2)[1:-1]) ** 0.6
            level = float(rng.uniform(0.55, 1.0))
            amp[i0:i1] = np.maximum(amp[i0:i1], (level * env)[: len(amp[i0:i1])])
            v = _VOWELS[rng.integers(len(_VOWELS))] * tract
            formants[i0:i1] = v
            # declining intonation over the phrase, a little per-syllable jitter
            f0[i0:i1] = f0_base * (1.15 - 0.25 * min(1.0, (t - phrase_start) / 2.0)) * float(rng.uniform(0.94, 1.06))
            t += v_len
        words_in_phrase -= 1
        if words_in_phrase <= 0:
            t += float(rng.uniform(0.25, 0.6))  # phrase pause: mouth closes
            words_in_phrase = int(rng.integers(2, 6))
            phrase_start = t
        else:
            t += float(rng.uniform(0.03, 0.12))  # word gap
    # smooth the formant and pitch tracks so vowels glide
    kernel = np.hanning(9)
    kernel /= kernel.sum()
    formants = np.stack([np.convolve(np.pad(formants[:, j], 4, mode="edge"), kernel, "valid") for j in range(3)], 1)
    f0 = np.convolve(np.pad(f0, 4, mode="edge"), kernel, "valid")
    return {"amp": amp, "noise": noise, "formants": formants, "f0": f0}


def synthetic_speech(rng: np.random.Generator, duration: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Babble: additive harmonics shaped by three formant resonances, plus noise bursts for consonants."""
    hop = 0.005
    track = _control_track(rng, duration, hop)
    n = int(round(duration * sample_rate))
    ts = np.arange(n) / sample_rate
    tc = np.arange(len(track["amp"])) * hop
    f0 = np.interp(ts, tc, track["f0"]) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * ts))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    amp = np.interp(ts, tc, track["amp"])
    out = np.zeros(n)
    n_harm = int(3800 // track["f0"].min())
    fmts = track["formants"]
    for k in range(1, n_harm + 1):
        freq = k * track["f0"]  # per control frame
        gain = np.ones_like(freq)
        for j in range(3):  # cascade of second-order resonances, unit gain at DC
            fj, bj = fmts[:, j], _BANDWIDTHS[j]
            gain *= fj**2 / np.sqrt((fj**2 - freq**2) ** 2 + (bj * freq) ** 2)
        gain *= (freq < sample_rate / 2 - 200) / k**0.5
        out += np.interp(ts, tc, gain) * np.sin(k * phase)
    out *= amp
    burst = rng.standard_normal(n)
    burst = np.diff(burst, prepend=0.0)  # crude high-pass: fricative-like hiss
    out = out / (np.abs(out).max() + 1e-9) + 0.6 * burst * np.interp(ts, tc, track["noise"])
    out += 0.002 * rng.standard_normal(n)  # room noise so silence is not digital zero
    out *= float(rng.uniform(0.45, 0.8)) / (np.abs(out).max() + 1e-9)
    return out.astype(np.float32)


#: The ``--voice`` choices: ``mixed`` draws per clip between the built-in babble and espeak-ng's voices.
VOICES = ("auto", "synthetic", "espeak-ng", "mixed")
#: espeak-ng's English accents and voice variants (male m1-m7, female f1-f5), all in the Debian package; crossed with
#: a speaking rate and a pitch per clip they give hundreds of distinct speakers.
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
#: Share of ``mixed`` clips spoken by the built-in babble (the rest by espeak-ng).
MIXED_SYNTHETIC_SHARE = 0.25


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def require_espeak(voice: str) -> None:
    """Refuse a voice that needs espeak-ng before any clip is rendered, with the fix."""
    if voice in ("espeak-ng", "mixed") and not espeak_available():
        from actavatar_core.errors import ActAvatarError

        raise ActAvatarError(f"--voice {voice} needs espeak-ng, which is not installed (not on PATH).",
                             "Install it (Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng), "
                             "or pass --voice synthetic.")


def espeak_speaker(rng: np.random.Generator) -> dict[str, Any]:
    """One espeak-ng speaker: accent, voice variant, words per minute, pitch (0-99) and word gap (10 ms units)."""
    accent = str(rng.choice(ESPEAK_ACCENTS))
    variant = str(rng.choice(ESPEAK_VARIANTS))
    return {"voice": accent + (f"+{variant}" if variant else ""), "speed": int(rng.integers(120, 211)),
            "pitch": int(rng.integers(20, 81)), "gap": int(rng.integers(0, 4))}


def espeak_speech(rng: np.random.Generator, duration: float, speaker: dict[str, Any],
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Random English words spoken by espeak-ng as ``speaker`` (see :func:`espeak_speaker`), phrases separated by
    commas/periods, fitted to ``duration``."""
    require_espeak("espeak-ng")
    exe = shutil.which("espeak-ng")
    n_words = max(3, int(duration * 3.2))
    words = [str(w) for w in rng.choice(_WORDS, n_words)]
    text = ""
    for i, w in enumerate(words):
        text += w + (", " if rng.random() < 0.12 else ". " if rng.random() < 0.1 else " ")
    lead = float(rng.uniform(0.0, 0.4))
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        cmd = [str(exe), "-v", speaker["voice"], "-s", str(speaker["speed"]), "-p", str(speaker["pitch"]),
               "-g", str(speaker["gap"]), "-w", str(wav_path), text]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        audio, rate = read_wav(wav_path)
    audio = resample(audio, rate, sample_rate)
    out = np.zeros(int(round(duration * sample_rate)), dtype=np.float32)
    start = int(lead * sample_rate)
    piece = audio[: max(0, len(out) - start)]
    out[start : start + len(piece)] = piece
    fade = min(len(out), int(0.02 * sample_rate))
    out[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    peak = np.abs(out).max()
    if peak > 0:
        out *= float(rng.uniform(0.45, 0.8)) / peak
    return out


def read_wav(path: "str | Path | io.BytesIO") -> tuple[np.ndarray, int]:
    """16-bit PCM WAV -> mono float32 in [-1, 1]."""
    with wave.open(str(path) if not isinstance(path, io.BytesIO) else path) as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"expected 16-bit WAV, got {8 * width}-bit")
    data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return data.reshape(-1, channels).mean(axis=1), rate


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by FFT (no scipy needed); exact length round(len * target / rate)."""
    if rate == target:
        return audio.astype(np.float32)
    n_out = int(round(len(audio) * target / rate))
    spec = np.fft.rfft(audio.astype(np.float64))
    keep = n_out // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.pad(spec, (0, keep - len(spec)))
    return (np.fft.irfft(spec, n_out) * (n_out / len(audio))).astype(np.float32)


def speech(seed: int, duration: float, sample_rate: int = SAMPLE_RATE, voice: str = "auto") -> tuple[np.ndarray, str, str]:
    """(mono float32 audio of exactly round(duration * rate) samples, voice used: 'espeak-ng' or 'synthetic',
    the speaker: 'synthetic' or espeak-ng's voice, rate and pitch, e.g. 'en-gb+f3 s150 p40 g1')."""
    if voice not in VOICES:
        raise ValueError(f"unknown voice {voice!r}; use {', '.join(VOICES)}")
    require_espeak(voice)
    rng = np.random.default_rng([int(seed), 303])
    if voice == "mixed":
        voice = "synthetic" if np.random.default_rng([int(seed), 606]).random() < MIXED_SYNTHETIC_SHARE else "espeak-ng"
    elif voice == "auto":
        voice = "espeak-ng" if espeak_available() else "synthetic"
    if voice == "synthetic":
        return synthetic_speech(rng, duration, sample_rate), "synthetic", "synthetic"
    speaker = espeak_speaker(np.random.default_rng([int(seed), 707]))
    name = f"{speaker['voice']} s{speaker['speed']} p{speaker['pitch']} g{speaker['gap']}"
    return espeak_speech(rng, duration, speaker, sample_rate), "espeak-ng", name


def speech_audio(seed: int, duration: float, sample_rate: int = SAMPLE_RATE, voice: str = "auto") -> tuple[np.ndarray, str]:
    """(mono float32 audio of exactly round(duration * rate) samples, voice used: 'espeak-ng' or 'synthetic')."""
    audio, used, _ = speech(seed, duration, sample_rate, voice)
    return audio, used


# ------------------------------------------------------------------------------------------------ envelope
def audio_envelope(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """Loudness per video frame: Hann-weighted RMS over 2 frame periods centred on the middle of frame i
    ((i + 0.5) / fps), normalised by the clip's 95th percentile so different recordings compare. Why here: the
    renderer's mouth and the lip-sync metric must use the very same audio-to-frame alignment."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    half = max(1, int(round(sample_rate / fps)))
    win = np.hanning(2 * half + 1)
    win /= win.sum()
    power = np.convolve(x**2, win, mode="same") if len(x) >= len(win) else np.full(len(x), np.mean(x**2) if len(x) else 0.0)
    centres = np.clip(np.round((np.arange(num_frames) + 0.5) / fps * sample_rate).astype(int), 0, max(len(x) - 1, 0))
    rms = np.sqrt(power[centres]) if len(x) else np.zeros(num_frames)
    ref = np.percentile(rms, 95) if num_frames else 0.0
    if ref < 1e-4:
        return np.zeros(num_frames)
    return np.clip(rms / ref, 0.0, 1.5)


def mouth_from_envelope(envelope: np.ndarray) -> np.ndarray:
    """Mouth opening in [0, 1] per frame: compressive curve (quiet syllables still open the mouth), a gate that
    shuts it in pauses, and a light 3-tap smoothing so the lips do not flicker."""
    e = np.clip(np.asarray(envelope, dtype=np.float64), 0.0, 1.0)
    m = np.where(e < 0.08, 0.0, (e - 0.08) / 0.92) ** 0.7
    if len(m) >= 3:
        m = np.convolve(np.pad(m, 1, mode="edge"), [0.25, 0.5, 0.25], "valid")
    return np.clip(m, 0.0, 1.0)
