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
    audio_too_long           longer than max_duration_s (a setting, DEFAULT_MAX_DURATION_S; for
                             segmented captioning max_segmented_duration_s)
    non_finite_audio         NaN or infinite samples (tensors; decoders may produce them too)
    audio_out_of_range       a sample beyond +/-MAX_ABS_SAMPLE (float WAVs and tensors can hold any value)
    audio_too_short          fewer than MIN_SAMPLES samples at 32 kHz after resampling

Durations are checked before any expensive work: the container header's duration before
decoding (decompression bombs), the decoded length before resampling, and the decoder never
decodes more than max_duration_s + DECODE_SLACK_S seconds whatever the header claims.

Recordings of any length (hours, video files: FFmpeg takes the best audio stream) are read with
AudioStream, which decodes and resamples them chunk by chunk in bounded memory. Its output is
identical, sample for sample, to the whole-clip path: both resample through MonoResampler, which
cuts clips longer than RESAMPLE_BLOCK_S into the same fixed blocks whichever way the samples arrive.
Clips up to RESAMPLE_BLOCK_S (every clip within max_duration_s) are one block, resampled by
exactly the reference's call.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor
from torchcodec.decoders import AudioConverter, AudioDecoder, Demuxer

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

# Clips up to this long are resampled in one call, exactly as the reference does. Longer ones (segmented
# captioning, AudioStream) are resampled in blocks of this length, each with its filter's context from the
# neighbouring blocks: the same arithmetic, and the same blocks whether the clip arrives whole or in chunks.
# It is also the chunk AudioStream decodes at a time (8 channels at 384 kHz: 737 MB; stereo 48 kHz: 23 MB).
RESAMPLE_BLOCK_S = 60.0

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
    segmented: bool = False,
) -> tuple[Tensor, int]:
    """Decode an encoded clip (any container/codec FFmpeg knows) from memory or a file.

    Returns (waveform, sample_rate): waveform is a Tensor (channels, n_frames) float32 in
    [-1, 1], exactly what `torchaudio.load(path)` returns for the same file (torchaudio.load
    is a thin wrapper over torchcodec's AudioDecoder, called here directly so that the
    header can be checked before decoding). Bytes decode bit-identically to the same file.

    With max_duration_s, a clip whose header declares more than max_duration_s +
    DECODE_SLACK_S is refused before decoding, and decoding stops after that many seconds
    in any case, so a small file cannot expand to hours of samples. segmented: see load_audio.
    """
    decoder, sample_rate, _ = _open_decoder(source)
    metadata = decoder.metadata
    stop_s = None
    if max_duration_s is not None:
        stop_s = max_duration_s + DECODE_SLACK_S
        declared_s = metadata.duration_seconds_from_header
        if declared_s is not None and declared_s > stop_s:
            raise _too_long(f"{declared_s:.1f} s long (from its header)", max_duration_s, segmented)

    try:
        waveform = decoder.get_samples_played_in_range(0.0, stop_s).data
    except Exception as error:
        raise _undecodable(error) from error
    if max_duration_s is not None:
        _check_duration(waveform.shape[-1], sample_rate, max_duration_s, decoding_stopped=True, segmented=segmented)
    return waveform, sample_rate


class AudioStream:
    """A recording of any length, decoded and resampled chunk by chunk in bounded memory.

        stream = AudioStream("talk.mkv")      # checks the header (rate, channels) at once
        for chunk in stream:                 # Tensor (m,) float32, mono, 32 kHz; m varies
            ...
        stream.sample_rate, stream.channels  # as decoded; stream.duration_s once iterated

    The concatenated chunks are exactly `load_audio(source, max_duration_s=<any limit above its
    length>).waveform`: every packet goes through the decoder in order (the samples of a whole decode)
    and MonoResampler cuts the same blocks as for a whole clip. Memory: about two blocks of decoded
    input, whatever the length.
    Refusals are the AudioErrors of load_audio, minus audio_too_long; non-finite and out-of-range
    samples are found chunk by chunk, so some chunks may have been yielded before the error.
    """

    def __init__(self, source: bytes | bytearray | memoryview | str | os.PathLike):
        _, self.sample_rate, self.channels = _open_decoder(source)  # header checks before any decoding
        self._source = _decoder_source(source)
        self.n_frames = 0  # decoded so far, at sample_rate
        self.n_samples = 0  # yielded so far, at SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        """The input's duration as decoded so far (all of it once iterated) = n_frames / sample_rate."""
        return self.n_frames / self.sample_rate

    def __iter__(self) -> Iterator[Tensor]:
        resampler = MonoResampler(self.sample_rate, self.channels)
        pending: list[Tensor] = []
        n_pending = 0
        for data in self._decoded_frames():
            _check_samples(data)
            self.n_frames += data.shape[-1]
            pending.append(data)
            n_pending += data.shape[-1]
            if n_pending >= resampler.block_frames:  # hand over about a block at a time: fewer, larger copies
                yield from self._counted(resampler.feed(torch.cat(pending, dim=1)))
                pending, n_pending = [], 0
        if pending:
            yield from self._counted(resampler.feed(torch.cat(pending, dim=1)))
        if self.n_frames == 0:
            raise AudioError("the audio has no samples", type="empty_audio")
        tail = resampler.finish()
        _check_min_length(self.n_samples + sum(t.shape[0] for t in tail), self.n_frames, self.sample_rate)
        yield from self._counted(tail)

    def _decoded_frames(self) -> Iterator[Tensor]:
        """The best audio stream's samples, (channels, m) float32, packet by packet.

        The same FFmpeg decoder and sample conversion as AudioDecoder, fed every packet in order: exactly the
        samples of a whole decode (ranged AudioDecoder calls may seek, which restarts codecs such as Opus in
        Matroska with other samples). Samples before time 0 are dropped, as a decode from 0 s drops them.
        """
        try:
            demuxer = Demuxer(self._source, streams="audio")
            decoder = demuxer.streams[0].make_decoder()
            converter = AudioConverter()

            def converted(raw_frames):
                for raw in raw_frames:
                    samples = converter.convert(raw)
                    data = samples.data
                    if samples.pts_seconds < 0:
                        data = data[:, math.floor(-samples.pts_seconds * self.sample_rate + 0.5):]
                    if data.shape[-1]:
                        yield data

            for packet in demuxer:
                yield from converted(decoder.decode(packet))
            yield from converted(decoder.drain())
        except AudioError:
            raise
        except Exception as error:
            raise _undecodable(error) from error

    def _counted(self, chunks: list[Tensor]) -> Iterator[Tensor]:
        for chunk in chunks:
            self.n_samples += chunk.shape[0]
            yield chunk


class MonoResampler:
    """Resample (channels, n) float32 audio to mono 32 kHz: every channel with torchaudio's sinc filter
    (the reference's `torchaudio.functional.resample(x, rate, 32000)`), then the mean over channels.

    Feed the clip in chunks of any size (`feed` returns the mono samples ready so far), then call
    `finish`. A clip of at most `block_frames` frames is resampled in one call when finished, exactly as
    the reference does. A longer one is cut into blocks of `block_frames` input frames (a whole number of
    the filter's periods), each convolved with `width` frames of context on either side: the output
    equals the one-call result up to the rounding of each block's convolution, and it is the same
    whether the clip was fed whole or in pieces, because the blocks are.
    """

    def __init__(self, sample_rate: int, channels: int):
        self._transform = _resampler(sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else None
        if self._transform is None:
            self._orig, self._new, self._width = 1, 1, 0
        else:
            gcd = self._transform.gcd
            self._orig, self._new = sample_rate // gcd, SAMPLE_RATE // gcd
            self._width = self._transform.width
        self.channels = channels
        self.block_frames = math.ceil(RESAMPLE_BLOCK_S * sample_rate / self._orig) * self._orig
        self._pending: list[Tensor] = []  # fed input not yet dropped, from absolute frame _pending_start
        self._pending_start = 0
        self._n_fed = 0
        self._next_block = 0
        self._blocked = False  # the clip is longer than one block

    def feed(self, waveform: Tensor) -> list[Tensor]:
        """waveform (channels, m) float32 -> mono output chunks (possibly none) ready so far."""
        if waveform.shape[-1] == 0:
            return []
        self._pending.append(waveform)
        self._n_fed += waveform.shape[-1]
        self._blocked = self._blocked or self._n_fed > self.block_frames
        out = []
        # Block b needs its input frames [bB, (b+1)B) plus the filter's width on each side.
        while self._blocked and self._n_fed >= (self._next_block + 1) * self.block_frames + self._width:
            out.append(self._block(self._next_block))
            self._next_block += 1
        return out

    def finish(self) -> list[Tensor]:
        """The rest of the output, once every frame was fed (chunks totalling ceil(n * 32000 / rate) samples)."""
        if not self._pending:
            return []
        if not self._blocked:
            whole = torch.cat(self._pending, dim=1) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            return [(self._transform(whole) if self._transform is not None else whole).mean(dim=0)]
        out = []
        periods_per_block = self.block_frames // self._orig
        last_block = (self._n_fed // self._orig) // periods_per_block  # holds torchaudio's last output period
        while self._next_block <= last_block:
            out.append(self._block(self._next_block, finished=True))
            self._next_block += 1
        self._pending = []
        return [chunk for chunk in out if chunk.shape[0] > 0]

    def _block(self, index: int, finished: bool = False) -> Tensor:
        """Mono output of block `index`: torchaudio's arithmetic on that stretch of the clip.

        torchaudio pads the clip with `width` zeros before it and `width + orig` after it, and convolves with
        stride orig: output period i (`new` samples) reads input frames [i*orig - width, i*orig + orig + width),
        and there are n // orig + 1 periods, cut to ceil(n * new / orig) samples. Block b holds periods
        [b*P, (b+1)*P), P = block_frames / orig, fewer in the last block.
        """
        periods_per_block = self.block_frames // self._orig
        first = index * periods_per_block
        stop = (index + 1) * periods_per_block
        if finished:
            stop = min(stop, self._n_fed // self._orig + 1)
        start_frame = index * self.block_frames
        waveform = self._frames(start_frame - self._width, stop * self._orig + self._width)
        if self._transform is not None:
            periods = F.conv1d(waveform[:, None], self._transform.kernel, stride=self._orig)
            waveform = periods.transpose(1, 2).reshape(self.channels, -1)
        n_out = (stop - first) * self._new
        if finished:  # torchaudio's output length, in exact integers (it computes it in float32)
            n_out = min(n_out, -(-self._new * self._n_fed // self._orig) - first * self._new)
        self._drop_before(start_frame + self.block_frames - self._width)
        return waveform[:, :max(n_out, 0)].mean(dim=0)

    def _frames(self, start: int, stop: int) -> Tensor:
        """Input frames [start, stop) as a new contiguous tensor, zeros outside the clip."""
        pieces, position = [], self._pending_start
        if start < position:
            pieces.append(torch.zeros(self.channels, position - start))
        for chunk in self._pending:
            end = position + chunk.shape[-1]
            low, high = max(start, position), min(stop, end)
            if low < high:
                pieces.append(chunk[:, low - position: high - position])
            position = end
        if stop > max(position, start):
            pieces.append(torch.zeros(self.channels, stop - max(position, start)))
        return torch.cat(pieces, dim=1)

    def _drop_before(self, frame: int) -> None:
        while self._pending and self._pending_start + self._pending[0].shape[-1] <= frame:
            self._pending_start += self._pending.pop(0).shape[-1]


def prepare_waveform(waveform: Tensor, sample_rate: int, max_duration_s: float, segmented: bool = False
                     ) -> DecodedAudio:
    """Validate a decoded clip, resample it to 32 kHz, then average its channels.

    waveform: Tensor (n_frames,) or (channels, n_frames), floating-point, at sample_rate Hz.
    Returns DecodedAudio with waveform (n_samples,) float32 at 32 kHz on the CPU.

    The checks run cheapest first and all before resampling, except the minimum length,
    which is a rule on the resampled length (MIN_SAMPLES at 32 kHz = 0.23 s). segmented: the
    limit is the one for segmented captioning (only the audio_too_long message differs).
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
    _check_duration(n_frames, sample_rate, max_duration_s, segmented=segmented)

    waveform = waveform.detach().to(device="cpu", dtype=torch.float32)
    _check_samples(waveform)

    resampler = MonoResampler(sample_rate, channels)
    waveform = torch.cat([*resampler.feed(waveform), *resampler.finish()])
    _check_min_length(waveform.shape[0], n_frames, sample_rate)
    return DecodedAudio(
        waveform=waveform, sample_rate=sample_rate, channels=channels, duration_s=n_frames / sample_rate
    )


def load_audio(
    source: bytes | bytearray | memoryview | str | os.PathLike | Tensor,
    sample_rate: int | None = None,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    segmented: bool = False,
) -> DecodedAudio:
    """Decode (bytes or a path) or take (a tensor) one clip and prepare it for the encoder.

    source: encoded audio as bytes or a file path, or a waveform Tensor (n_frames,) or
        (channels, n_frames) in [-1, 1].
    sample_rate: the tensor's rate in Hz; None means 32 kHz, as in the reference. Encoded
        audio carries its own rate, so giving one with bytes or a path is a ValueError.
    segmented: the clip is for segmented captioning and max_duration_s is that limit; the
        audio_too_long message then points to the CLI instead of to segment_s.
    Returns DecodedAudio (waveform (n_samples,) float32 mono at 32 kHz); raises AudioError.
    """
    if not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be positive, got {max_duration_s}")
    if isinstance(source, Tensor):
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
        return prepare_waveform(source, rate, max_duration_s, segmented)
    if sample_rate is not None:
        raise ValueError("sample_rate applies to tensors only: encoded audio carries its own rate")
    waveform, rate = decode_audio(source, max_duration_s=max_duration_s, segmented=segmented)
    return prepare_waveform(waveform, rate, max_duration_s, segmented)


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


def _decoder_source(source) -> bytes | str:
    """bytes, or the absolute path of an existing regular file (never read as a URL or an FFmpeg protocol)."""
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    if isinstance(source, bytes):
        if not source:
            raise AudioError("the audio is empty (0 bytes)", type="empty_audio")
        return source
    path = os.path.abspath(os.fspath(source))
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {os.fspath(source)}", type="audio_file_not_found")
    return path


def _open_decoder(source) -> tuple[AudioDecoder, int, int]:
    """An AudioDecoder on bytes or a file, its sample rate and channel count checked from the header."""
    source = _decoder_source(source)
    try:
        decoder = AudioDecoder(source)
    except Exception as error:  # torchcodec raises RuntimeError/ValueError with FFmpeg's reason
        raise _undecodable(error) from error
    sample_rate = _checked_sample_rate(decoder.metadata.sample_rate)
    _check_channels(decoder.metadata.num_channels)
    return decoder, sample_rate, decoder.metadata.num_channels


def _check_samples(waveform: Tensor) -> None:
    if not torch.isfinite(waveform).all():
        raise AudioError("the audio contains NaN or infinite samples", type="non_finite_audio")
    peak = float(waveform.abs().max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(
            f"the audio has a sample of magnitude {peak:.3g}; samples must lie within +/-{MAX_ABS_SAMPLE:g} "
            "(audio is expected in [-1, 1])",
            type="audio_out_of_range",
        )


def _check_min_length(n_samples: int, n_frames: int, sample_rate: int) -> None:
    if n_samples < MIN_SAMPLES:
        raise AudioError(
            f"the audio is {n_frames / sample_rate:.3f} s long; the minimum is {MIN_DURATION_S:.2f} s "
            f"({MIN_SAMPLES} samples at {SAMPLE_RATE} Hz)",
            type="audio_too_short",
        )


def _check_channels(channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise AudioError(
            f"the audio has {channels} channels; the maximum is {MAX_CHANNELS}", type="too_many_channels"
        )
    if channels < 1:
        raise AudioError("the audio has no channels", type="empty_audio")


def _check_duration(n_frames: int, sample_rate: int, max_duration_s: float, decoding_stopped: bool = False,
                    segmented: bool = False) -> None:
    """decoding_stopped: n_frames may be where decoding was stopped, not the clip's end.

    Codec padding (AAC priming, MP3 frames) makes a clip cut at exactly the maximum decode a few tens of
    milliseconds longer; DURATION_TOLERANCE_S accepts those.
    """
    duration_s = n_frames / sample_rate
    if duration_s > max_duration_s + DURATION_TOLERANCE_S:
        qualifier = "at least " if decoding_stopped else ""
        raise _too_long(f"{qualifier}{duration_s:.1f} s long", max_duration_s, segmented)


def _too_long(how_long: str, max_duration_s: float, segmented: bool = False) -> AudioError:
    if segmented:
        limit = f"the maximum for segmented captioning (segment_s) is {max_duration_s:g} s"
        how = ("caption longer recordings with the caption CLI (conette-caption --segment S), which cuts them "
               "into windows sent as separate requests")
    else:
        limit = f"the maximum is {max_duration_s:g} s"
        how = ("caption longer recordings as a timeline of windows with the segment_s option (e.g. segment_s=10), "
               "or at any length with the caption CLI (conette-caption --segment S)")
    return AudioError(f"the audio is {how_long}; {limit}; {how}", type="audio_too_long")


def _undecodable(error: Exception) -> AudioError:
    """The AudioError for a torchcodec failure: FFmpeg's reason, without source locations."""
    lines = str(error).strip().splitlines()
    reason = _SOURCE_LOCATION.sub("", lines[0]) if lines else ""
    if reason.startswith(_NO_FRAMES_DECODED):  # e.g. a WAV header with no data
        return AudioError("the audio has no samples (FFmpeg decoded no audio frames)", type="empty_audio")
    detail = f": {reason}" if reason else ""
    return AudioError(f"the audio could not be decoded by FFmpeg{detail}", type="undecodable_audio")
