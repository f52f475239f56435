"""Real encoded audio made with FFmpeg (and espeak-ng for speech), for the tests and the benchmarks.

    from audio_factory import make_audio, audio_bytes, FORMATS
    path = make_audio(tmp_path, "mp3", seconds=2.0, sample_rate=44100, channels=2)
    path = make_audio(tmp_path, "ogg", signal="speech")
    data = audio_bytes("wav16", seconds=10.0, sample_rate=44100, channels=2, signal="noise", seed=3)

Formats (FORMATS): wav16, wav24, wavf32, flac, mp3, ogg (Vorbis), opus (Ogg Opus), m4a (AAC),
webm (Opus). Opus files are always encoded, and decode, at 48 kHz (the codec's design): for
them `sample_rate` is only the rate the signal is generated at.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

# fmt -> (file extension, FFmpeg encoder arguments)
FORMATS: dict[str, tuple[str, list[str]]] = {
    "wav16": ("wav", ["-c:a", "pcm_s16le"]),
    "wav24": ("wav", ["-c:a", "pcm_s24le"]),
    "wavf32": ("wav", ["-c:a", "pcm_f32le"]),
    "flac": ("flac", ["-c:a", "flac"]),
    "mp3": ("mp3", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    "ogg": ("ogg", ["-c:a", "libvorbis", "-q:a", "4"]),
    "opus": ("opus", ["-c:a", "libopus", "-b:a", "64k"]),
    "m4a": ("m4a", ["-c:a", "aac", "-b:a", "128k"]),
    "webm": ("webm", ["-c:a", "libopus", "-b:a", "64k"]),
}

OPUS_SAMPLE_RATE = 48_000
_OPUS_FORMATS = {"opus", "webm"}

SPEECH_TEXT = "a dog is barking while a man speaks"


def make_audio(
    tmp_path: Path,
    fmt: str,
    seconds: float = 1.0,
    sample_rate: int = 16_000,
    channels: int = 1,
    signal: str = "tone",
    name: str | None = None,
    seed: int = 7,
) -> Path:
    """Encode `seconds` of audio with FFmpeg and return the file's path (in tmp_path).

    signal: "tone" (a different sine per channel, so a wrong down-mix shows), "noise"
    (white noise at 0.3 amplitude from `seed`, the same on every channel) or "speech" (espeak-ng
    saying SPEECH_TEXT, padded or cut to `seconds`, on every channel).
    """
    extension, codec_args = FORMATS[fmt]
    out = Path(tmp_path) / f"{name or f'{fmt}_{sample_rate}hz_{channels}ch_{seconds:g}s'}.{extension}"
    duration_args = ["-t", f"{seconds}"]
    if signal == "tone":
        expressions = "|".join(f"0.5*sin(2*PI*{220 * (k + 2)}*t)" for k in range(channels))
        inputs = ["-f", "lavfi", "-i", f"aevalsrc={expressions}:s={sample_rate}:d={seconds}"]
    elif signal == "noise":
        inputs = ["-f", "lavfi", "-i", f"anoisesrc=a=0.3:c=white:r={sample_rate}:d={seconds}:seed={seed}"]
    elif signal == "speech":
        spoken = out.with_suffix(".espeak.wav")
        _run([_tool("espeak-ng"), "-w", str(spoken), SPEECH_TEXT])
        inputs = ["-i", str(spoken), "-af", "apad"]
    else:
        raise ValueError(f"unknown signal {signal!r}")
    command = [_tool("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *inputs, *duration_args]
    encoded_rate = OPUS_SAMPLE_RATE if fmt in _OPUS_FORMATS else sample_rate
    command += ["-ar", str(encoded_rate), "-ac", str(channels), *codec_args, str(out)]
    _run(command)
    return out


def audio_bytes(fmt: str, **make_audio_args) -> bytes:
    """The encoded file make_audio writes, as bytes (made in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        return make_audio(Path(folder), fmt, **make_audio_args).read_bytes()


def _run(command: list[str]) -> None:
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr.strip()}")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install ffmpeg espeak-ng)")
    return path


def float_wav_bytes(waveform, sample_rate: int) -> bytes:
    """An IEEE-float 32-bit WAV holding `waveform` (channels, n_frames) exactly as given,
    NaN and infinity included (which no encoder would write). For short test signals."""
    channels, n_frames = waveform.shape
    samples = waveform.t().flatten().tolist()  # interleaved frames
    data = struct.pack(f"<{len(samples)}f", *samples)
    fmt_chunk = struct.pack("<HHIIHH", 3, channels, sample_rate, sample_rate * channels * 4, channels * 4, 32)
    chunks = b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def b64(data: bytes) -> str:
    """Audio bytes as the base64 text the JSON request styles carry."""
    return base64.b64encode(data).decode("ascii")
