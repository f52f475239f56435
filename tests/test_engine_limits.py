"""Engine guarantees that keep a server up and its answers valid JSON: sample range, finite results, work limits."""

from __future__ import annotations

import io
import json
import math
import wave

import pytest
import torch

from conette_engine.audio import MAX_ABS_SAMPLE
from conette_engine.checkpoint import load_checkpoint
from conette_engine.engine import (DEFAULT_REQUEST_BEAM_BYTES, DEFAULT_REQUEST_WORK_S, CaptioningEngine, Work,
                                   item_work)
from conette_engine.errors import AudioError, NonFiniteResultError, WorkLimitError

BATCH_SIZE = 8  # batchSize in handler/model-config.yaml
RESPONSE_TIMEOUT_S = 120  # responseTimeout in handler/model-config.yaml


@pytest.fixture(scope="module")
def engine(test_checkpoint_dir) -> CaptioningEngine:
    return CaptioningEngine.load(test_checkpoint_dir)


def noise(seconds: float, scale: float = 0.3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(int(seconds * 32_000), generator=generator).clamp(-1, 1)


def float_wav(samples: torch.Tensor, sample_rate: int = 32_000) -> bytes:
    """A 32-bit float WAV (format tag 3), which may hold samples of any magnitude."""
    data = samples.to(torch.float32).numpy().tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:  # writes a PCM header; patched to IEEE float below
        out.setnchannels(1)
        out.setsampwidth(4)
        out.setframerate(sample_rate)
        out.writeframes(data)
    raw = bytearray(buffer.getvalue())
    raw[20:22] = (3).to_bytes(2, "little")
    return bytes(raw)


@pytest.mark.parametrize("peak", [1e4, 1e17, 1e19, 3e38])
def test_samples_beyond_the_range_are_refused(engine, peak):
    waveform = noise(1.0)
    waveform[100] = -peak
    for source in (waveform, float_wav(waveform)):
        with pytest.raises(AudioError) as caught:
            engine.load_audio(source)
        assert caught.value.type == "audio_out_of_range"
        assert f"{MAX_ABS_SAMPLE:g}" in caught.value.message


def test_loudest_accepted_audio_gives_a_finite_answer(engine):
    audio = engine.load_audio(float_wav(noise(2.0, scale=MAX_ABS_SAMPLE)))
    (result,) = engine.caption([audio])
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # raises on NaN/Infinity
    assert data["caption"] and math.isfinite(data["score"])


def test_a_non_finite_model_output_raises_instead_of_being_returned(test_checkpoint_dir):
    checkpoint = load_checkpoint(test_checkpoint_dir)
    head = next(name for name in checkpoint.state_dict if "head_audioset" in name and name.endswith("weight"))
    checkpoint.state_dict[head] = torch.full_like(checkpoint.state_dict[head], float("nan"))
    broken = CaptioningEngine(checkpoint)
    with pytest.raises(NonFiniteResultError, match="non-finite"):
        broken.caption([broken.load_audio(noise(1.0))])


def test_work_grows_with_each_dimension(engine):
    base = engine.parse_options({})
    longer = item_work(20.0, base)
    assert item_work(10.0, base).seconds < longer.seconds
    assert longer.seconds < item_work(20.0, engine.parse_options({"beam_size": 8})).seconds
    assert longer.seconds < item_work(20.0, engine.parse_options({"max_pred_size": 60})).seconds
    assert item_work(10.0, base).beam_bytes < longer.beam_bytes


def test_default_limit_fits_a_batch_into_response_timeout():
    """batchSize requests at the limit: at most 70 % of responseTimeout and 1 GiB of decoder memory."""
    assert BATCH_SIZE * DEFAULT_REQUEST_WORK_S <= 0.7 * RESPONSE_TIMEOUT_S
    assert BATCH_SIZE * DEFAULT_REQUEST_BEAM_BYTES <= 1024**3


def test_eight_30_s_clips_at_default_options_are_accepted(engine):
    audio = engine.load_audio(noise(30.0))
    work = engine.check_request_work([(audio, engine.parse_options({}))] * 8)
    assert work.seconds <= DEFAULT_REQUEST_WORK_S


@pytest.mark.parametrize("clips, options", [
    (8, {"beam_size": 16, "min_pred_size": 100, "max_pred_size": 100}),  # the workload that killed the worker
    (3, {"beam_size": 16, "min_pred_size": 100, "max_pred_size": 100}),
    (8, {"beam_size": 16, "max_pred_size": 3}),  # cheap in time, but 128 hypotheses over 30 s of frames each
])
def test_too_expensive_requests_are_refused_with_the_limit_and_the_remedy(engine, clips, options):
    audio = engine.load_audio(noise(30.0))
    with pytest.raises(WorkLimitError) as caught:
        engine.check_request_work([(audio, engine.parse_options(options))] * clips)
    error = caught.value
    assert error.type == "request_too_expensive" and error.http_status == 400
    assert f"{DEFAULT_REQUEST_WORK_S:.1f} s" in error.message and "beam_size" in error.message


def test_windows_of_a_long_clip_add_up(engine):
    """A long clip cut into windows is several engine items: their work is the sum, checked per request."""
    options = engine.parse_options({"beam_size": 8, "max_pred_size": 100})
    window = engine.load_audio(noise(10.0))
    one = item_work(window.duration_s, options)
    assert engine.check_request_work([(window, options)] * 2) == one + one
    with pytest.raises(WorkLimitError):
        engine.check_request_work([(window, options)] * 4)


def test_the_limit_is_a_setting(test_checkpoint_dir):
    strict = CaptioningEngine.load(test_checkpoint_dir, max_request_work=Work(0.5, 2**20))
    audio = strict.load_audio(noise(1.0))
    strict.check_request_work([(audio, strict.parse_options({"beam_size": 1, "max_pred_size": 5}))])
    with pytest.raises(WorkLimitError, match="0.5 s"):
        strict.check_request_work([(audio, strict.parse_options({}))] * 8)


def test_a_segmented_clip_counts_its_windows(engine):
    """Overlapping windows cover more audio than the clip: the estimate sums over the windows, not the clip."""
    plain = engine.parse_options({})
    overlapping = engine.parse_options({"segment_s": 10, "hop_s": 5})
    audio = engine.load_audio(noise(60.0), sample_rate=32_000, options=overlapping)
    windows = [item_work(10.0, plain)] * 11  # starts 0, 5, ..., 50
    assert engine.check_request_work([(audio, overlapping)]) == sum(windows, Work(0.0, 0))


def test_the_segmented_duration_limit_agrees_with_the_work_limit(engine):
    """At max_segmented_duration_s, default options and windows of 10 s or more pass the work check, overlapping
    or not (overlap lowers the duration limit in proportion); shorter windows may not, and are told so."""
    limit = engine.max_segmented_duration_s
    for segment_s, hop_s in [(10, 10), (10, 5), (10, 2.5), (29, 29), (20, 7)]:
        options = engine.parse_options({"segment_s": segment_s, "hop_s": hop_s})
        audio = engine.load_audio(noise(limit * hop_s / segment_s), sample_rate=32_000, options=options)
        assert engine.check_request_work([(audio, options)]).seconds <= DEFAULT_REQUEST_WORK_S
    options = engine.parse_options({"segment_s": 5})
    with pytest.raises(WorkLimitError, match=r"longer windows \(segment_s\)"):
        engine.check_request_work([(engine.load_audio(noise(limit), sample_rate=32_000, options=options), options)])
