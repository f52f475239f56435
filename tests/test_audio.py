"""The audio stage: decoding, validation, resampling and down-mix, checked against the reference.

The reference (conette 0.3.2) loads a path with `torchaudio.load(path)`, resamples every channel
with `torchaudio.functional.resample(x, sr, 32000)` and then averages the channels. These tests
compare with those calls made here, with the reference's own golden waveforms (fingerprints in
tests/fixtures/audio/expected_waveforms.json), and check every refusal.
"""

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torchaudio
from torchcodec.decoders import AudioDecoder

from audio_factory import FORMATS, OPUS_SAMPLE_RATE, float_wav_bytes, make_audio
from conette_engine import audio as audio_module
from conette_engine.audio import (
    DEFAULT_MAX_DURATION_S,
    DURATION_TOLERANCE_S,
    MAX_CHANNELS,
    MIN_SAMPLES,
    SAMPLE_RATE,
    DecodedAudio,
    decode_audio,
    load_audio,
    prepare_waveform,
    resample_kernel_size,
)
from conette_engine.errors import AudioError, InputError

FIXTURES = Path(__file__).parent / "fixtures" / "audio"
EXPECTED = json.loads((FIXTURES / "expected_waveforms.json").read_text())
FIXTURE_FILES = sorted(EXPECTED)

# Common rates, a rate equal to the target and unusual-but-legal ones (gcd reductions differ).
RATES = [8_000, 11_025, 16_000, 22_050, 32_000, 44_100, 48_000, 96_000, 7_350, 192_000]


def reference_waveform(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The reference's _load_resample for one (channels, n) clip: resample, THEN mean."""
    if sample_rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, sample_rate, SAMPLE_RATE)
    return waveform.mean(dim=0)


@contextlib.contextmanager
def raises_audio_error(error_type: str, *message_parts: str):
    """Expect an AudioError of this .type whose message contains every part and no internals."""
    with pytest.raises(AudioError) as info:
        yield info
    error = info.value
    assert error.type == error_type, f"{error.type}: {error.message}"
    for part in message_parts:
        assert part in error.message, error.message
    assert ".cpp" not in error.message and "Traceback" not in error.message


def seeded_noise(channels: int, n_frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(channels, n_frames, generator=generator) * 1.6 - 0.8


# ---------------------------------------------------------------- exactness against the reference


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_waveform_matches_reference_golden(name):
    expected = EXPECTED[name]
    audio = load_audio(FIXTURES / name)

    assert audio.waveform.dtype == torch.float32 and audio.waveform.ndim == 1
    assert audio.waveform.shape[0] == expected["n_samples"]
    assert audio.sample_rate == expected["sample_rate"]
    assert audio.channels == expected["channels"]
    probes = audio.waveform[expected["probe_indices"]]
    # The goldens are bit-exact on the reference's machine; other CPUs may differ by ~1e-6.
    torch.testing.assert_close(probes, torch.tensor(expected["probe_values"]), rtol=0, atol=2e-6)
    x64 = audio.waveform.double()
    assert x64.sum().item() == pytest.approx(expected["sum"], abs=1e-3)
    assert x64.abs().sum().item() == pytest.approx(expected["sum_abs"], rel=1e-6)
    assert x64.square().sum().item() == pytest.approx(expected["sum_squares"], rel=1e-6)


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_decodes_like_torchaudio_load_from_path_and_bytes(name):
    path = FIXTURES / name
    reference, reference_rate = torchaudio.load(str(path))

    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        waveform, sample_rate = decode_audio(source, max_duration_s=DEFAULT_MAX_DURATION_S)
        assert sample_rate == reference_rate
        assert torch.equal(waveform, reference)
    assert torch.equal(load_audio(path.read_bytes()).waveform, reference_waveform(reference, reference_rate))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_decodes_from_bytes_exactly_as_from_path(tmp_path, fmt):
    path = make_audio(tmp_path, fmt, seconds=2.0, sample_rate=44_100, channels=2)
    reference, reference_rate = torchaudio.load(str(path))

    from_bytes = load_audio(path.read_bytes())
    from_path = load_audio(path)

    decoded_rate = OPUS_SAMPLE_RATE if fmt in ("opus", "webm") else 44_100
    assert reference_rate == decoded_rate
    for audio in (from_bytes, from_path):
        assert audio.sample_rate == decoded_rate and audio.channels == 2
        assert audio.duration_s == reference.shape[1] / decoded_rate
        assert audio.duration_s == pytest.approx(2.0, abs=0.05)  # AAC adds ~1024 priming samples
        assert torch.equal(audio.waveform, reference_waveform(reference, reference_rate))
    assert torch.equal(decode_audio(path.read_bytes())[0], reference)


@pytest.mark.parametrize("fmt, sample_rate, channels", [("mp3", 22_050, 1), ("ogg", 16_000, 2), ("m4a", 8_000, 1)])
def test_speech_from_espeak_decodes_like_the_reference(tmp_path, fmt, sample_rate, channels):
    path = make_audio(tmp_path, fmt, seconds=3.0, sample_rate=sample_rate, channels=channels, signal="speech")
    reference, reference_rate = torchaudio.load(str(path))

    audio = load_audio(path.read_bytes())

    assert (audio.sample_rate, audio.channels) == (sample_rate, channels)
    assert torch.equal(audio.waveform, reference_waveform(reference, reference_rate))
    assert audio.waveform.abs().max() > 0.1  # there is speech in it, not silence


@pytest.mark.parametrize("sample_rate", RATES)
@pytest.mark.parametrize("channels", [1, 2, 5])
def test_prepare_resamples_every_channel_then_averages_like_the_reference(sample_rate, channels):
    waveform = seeded_noise(channels, sample_rate // 3 + 17, seed=sample_rate + channels)

    audio = prepare_waveform(waveform, sample_rate, DEFAULT_MAX_DURATION_S)

    assert torch.equal(audio.waveform, reference_waveform(waveform, sample_rate))
    assert audio.sample_rate == sample_rate and audio.channels == channels
    assert audio.duration_s == waveform.shape[1] / sample_rate
    assert audio.waveform.shape[0] == math.ceil(waveform.shape[1] * SAMPLE_RATE / sample_rate)


def test_down_mix_order_is_observable():
    """Averaging before resampling gives different bits: the exact test above can tell."""
    waveform = seeded_noise(2, 44_100)
    resample_then_mean = reference_waveform(waveform, 44_100)
    mean_then_resample = torchaudio.functional.resample(waveform.mean(dim=0), 44_100, SAMPLE_RATE)
    assert not torch.equal(resample_then_mean, mean_then_resample)


def test_tensor_inputs_one_dimensional_default_rate_and_other_dtypes():
    stereo = seeded_noise(2, 20_000)

    assert torch.equal(load_audio(stereo[0]).waveform, stereo[0])  # (n,), sr None -> 32 kHz, as the reference
    assert load_audio(stereo[0]).channels == 1
    assert torch.equal(load_audio(stereo[0], 16_000).waveform, load_audio(stereo[:1], 16_000).waveform)
    assert torch.equal(load_audio(stereo.double(), 16_000).waveform, load_audio(stereo, 16_000).waveform)
    result = load_audio(stereo, 32_000)
    assert isinstance(result, DecodedAudio) and result.waveform.dtype == torch.float32
    assert result.waveform.data_ptr() != stereo.data_ptr()  # never aliases the caller's tensor


def test_bytes_variants_decode_identically(tmp_path):
    data = make_audio(tmp_path, "flac", seconds=1.0).read_bytes()
    expected = load_audio(data).waveform
    assert torch.equal(load_audio(bytearray(data)).waveform, expected)
    assert torch.equal(load_audio(memoryview(data)).waveform, expected)


# ------------------------------------------------------------------------------- resampler cache


@pytest.mark.parametrize("orig_freq", [rate for rate in RATES if rate != SAMPLE_RATE] + [1_000, 384_000])
def test_cached_resampler_is_bit_identical_to_functional_resample(orig_freq):
    waveform = seeded_noise(3, 12_345, seed=orig_freq)
    resampler = audio_module._resampler(orig_freq, SAMPLE_RATE)
    assert torch.equal(resampler(waveform), torchaudio.functional.resample(waveform, orig_freq, SAMPLE_RATE))
    assert resampler.kernel.numel() == resample_kernel_size(orig_freq, SAMPLE_RATE)


def test_resampling_kernel_is_built_once_per_rate_pair(monkeypatch):
    import torchaudio.transforms._transforms as transforms_module

    built = []
    original = transforms_module._get_sinc_resample_kernel

    def counting(orig_freq, new_freq, *args, **kwargs):
        built.append((orig_freq, new_freq))
        return original(orig_freq, new_freq, *args, **kwargs)

    monkeypatch.setattr(transforms_module, "_get_sinc_resample_kernel", counting)
    audio_module._resampler.cache_clear()
    for _ in range(3):
        for sample_rate in (44_100, 22_050):
            prepare_waveform(seeded_noise(2, sample_rate), sample_rate, DEFAULT_MAX_DURATION_S)
    prepare_waveform(seeded_noise(1, 40_000), SAMPLE_RATE, DEFAULT_MAX_DURATION_S)  # no resampling at all

    assert sorted(built) == [(22_050, SAMPLE_RATE), (44_100, SAMPLE_RATE)]


# ----------------------------------------------------------------------------------- refusals


def test_audio_error_is_a_client_error():
    with pytest.raises(InputError) as info:
        load_audio(b"")
    assert info.value.http_status == 400 and isinstance(info.value, AudioError)


def test_empty_bytes_are_refused():
    with raises_audio_error("empty_audio", "0 bytes"):
        load_audio(b"")


def test_wav_header_without_samples_is_empty():
    with raises_audio_error("empty_audio", "no samples"):
        load_audio(float_wav_bytes(torch.zeros(1, 0), 16_000))


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 40,
        b"This is a text file, not audio.\n" * 50,
        b'{"audio": "base64 would go here"}',
    ],
    ids=["garbage", "text", "json"],
)
def test_undecodable_bytes_are_refused_with_ffmpegs_reason(data):
    with raises_audio_error("undecodable_audio", "could not be decoded by FFmpeg: ", "Invalid data"):
        load_audio(data)


def test_text_file_path_is_refused(tmp_path):
    text_file = tmp_path / "notes.wav"
    text_file.write_text("not audio\n" * 100)
    with raises_audio_error("undecodable_audio", "could not be decoded by FFmpeg"):
        load_audio(text_file)


def test_missing_path_is_refused(tmp_path):
    with raises_audio_error("audio_file_not_found", "not found"):
        load_audio(tmp_path / "nothing.wav")
    with raises_audio_error("audio_file_not_found"):
        load_audio(str(tmp_path))  # a directory is not an audio file


def test_playlist_bytes_do_not_make_ffmpeg_open_other_files():
    """HLS/concat playlists name other files; from memory FFmpeg must refuse to follow them."""
    target = str((FIXTURES / "a01.wav").resolve()).encode()
    playlists = [
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\nfile://" + target + b"\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile '" + target + b"'\n",
    ]
    for playlist in playlists:
        with raises_audio_error("undecodable_audio"):
            load_audio(playlist)


def test_truncated_wav_decodes_up_to_the_cut_or_is_refused_mid_sample(tmp_path):
    data = make_audio(tmp_path, "wav16", seconds=1.0, sample_rate=16_000).read_bytes()
    samples_start = data.index(b"data") + 8
    full, _ = decode_audio(data)

    truncated, _ = decode_audio(data[: samples_start + 2 * 10_000])

    assert truncated.shape == (1, 10_000)
    assert torch.equal(truncated, full[:, :10_000])
    with raises_audio_error("undecodable_audio", "Invalid data"):
        load_audio(data[: samples_start + 2 * 10_000 + 1])  # half a 16-bit sample


def test_truncated_flac_is_refused(tmp_path):
    data = make_audio(tmp_path, "flac", seconds=2.0, signal="noise").read_bytes()
    with raises_audio_error("undecodable_audio", "Invalid data"):
        load_audio(data[: len(data) // 2])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_is_refused(bad):
    waveform = seeded_noise(2, 16_000)
    waveform[1, 1234] = bad
    with raises_audio_error("non_finite_audio", "NaN or infinite"):
        load_audio(waveform, 16_000)


def test_non_finite_samples_in_a_float_wav_are_refused():
    waveform = seeded_noise(1, 16_000)
    waveform[0, 500] = float("nan")
    with raises_audio_error("non_finite_audio"):
        load_audio(float_wav_bytes(waveform, 16_000))


@pytest.mark.parametrize("sample_rate", [0, -16_000, 999, 384_001, 10_000_000])
def test_absurd_sample_rate_is_refused(sample_rate):
    with raises_audio_error("invalid_sample_rate", str(sample_rate), "1000", "384000"):
        load_audio(seeded_noise(1, 16_000), sample_rate)


@pytest.mark.parametrize("sample_rate", [16_000.5, 16_000.0, "16000", True])
def test_sample_rate_must_be_an_integer(sample_rate):
    with raises_audio_error("invalid_sample_rate"):
        load_audio(seeded_noise(1, 16_000), sample_rate)


def test_sample_rate_from_a_file_header_is_checked_before_decoding(tmp_path, monkeypatch):
    low_rate_wav = float_wav_bytes(seeded_noise(1, 4_000), 500)
    _forbid_decoding(monkeypatch)
    with raises_audio_error("invalid_sample_rate", "500 Hz"):
        load_audio(low_rate_wav)


def test_sample_rate_with_a_huge_resampling_filter_is_refused(tmp_path, monkeypatch):
    """44101 Hz is coprime with 32000: torchaudio's exact filter would have 1.4e9 coefficients."""
    assert resample_kernel_size(44_101, SAMPLE_RATE) > 10**9
    with raises_audio_error("unsupported_sample_rate", "44101 Hz", "44100"):
        load_audio(seeded_noise(1, 44_101), 44_101)

    odd_rate_wav = float_wav_bytes(seeded_noise(1, 44_101), 44_101)
    _forbid_decoding(monkeypatch)
    with raises_audio_error("unsupported_sample_rate"):
        load_audio(odd_rate_wav)


@pytest.mark.parametrize(
    "sample_rate", [8_000, 11_025, 22_050, 44_100, 48_000, 88_200, 96_000, 176_400, 192_000, 352_800, 384_000]
)
def test_every_common_sample_rate_is_supported(sample_rate):
    audio = load_audio(seeded_noise(1, sample_rate), sample_rate)  # 1 s
    assert audio.waveform.shape == (SAMPLE_RATE,)


def test_too_long_tensor_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(audio_module, "_resampler", _must_not_be_called)
    ten_hours = torch.zeros(1, 1).expand(2, 10 * 3600 * 16_000)  # a view: no memory behind it

    with raises_audio_error("audio_too_long", "36000.0 s", "maximum is 30 s"):
        load_audio(ten_hours, 16_000)
    with raises_audio_error("audio_too_long", "maximum is 5 s"):
        load_audio(torch.zeros(int(16_000 * (5 + DURATION_TOLERANCE_S)) + 1), 16_000, max_duration_s=5.0)
    # Codec padding: up to DURATION_TOLERANCE_S past the limit is accepted.
    assert load_audio(torch.zeros(int(SAMPLE_RATE * (5 + DURATION_TOLERANCE_S))), max_duration_s=5.0).duration_s > 5.0


def test_long_file_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    data = make_audio(tmp_path, "flac", seconds=40.0, sample_rate=8_000).read_bytes()
    _forbid_decoding(monkeypatch)
    with raises_audio_error("audio_too_long", "40.0 s long (from its header)", "maximum is 30 s"):
        load_audio(data)


def test_decoding_stops_past_the_limit_when_the_header_gives_no_duration(tmp_path, monkeypatch):
    """A FLAC whose STREAMINFO says 'length unknown': decoding is capped, not run to the end."""
    data = bytearray(make_audio(tmp_path, "flac", seconds=40.0, sample_rate=8_000).read_bytes())
    data[21] &= 0xF0  # STREAMINFO total samples (36 bits) := 0, "unknown"
    data[22:26] = bytes(4)
    assert AudioDecoder(bytes(data)).metadata.duration_seconds_from_header is None
    stops = _record_decode_ranges(monkeypatch)

    with raises_audio_error("audio_too_long", "at least 6.0 s", "maximum is 5 s"):
        load_audio(bytes(data), max_duration_s=5.0)
    assert stops == [5.0 + audio_module.DECODE_SLACK_S]


def test_clip_exactly_at_the_limit_is_accepted_despite_an_approximate_header(tmp_path):
    path = make_audio(tmp_path, "mp3", seconds=5.0, sample_rate=44_100)
    assert AudioDecoder(str(path)).metadata.duration_seconds_from_header > 5.0  # MP3 headers overestimate

    audio = load_audio(path.read_bytes(), max_duration_s=5.0)

    assert audio.duration_s == 5.0
    assert torch.equal(audio.waveform, reference_waveform(*torchaudio.load(str(path))))


def test_too_short_clip_is_refused_at_the_encoders_minimum():
    assert load_audio(torch.zeros(MIN_SAMPLES)).waveform.shape == (MIN_SAMPLES,)
    with raises_audio_error("audio_too_short", "0.230 s", "minimum is 0.23 s", "7360 samples"):
        load_audio(torch.zeros(MIN_SAMPLES - 1))
    # The rule is on the 32 kHz length: 3680 frames at 16 kHz resample to exactly 7360.
    assert load_audio(torch.zeros(MIN_SAMPLES // 2), 16_000).waveform.shape == (MIN_SAMPLES,)
    with raises_audio_error("audio_too_short"):
        load_audio(torch.zeros(MIN_SAMPLES // 2 - 1), 16_000)


def test_too_short_file_is_refused(tmp_path):
    data = make_audio(tmp_path, "ogg", seconds=0.1, sample_rate=22_050).read_bytes()
    with raises_audio_error("audio_too_short", "minimum is 0.23 s"):
        load_audio(data)


def test_too_many_channels_are_refused(tmp_path, monkeypatch):
    with raises_audio_error("too_many_channels", f"{MAX_CHANNELS + 1} channels", f"maximum is {MAX_CHANNELS}"):
        load_audio(seeded_noise(MAX_CHANNELS + 1, 16_000), 16_000)
    assert load_audio(seeded_noise(MAX_CHANNELS, 16_000), 16_000).channels == MAX_CHANNELS

    nine_channels = make_audio(tmp_path, "wav16", channels=MAX_CHANNELS + 1).read_bytes()
    _forbid_decoding(monkeypatch)
    with raises_audio_error("too_many_channels"):
        load_audio(nine_channels)


@pytest.mark.parametrize("shape", [(0,), (1, 0), (0, 16_000)])
def test_empty_tensor_is_refused(shape):
    with raises_audio_error("empty_audio"):
        load_audio(torch.zeros(shape), 16_000)


@pytest.mark.parametrize("shape", [(), (1, 1, 16_000)])
def test_tensor_of_wrong_rank_is_refused(shape):
    with raises_audio_error("invalid_audio_shape", "(n_samples,) or (channels, n_samples)"):
        load_audio(torch.zeros(shape), 16_000)


def test_integer_tensor_is_refused():
    with raises_audio_error("invalid_audio_dtype", "torch.int16"):
        load_audio(torch.zeros(16_000, dtype=torch.int16), 16_000)


def test_programming_errors_are_not_client_errors(tmp_path):
    data = make_audio(tmp_path, "wav16").read_bytes()
    with pytest.raises(ValueError, match="tensors only") as info:
        load_audio(data, sample_rate=16_000)
    assert not isinstance(info.value, AudioError)
    with pytest.raises(ValueError, match="max_duration_s"):
        load_audio(data, max_duration_s=0)


# ------------------------------------------------------------------------------------ helpers


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("expensive work was done before the refusal")


def _forbid_decoding(monkeypatch):
    monkeypatch.setattr(AudioDecoder, "get_samples_played_in_range", _must_not_be_called)


def _record_decode_ranges(monkeypatch) -> list:
    stops = []
    original = AudioDecoder.get_samples_played_in_range

    def recording(self, start_seconds=0.0, stop_seconds=None):
        stops.append(stop_seconds)
        return original(self, start_seconds, stop_seconds)

    monkeypatch.setattr(AudioDecoder, "get_samples_played_in_range", recording)
    return stops
