"""Property-based fuzzing of the running server: batches that mix good, bad and junk requests (tools/fuzz_cases.py).

Every bad request gets a 4xx JSON error, every good one its lone answer, nothing gets a 5xx or NaN, and the worker
PID never changes. This short, derandomized variant runs in CI; tools/fuzz_server.py runs the long one.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_cases
from audio_factory import make_audio
from conette_engine.engine import CaptioningEngine

BATCH = 8  # batchSize in handler/model-config.yaml
EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_clips(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("fuzz_clips")
    paths = {"tone_ogg": make_audio(tmp, "ogg", seconds=1.0, sample_rate=48000),
             "noise_mp3": make_audio(tmp, "mp3", seconds=1.5, sample_rate=44100, signal="noise"),
             "tone_wav": make_audio(tmp, "wav16", seconds=0.8, sample_rate=16000, channels=2)}
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.fixture(scope="module")
def lone_answer(test_checkpoint_dir, fuzz_clips):
    return fuzz_cases.lone_answers(CaptioningEngine.load(test_checkpoint_dir), fuzz_clips)


def test_mixed_batches_never_hurt_the_server(ts_server, fuzz_clips, lone_answer):
    pid_before = [w["pid"] for w in ts_server.workers()]
    outcomes = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(fuzz_cases.mixed_cases(sorted(fuzz_clips)), min_size=BATCH, max_size=BATCH))
    def batch(cases):
        for case, response in zip(cases, fuzz_cases.fire_together(ts_server, cases, fuzz_clips)):
            outcomes[(case.kind, fuzz_cases.check(case, response, lone_answer))] += 1

    batch()
    assert [w["pid"] for w in ts_server.workers()] == pid_before
    kinds = {kind for kind, _ in outcomes}
    assert kinds == {"good", "bad", "junk"}, outcomes  # the mix really was mixed
