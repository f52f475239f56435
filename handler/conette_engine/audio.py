"""Audio in: decode with FFmpeg, validate, resample to 32 kHz, down-mix to mono.

The output is exactly the reference's encoder input for one clip (PyPI `conette` 0.3.2,
`CoNeTTEPreprocessor._load_resample`): the clip is decoded by FFmpeg through torchcodec with
the samples `torchaudio.load` returns (float32 in [-1, 1], channels first), resampled on every
channel with `torchaudio.functional.resample(x, sr, 32000)` and its default filter, and only
then averaged over channels.

Clips are refused with an `AudioError` whose `.type` says what is wrong and whose `.message`
states the limit:

    undecodable_audio        FFmpeg cannot open or decode the data (the FFmpeg reason is given)
    audio_file_not_found     a path that is not an existing regular file
    invalid_audio_shape      a tensor that is not (n_samples,) or (channels, n_samples)
    invalid_audio_dtype      a tensor that is not floating-point (integer scale is ambiguous)
    invalid_sample_rate      not an integer in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] Hz
    unsupported_sample_rate  a rate whose exact resampling filter to 32 kHz would be huge
                             (e.g. 44101 Hz: 1.4e9 coefficients); see MAX_RESAMPLE_KERNEL_SIZE
    too_many_channels        more than MAX_CHANNELS channels
    empty_audio              no samples
    audio_too_long           longer than max_duration_s (a setting, DEFAULT_MAX_DURATION_S)
    non_finite_audio         NaN or infinite samples (tensors; decoders may produce them too)
    audio_out_of_range       a sample beyond +/-MAX_ABS_SAMPLE (float WAVs and tensors can hold any value)
    audio_too_short          fewer than MIN_SAMPLES samples at 32 kHz after resampling

Durations are checked before any expensive work: the container header's duration before
decoding (decompression bombs), the decoded length before resampling, and the decoder never
decodes more than max_duration_s + DECODE_SLACK_S seconds whatever the header claims.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
from dataclasses import dataclass

import torch
import torchaudio
from torch import Tensor
from torchcodec.decoders import AudioDecoder

from .errors import AudioError

SAMPLE_RATE = 32_000  # Hz, the encoder's input rate

# The reference's ConvNeXt crashes on clips shorter than this many samples at 32 kHz (its
# stem and downsampling layers leave no frame). There is no reference answer for them, so
# they are refused rather than padded: a padding rule would invent a caption.
MIN_SAMPLES = 7_360
MIN_DURATION_S = MIN_SAMPLES / SAMPLE_RATE  # 0.23 s

# Sanity limits on the decoded (or declared) sample rate: 1 kHz is below any real audio
# format, 384 kHz is the highest studio rate (DXD).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000

# 7.1 surround is the most any common format carries. Every channel is resampled before the
# down-mix (the reference's order), so channels multiply memory and time.
MAX_CHANNELS = 8

# Decoded PCM lies in [-1, 1]; float WAVs and tensors may hold anything. The log-mel power (STFT magnitude
# squared, float32) overflows to inf once |sample| nears 1e17 (measured: finite up to 1e17, NaN caption, score and
# tags at 1e19), so clips are refused far below that: 1000 is 60 dB above full scale, more than any real float
# recording, and keeps the power below 1e14 times its full-scale value.
MAX_ABS_SAMPLE = 1000.0

# The model was trained on 1-30 s clips; the engine's max_duration_s setting defaults to this.
DEFAULT_MAX_DURATION_S = 30.0

# How much past max_duration_s the decoder may read, so that a clip exactly at the limit is
# never cut (headers of compressed formats are approximate: an exact 5 s MP3 declares 5.04 s).
DECODE_SLACK_S = 1.0
# A clip may exceed max_duration_s by this much (encoder padding), see _check_duration.
DURATION_TOLERANCE_S = 0.1

# torchaudio's exact sinc resampler uses a filter with (new / g) * (2 * width + orig / g)
# coefficients, g = gcd(orig, new). Every common rate needs at most 0.6 M (11025 Hz); a rate
# coprime with 32000 (44101 Hz) would need 1.4e9 (5.6 GB), so such rates are refused.
MAX_RESAMPLE_KERNEL_SIZE = 4_000_000

# torchaudio.functional.resample defaults (the reference passes none of them).
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99

# torchcodec prefixes its messages with a C++ source location ("...Decoder.cpp:70, ").
_SOURCE_LOCATION = re.compile(r"^.*\.(?:cpp|h):\d+, ")
# ...and says this (with its own range arguments) when a stream holds no audio frame at all.
_NO_FRAMES_DECODED = "No audio frames were decoded"


@dataclass
class DecodedAudio:
    """One clip, ready for the encoder.

    waveform:    Tensor (n_samples,) float32, mono, at SAMPLE_RATE (32 kHz), on the CPU
    sample_rate: the sample rate of the input as decoded (or as given with a tensor), Hz
    channels:    the number of channels of the input as decoded
    duration_s:  the input's duration as decoded = n_frames / sample_rate
    """

    waveform: Tensor
    sample_rate: int
    channels: int
    duration_s: float


def decode_audio(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    max_duration_s: float | None = None,
) -> tuple[Tensor, int]:
    """Decode an encoded clip (any container/codec FFmpeg knows) from memory or a file.

    Returns (waveform, sample_rate): waveform is a Tensor (channels, n_frames) float32 in
    [-1, 1], exactly what `torchaudio.load(path)` returns for the same file (torchaudio.load
    is a thin wrapper over torchcodec's AudioDecoder, called here directly so that the
    header can be checked before decoding). Bytes decode bit-identically to the same file.

    With max_duration_s, a clip whose header declares more than max_duration_s +
    DECODE_SLACK_S is refused before decoding, and decoding stops after that many seconds
    in any case, so a small file cannot expand to hours of samples.
    """
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    if isinstance(source, bytes):
        if not source:
            raise AudioError("the audio is empty (0 bytes)", type="empty_audio")
    else:
        path = os.path.abspath(os.fspath(source))  # absolute: never read as a URL/protocol
        if not os.path.isfile(path):
            raise AudioError(f"audio file not found: {os.fspath(source)}", type="audio_file_not_found")
        source = path

    try:
        decoder = AudioDecoder(source)
    except Exception as error:  # torchcodec raises RuntimeError/ValueError with FFmpeg's reason
        raise _undecodable(error) from error
    metadata = decoder.metadata
    sample_rate = _checked_sample_rate(metadata.sample_rate)
    _check_channels(metadata.num_channels)

    stop_s = None
    if max_duration_s is not None:
        stop_s = max_duration_s + DECODE_SLACK_S
        declared_s = metadata.duration_seconds_from_header
        if declared_s is not None and declared_s > stop_s:
            raise _too_long(f"{declared_s:.1f} s long (from its header)", max_duration_s)

    try:
        waveform = decoder.get_samples_played_in_range(0.0, stop_s).data
    except Exception as error:
        raise _undecodable(error) from error
    if max_duration_s is not None:
        _check_duration(waveform.shape[-1], sample_rate, max_duration_s, decoding_stopped=True)
    return waveform, sample_rate


def prepare_waveform(waveform: Tensor, sample_rate: int, max_duration_s: float) -> DecodedAudio:
    """Validate a decoded clip, resample it to 32 kHz, then average its channels.

    waveform: Tensor (n_frames,) or (channels, n_frames), floating-point, at sample_rate Hz.
    Returns DecodedAudio with waveform (n_samples,) float32 at 32 kHz on the CPU.

    The checks run cheapest first and all before resampling, except the minimum length,
    which is a rule on the resampled length (MIN_SAMPLES at 32 kHz = 0.23 s).
    """
    if not isinstance(waveform, Tensor) or waveform.ndim not in (1, 2):
        shape = tuple(waveform.shape) if isinstance(waveform, Tensor) else type(waveform).__name__
        raise AudioError(
            f"an audio tensor must have shape (n_samples,) or (channels, n_samples), got {shape}",
            type="invalid_audio_shape",
        )
    if not waveform.is_floating_point():
        raise AudioError(
            f"an audio tensor must be floating-point with samples in [-1, 1], got {waveform.dtype}",
            type="invalid_audio_dtype",
        )
    sample_rate = _checked_sample_rate(sample_rate)
    if waveform.ndim == 1:
        waveform = waveform.unsqueeze(0)
    channels, n_frames = waveform.shape
    _check_channels(channels)
    if n_frames == 0:
        raise AudioError("the audio has no samples", type="empty_audio")
    _check_duration(n_frames, sample_rate, max_duration_s)

    waveform = waveform.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(waveform).all():
        raise AudioError("the audio contains NaN or infinite samples", type="non_finite_audio")
    peak = float(waveform.abs().max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(
            f"the audio has a sample of magnitude {peak:.3g}; samples must lie within +/-{MAX_ABS_SAMPLE:g} "
            "(audio is expected in [-1, 1])",
            type="audio_out_of_range",
        )

    if sample_rate != SAMPLE_RATE:
        waveform = _resampler(sample_rate, SAMPLE_RATE)(waveform)
    waveform = waveform.mean(dim=0)
    if waveform.shape[0] < MIN_SAMPLES:
        raise AudioError(
            f"the audio is {n_frames / sample_rate:.3f} s long; the minimum is {MIN_DURATION_S:.2f} s "
            f"({MIN_SAMPLES} samples at {SAMPLE_RATE} Hz)",
            type="audio_too_short",
        )
    return DecodedAudio(
        waveform=waveform, sample_rate=sample_rate, channels=channels, duration_s=n_frames / sample_rate
    )


def load_audio(
    source: bytes | bytearray | memoryview | str | os.PathLike | Tensor,
    sample_rate: int | None = None,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> DecodedAudio:
    """Decode (bytes or a path) or take (a tensor) one clip and prepare it for the encoder.

    source: encoded audio as bytes or a file path, or a waveform Tensor (n_frames,) or
        (channels, n_frames) in [-1, 1].
    sample_rate: the tensor's rate in Hz; None means 32 kHz, as in the reference. Encoded
        audio carries its own rate, so giving one with bytes or a path is a ValueError.
    Returns DecodedAudio (waveform (n_samples,) float32 mono at 32 kHz); raises AudioError.
    """
    if not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be positive, got {max_duration_s}")
    if isinstance(source, Tensor):
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
        return prepare_waveform(source, rate, max_duration_s)
    if sample_rate is not None:
        raise ValueError("sample_rate applies to tensors only: encoded audio carries its own rate")
    waveform, rate = decode_audio(source, max_duration_s=max_duration_s)
    return prepare_waveform(waveform, rate, max_duration_s)


def resample_kernel_size(orig_freq: int, new_freq: int) -> int:
    """Number of coefficients of torchaudio's sinc resampling filter from orig_freq to new_freq
    with the default settings (the same arithmetic as torchaudio's _get_sinc_resample_kernel)."""
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    return new * (2 * width + orig)


@functools.lru_cache(maxsize=16)
def _resampler(orig_freq: int, new_freq: int) -> torchaudio.transforms.Resample:
    """The resampler for one rate pair, its filter built once. dtype=float32 makes it compute
    the filter as torchaudio.functional.resample does for a float32 waveform (the transform's
    default computes it in float64 and rounds, which differs in the last bit). Bounded: at
    most 16 filters of at most MAX_RESAMPLE_KERNEL_SIZE coefficients (64 MB) are kept."""
    return torchaudio.transforms.Resample(
        orig_freq, new_freq, lowpass_filter_width=_LOWPASS_FILTER_WIDTH, rolloff=_ROLLOFF, dtype=torch.float32
    )


def _checked_sample_rate(sample_rate) -> int:
    try:
        rate = operator.index(sample_rate)
    except TypeError:
        raise AudioError(
            f"the sample rate must be an integer number of Hz, got {sample_rate!r}", type="invalid_sample_rate"
        ) from None
    if isinstance(sample_rate, bool) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"the sample rate {sample_rate!r} Hz is out of range; it must be between "
            f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz",
            type="invalid_sample_rate",
        )
    kernel_size = resample_kernel_size(rate, SAMPLE_RATE)
    if kernel_size > MAX_RESAMPLE_KERNEL_SIZE:
        raise AudioError(
            f"the sample rate {rate} Hz cannot be resampled to {SAMPLE_RATE} Hz at a reasonable cost "
            f"(its resampling filter would have {kernel_size:,} coefficients, the limit is "
            f"{MAX_RESAMPLE_KERNEL_SIZE:,}); convert the audio to a common rate such as 16000, 22050, "
            "44100 or 48000 Hz",
            type="unsupported_sample_rate",
        )
    return rate


def _check_channels(channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise AudioError(
            f"the audio has {channels} channels; the maximum is {MAX_CHANNELS}", type="too_many_channels"
        )
    if channels < 1:
        raise AudioError("the audio has no channels", type="empty_audio")


def _check_duration(n_frames: int, sample_rate: int, max_duration_s: float, decoding_stopped: bool = False) -> None:
    """decoding_stopped: n_frames may be where decoding was stopped, not the clip's end.

    Codec padding (AAC priming, MP3 frames) makes a clip cut at exactly the maximum decode a few tens of
    milliseconds longer; DURATION_TOLERANCE_S accepts those.
    """
    duration_s = n_frames / sample_rate
    if duration_s > max_duration_s + DURATION_TOLERANCE_S:
        qualifier = "at least " if decoding_stopped else ""
        raise _too_long(f"{qualifier}{duration_s:.1f} s long", max_duration_s)


def _too_long(how_long: str, max_duration_s: float) -> AudioError:
    return AudioError(f"the audio is {how_long}; the maximum is {max_duration_s:g} s", type="audio_too_long")


def _undecodable(error: Exception) -> AudioError:
    """The AudioError for a torchcodec failure: FFmpeg's reason, without source locations."""
    lines = str(error).strip().splitlines()
    reason = _SOURCE_LOCATION.sub("", lines[0]) if lines else ""
    if reason.startswith(_NO_FRAMES_DECODED):  # e.g. a WAV header with no data
        return AudioError("the audio has no samples (FFmpeg decoded no audio frames)", type="empty_audio")
    detail = f": {reason}" if reason else ""
    return AudioError(f"the audio could not be decoded by FFmpeg{detail}", type="undecodable_audio")
