"""Segmented captioning: the window rule, options, long-clip loading, streamed windows, and reference goldens.

The goldens (tests/fixtures/segments/) are the reference conette 0.3.2 run on each window of a 75.6 s encoded
video (AAC stereo 44.1 kHz + H.264) as a 32 kHz tensor, batch of one (tools/make_segment_goldens.py).
"""

import hashlib
import itertools
import random
import subprocess

import pytest
import torch

import golden_data
from audio_factory import make_audio
from conette_engine import audio as audio_module
from conette_engine.audio import SAMPLE_RATE, AudioStream, MonoResampler, load_audio, prepare_waveform
from conette_engine.decoding import MAX_SEGMENT_S, DecodingOptions
from conette_engine.engine import CaptioningEngine, CaptionResult, SegmentedResult
from conette_engine.errors import AudioError, OptionError
from conette_engine.segments import segment_bounds, stream_windows
from test_engine_golden import PROB_ATOL, assert_same_as_reference

TASKS = ["clotho", "audiocaps", "macs"]
RECORDING = golden_data.SEGMENTS / "street_and_music.mp4"
SECOND = SAMPLE_RATE


@pytest.fixture(scope="module")
def dev_model(tmp_path_factory):
    return golden_data.extract_dev_checkpoint(tmp_path_factory.mktemp("dev_model"))


@pytest.fixture(scope="module")
def engine(dev_model) -> CaptioningEngine:
    return CaptioningEngine.load(dev_model)


@pytest.fixture(scope="module")
def recording(engine):
    return engine.load_audio(RECORDING, options=DecodingOptions(task="clotho", segment_s=25.0))


# ------------------------------------------------------------------------------------------- the window rule


@pytest.mark.parametrize("n, segment_s, hop_s, expected", [
    (10 * SECOND, 30.0, None, [(0, 10 * SECOND)]),  # shorter than a window: one window
    (30 * SECOND, 30.0, None, [(0, 30 * SECOND)]),
    (20 * SECOND, 30.0, 10.0, [(0, 20 * SECOND)]),  # shorter than a window, overlapping hop: still one
    (70 * SECOND, 30.0, None, [(0, 30 * SECOND), (30 * SECOND, 60 * SECOND), (60 * SECOND, 70 * SECOND)]),
    # a last window under 1 s is dropped and the one before it extended to the end
    (60 * SECOND + 31_999, 30.0, None, [(0, 30 * SECOND), (30 * SECOND, 60 * SECOND + 31_999)]),
    (60 * SECOND + 32_000, 30.0, None, [(0, 30 * SECOND), (30 * SECOND, 60 * SECOND), (60 * SECOND, 61 * SECOND)]),
    (5_000, 30.0, None, [(0, 5_000)]),  # the only window is kept whatever its length
    (50 * SECOND, 20.0, 15.0, [(0, 20 * SECOND), (15 * SECOND, 35 * SECOND), (30 * SECOND, 50 * SECOND)]),
    (46 * SECOND, 20.0, 15.0, [(0, 20 * SECOND), (15 * SECOND, 35 * SECOND), (30 * SECOND, 46 * SECOND)]),
    # overlapping windows: the last one starts inside the one before, so it is short only if S - H < 1 s
    (35 * SECOND + 100, 20.0, 15.0, [(0, 20 * SECOND), (15 * SECOND, 35 * SECOND), (30 * SECOND, 35 * SECOND + 100)]),
    (2 * SECOND + 16_000, 1.5, 1.0, [(0, 48_000), (32_000, 80_000)]),  # [64000, 80000) is 0.5 s: dropped
    (3 * SECOND, 1.5, 1.0, [(0, 48_000), (32_000, 80_000), (64_000, 96_000)]),  # a last window of exactly 1 s stays
])
def test_windows_follow_the_definition(n, segment_s, hop_s, expected):
    assert segment_bounds(n, segment_s, hop_s) == expected


def test_window_lengths_and_hops_round_to_samples():
    # S = round(10.00001 * 32000) = 320000, H = round(2.50001 * 32000) = 80000
    bounds = segment_bounds(40 * SECOND, 10.00001, 2.50001)
    assert [start for start, _ in bounds] == [k * 80_000 for k in range(len(bounds))]
    assert all(stop - start == 320_000 for start, stop in bounds)
    assert bounds[-1][1] == 40 * SECOND


def test_windows_cover_the_clip_for_any_length():
    rng = random.Random(0)
    for _ in range(500):
        segment_s = rng.choice([1.0, 2.5, 10.0, 29.0])
        hop_s = rng.choice([None, segment_s, segment_s / 2, segment_s / 4])
        n = rng.randint(1, 200 * SECOND)
        bounds = segment_bounds(n, segment_s, hop_s)
        length = round(segment_s * SECOND)
        hop = round((hop_s or segment_s) * SECOND)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert [start for start, _ in bounds] == [k * hop for k in range(len(bounds))]
        assert all(b[0] <= a[1] for a, b in itertools.pairwise(bounds))  # no gaps
        assert all(stop - start == length for start, stop in bounds[:-1])
        assert bounds[-1][1] - bounds[-1][0] < length + SECOND
        assert len(bounds) == 1 or bounds[-1][1] - bounds[-1][0] >= SECOND
        assert len(bounds) == 1 or bounds[-2][0] + length < n  # no window lies inside the last one


def test_every_window_is_a_clip_a_whole_clip_request_accepts():
    """The longest window (segment_s at its maximum, extended by just under 1 s) stays within 30 s."""
    window = round(MAX_SEGMENT_S * SECOND)
    (_, (start, stop)) = segment_bounds(2 * window + SECOND - 1, MAX_SEGMENT_S)  # a 1 s tail less one sample
    assert stop - start == window + SECOND - 1
    assert load_audio(torch.zeros(stop - start)).waveform.shape == (stop - start,)
    with pytest.raises(OptionError):
        DecodingOptions.parse({"segment_s": MAX_SEGMENT_S + 0.5}, TASKS)


# --------------------------------------------------------------------------------------------------- options


def test_segmentation_is_off_unless_asked():
    options = DecodingOptions.parse({}, TASKS)
    assert options.segment_s is None and options.hop_s is None and not options.segmented


def test_segment_and_hop_parse_as_numbers():
    options = DecodingOptions.parse({"segment_s": "10", "hop_s": b"5"}, TASKS)
    assert (options.segment_s, options.hop_s, options.segmented) == (10.0, 5.0, True)
    assert DecodingOptions.parse({"segment_s": 2.5}, TASKS).hop_s is None  # the hop defaults to the window


@pytest.mark.parametrize("values, message", [
    ({"segment_s": "0.5"}, r"segment_s must be a number in \[1.0, 29.0\]"),
    ({"segment_s": "29.5"}, "segment_s must be a number"),
    ({"segment_s": "nan"}, "segment_s must be a number"),
    ({"segment_s": "ten"}, "segment_s must be a number"),
    ({"hop_s": "5"}, "hop_s needs segment_s"),
    ({"segment_s": "10", "hop_s": "11"}, r"hop_s \(11\) must be between segment_s / 4 \(2.5\) and segment_s \(10\)"),
    ({"segment_s": "10", "hop_s": "2"}, "at most 4 of them"),
    ({"segment_s": "10", "hop_s": "0.1"}, r"hop_s must be a number in \[0.25, 29.0\]"),
])
def test_bad_segmentation_options_are_refused(values, message):
    with pytest.raises(OptionError, match=message) as error:
        DecodingOptions.parse(values, TASKS)
    assert error.value.http_status == 400


def test_whole_clip_captioning_refuses_segmented_options(engine):
    """A request with segment_s must never be answered as one whole clip."""
    audio = engine.load_audio(golden_data.AUDIO / "a02.wav")
    with pytest.raises(OptionError, match="caption_segments"):
        engine.caption([audio, audio], [engine.defaults, DecodingOptions(task="clotho", segment_s=2.0)])
    with pytest.raises(OptionError, match="hop_s needs segment_s"):
        engine.caption_segments([audio], [DecodingOptions(task="clotho", hop_s=2.0)])


# ------------------------------------------------------------------------------------------- long-clip loading


def test_segmented_clips_have_their_own_limit(engine, dev_model):
    assert engine.max_segmented_duration_s > engine.max_duration_s
    with pytest.raises(AudioError) as error:
        engine.load_audio(RECORDING)
    assert error.value.type == "audio_too_long"
    assert "the maximum is 30 s" in error.value.message and "segment_s" in error.value.message
    assert "--segment" in error.value.message

    segmented = DecodingOptions(task="clotho", segment_s=10.0)
    assert engine.load_audio(RECORDING, options=segmented).duration_s == pytest.approx(75.6, abs=0.05)
    short_limit = CaptioningEngine.load(dev_model, max_segmented_duration_s=60.0)
    with pytest.raises(AudioError) as error:
        short_limit.load_audio(RECORDING.read_bytes(), options=segmented)
    assert error.value.type == "audio_too_long"
    assert "75.6 s long (from its header)" in error.value.message
    assert "maximum for segmented captioning (segment_s) is 60 s" in error.value.message
    assert "caption CLI (conette-caption --segment S)" in error.value.message


def test_overlapping_windows_lower_the_segmented_limit(dev_model):
    """The limit bounds the audio the encoder sees: hop_s = segment_s / 2 halves the longest clip."""
    engine = CaptioningEngine.load(dev_model, max_segmented_duration_s=120.0)
    assert engine.load_audio(RECORDING, options=DecodingOptions(task="clotho", segment_s=10.0, hop_s=7.5))
    with pytest.raises(AudioError) as error:
        engine.load_audio(RECORDING, options=DecodingOptions(task="clotho", segment_s=10.0, hop_s=5.0))
    assert error.value.type == "audio_too_long"
    assert "is 60 s" in error.value.message and "hop_s 5 < segment_s 10" in error.value.message


# ------------------------------------------------------------------------------------ reference goldens


def test_recording_is_the_committed_one():
    manifest = golden_data.segment_manifest()
    assert hashlib.sha256(RECORDING.read_bytes()).hexdigest() == manifest["sha256"]


@pytest.mark.parametrize("config_index", [0, 1])
def test_each_window_matches_the_reference_run_on_that_window(engine, recording, config_index):
    manifest = golden_data.segment_manifest()
    config = manifest["configs"][config_index]
    assert recording.waveform.shape[0] == manifest["n_samples"]
    options = DecodingOptions.parse({k: config[k] for k in ("segment_s", "hop_s", "task", "threshold") if k in config},
                                    engine.tasks, engine.defaults)
    (result,) = engine.caption_segments([recording], [options])

    assert isinstance(result, SegmentedResult)
    assert [(s.start, s.stop) for s in result.segments] == [(w["start"], w["stop"]) for w in config["windows"]]
    for segment, window in zip(result.segments, config["windows"]):
        outputs = golden_data.segment_goldens()[window["id"]]
        assert_same_as_reference(segment.result, outputs, 0)
        assert [label for label, _ in segment.result.tags] == outputs["tags"][0]
        torch.testing.assert_close(segment.result.clip_probs, outputs["tags_probs"][0], atol=PROB_ATOL, rtol=0)

    # Clip-level tags: per label the maximum over the windows, thresholded like any tags.
    reference_max = torch.stack([golden_data.segment_goldens()[w["id"]]["tags_probs"][0]
                                 for w in config["windows"]]).max(dim=0).values
    torch.testing.assert_close(result.clip_probs, reference_max, atol=PROB_ATOL, rtol=0)
    threshold = config.get("threshold", 0.3)
    assert [label for label, _ in result.tags] == [engine.label_names[i] for i in
                                                   (reference_max >= threshold).nonzero()[:, 0].tolist()]
    assert len(result.tags) > 0


def test_segmented_answer_shape(engine, recording):
    (result,) = engine.caption_segments([recording], [DecodingOptions(task="clotho", segment_s=25.0, beam_size=2)])
    data = result.to_dict()
    assert list(data) == ["segments", "tags", "task", "audio"]
    assert data["task"] == "clotho"
    assert data["audio"] == {"duration_s": recording.duration_s, "sample_rate": 44_100, "channels": 2}
    assert [(s["start_s"], s["end_s"]) for s in data["segments"]] == [(0.0, 25.0), (25.0, 50.0),
                                                                      (50.0, recording.waveform.shape[0] / SAMPLE_RATE)]
    for segment in data["segments"]:
        assert list(segment) == ["start_s", "end_s", "caption", "score", "candidates", "tags"]
        assert len(segment["candidates"]) == 2 and segment["candidates"][0]["caption"] == segment["caption"]
        scores = [t["score"] for t in segment["tags"]]
        assert scores == sorted(scores, reverse=True)
    clip_scores = [t["score"] for t in data["tags"]]
    assert clip_scores == sorted(clip_scores, reverse=True) and all(s >= 0.3 for s in clip_scores)


def test_segmented_and_whole_clips_share_one_engine_call(engine, recording, monkeypatch):
    """One beam search for every window of every item; each answer is the one it gets alone."""
    short = engine.load_audio(golden_data.AUDIO / "a02.wav")
    items = [recording, short, recording, short]
    options = [DecodingOptions(task="clotho", segment_s=25.0), DecodingOptions(task="macs", beam_size=2),
               DecodingOptions(task="audiocaps", segment_s=20.0, hop_s=15.0, threshold=0.2), engine.defaults]
    calls = []
    original = engine._beam_search
    monkeypatch.setattr(engine, "_beam_search", lambda memories, opts: calls.append(len(memories)) or
                        original(memories, opts))

    together = engine.caption_segments(items, options)

    assert calls == [3 + 1 + 5 + 1]
    assert [type(r) for r in together] == [SegmentedResult, CaptionResult, SegmentedResult, CaptionResult]
    for audio, opts, result in zip(items, options, together):
        (alone,) = engine.caption_segments([audio], [opts])
        assert_same_answer(result, alone)
    # A whole clip gives exactly what caption() gives.
    assert_same_answer(together[1], engine.caption([short], [options[1]])[0])


def test_each_window_is_captioned_as_its_slice_alone(engine, recording):
    options = DecodingOptions(task="audiocaps", segment_s=20.0, hop_s=15.0)
    (result,) = engine.caption_segments([recording], [options])
    for segment in result.segments[::2]:
        window = prepare_waveform(recording.waveform[segment.start:segment.stop], SAMPLE_RATE, 60.0)
        (alone,) = engine.caption([window], [DecodingOptions(task="audiocaps")])
        assert_same_answer(segment.result, alone)


def assert_same_answer(a, b):
    if isinstance(a, SegmentedResult):
        assert [(s.start, s.stop) for s in a.segments] == [(s.start, s.stop) for s in b.segments]
        for x, y in zip(a.segments, b.segments):
            assert_same_answer(x.result, y.result)
        torch.testing.assert_close(a.clip_probs, b.clip_probs, atol=1e-6, rtol=0)
        return
    assert a.candidate_tokens == b.candidate_tokens and a.caption == b.caption
    assert a.score == pytest.approx(b.score, abs=1e-5)
    torch.testing.assert_close(a.clip_probs, b.clip_probs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- streamed long files


@pytest.mark.parametrize("segment_s, hop_s", [(25.0, None), (20.0, 15.0), (7.0, 2.0)])
def test_streamed_windows_are_slices_of_the_whole_waveform(recording, segment_s, hop_s):
    windows = list(stream_windows(RECORDING, segment_s, hop_s))
    assert [(w.start, w.stop) for w in windows] == segment_bounds(recording.waveform.shape[0], segment_s, hop_s)
    for window in windows:
        assert torch.equal(window.waveform, recording.waveform[window.start:window.stop])
        assert (window.start_s, window.end_s) == (window.start / SAMPLE_RATE, window.stop / SAMPLE_RATE)


@pytest.mark.parametrize("fmt, sample_rate, channels, container", [
    ("mp3", 22_050, 1, None), ("webm", 48_000, 2, None), ("flac", 32_000, 2, "mkv"), ("wav16", 16_000, 2, None),
])
def test_streamed_audio_equals_the_whole_clip_path(tmp_path, fmt, sample_rate, channels, container):
    """Longer than one resampling block (60 s), from audio and video containers."""
    path = make_audio(tmp_path, fmt, seconds=64.0, sample_rate=sample_rate, channels=channels, signal="noise")
    if container:  # remux into a video file: FFmpeg takes its audio stream
        video = tmp_path / f"video.{container}"
        run_ffmpeg("-f", "lavfi", "-i", "testsrc=s=32x24:r=1:d=64", "-i", str(path), "-map", "0:v", "-map", "1:a",
                   "-c:v", "libx264", "-c:a", "copy", str(video))
        path = video
    whole = load_audio(path, max_duration_s=70.0, segmented=True)
    stream = AudioStream(path)
    streamed = torch.cat(list(stream))
    assert torch.equal(streamed, whole.waveform)
    assert (stream.sample_rate, stream.channels, stream.duration_s) == (whole.sample_rate, whole.channels,
                                                                        whole.duration_s)
    windows = list(stream_windows(path.read_bytes(), 30.0))  # from memory too
    assert torch.equal(torch.cat([w.waveform for w in windows]), whole.waveform)


def run_ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, capture_output=True)


def test_stream_refuses_what_load_audio_refuses(tmp_path):
    with pytest.raises(AudioError) as error:
        list(AudioStream(tmp_path / "missing.mp4"))
    assert error.value.type == "audio_file_not_found"
    (tmp_path / "notes.txt").write_text("not audio\n" * 100)
    with pytest.raises(AudioError) as error:
        AudioStream(tmp_path / "notes.txt")
    assert error.value.type == "undecodable_audio"
    silent_video = tmp_path / "silent.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=s=32x24:r=1:d=3", "-c:v", "libx264", str(silent_video))
    with pytest.raises(AudioError) as error:
        AudioStream(silent_video)
    assert error.value.type == "undecodable_audio"
    short = make_audio(tmp_path, "ogg", seconds=0.1, sample_rate=22_050)
    with pytest.raises(AudioError) as error:
        list(stream_windows(short, 10.0))
    assert error.value.type == "audio_too_short"


# --------------------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("sample_rate", [8_000, 11_025, 16_000, 22_050, 32_000, 44_100, 48_000])
@pytest.mark.parametrize("channels", [1, 3])
def test_resampling_in_chunks_is_identical_to_resampling_whole(sample_rate, channels):
    generator = torch.Generator().manual_seed(sample_rate + channels)
    n = int(sample_rate * 125.3) + 11  # three blocks, the last one partial
    waveform = torch.rand(channels, n, generator=generator) * 1.6 - 0.8
    whole = prepare_waveform(waveform, sample_rate, 200.0).waveform
    rng = random.Random(sample_rate)
    resampler, out, position = MonoResampler(sample_rate, channels), [], 0
    while position < n:
        size = rng.choice([1, 7, 1000, sample_rate, 17 * sample_rate])
        out += resampler.feed(waveform[:, position:position + size])
        position += size
    out += resampler.finish()
    assert torch.equal(torch.cat(out), whole)
    # The exact output length (torchaudio rounds it in float32, one sample short on long clips at some rates).
    assert whole.shape[0] == -(-n * SAMPLE_RATE // sample_rate)
    # Block edges only change the rounding of the convolution, not the signal.
    reference = audio_module._resampler(sample_rate, SAMPLE_RATE)(waveform).mean(dim=0) \
        if sample_rate != SAMPLE_RATE else waveform.mean(dim=0)
    length = min(reference.shape[0], whole.shape[0])
    torch.testing.assert_close(whole[:length], reference[:length], atol=1e-6, rtol=0)


def test_clips_up_to_one_block_are_resampled_in_one_reference_call(monkeypatch):
    calls = []
    original = audio_module.MonoResampler._block
    monkeypatch.setattr(audio_module.MonoResampler, "_block",
                        lambda self, *args, **kwargs: calls.append(args) or original(self, *args, **kwargs))
    block_s = audio_module.RESAMPLE_BLOCK_S
    for sample_rate in (44_100, 16_000):
        waveform = torch.rand(2, int(block_s * sample_rate))
        assert audio_module.MonoResampler(sample_rate, 2).block_frames >= waveform.shape[1]
        prepare_waveform(waveform, sample_rate, block_s)
    assert calls == []
