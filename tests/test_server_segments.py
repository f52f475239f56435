"""Segmented captioning (segment_s / hop_s) through the real server, in every request style.

Each answer is checked against the in-process engine's caption_segments on the same checkpoint (the `expected`
fixture), so a segmented request answers exactly what the engine gives for that recording alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from conftest import MAX_SEGMENTED_DURATION_S
from test_server import PROB_ATOL, assert_same_answer, b64, batch_counts, fire_together

LONG = "long_m4a"  # 47.3 s, AAC stereo 44.1 kHz
OPTIONS = {"segment_s": 10, "hop_s": 7.5}


def assert_same_segmented(got: dict, want: dict) -> None:
    assert got["task"] == want["task"] and got["audio"] == want["audio"]
    assert [(s["start_s"], s["end_s"]) for s in got["segments"]] == [(s["start_s"], s["end_s"])
                                                                     for s in want["segments"]]
    for got_segment, want_segment in zip(got["segments"], want["segments"]):
        assert_same_answer({**got_segment, "task": got["task"], "audio": None},
                           {**want_segment, "task": want["task"], "audio": None})
    assert_same_tags(got["tags"], want["tags"])


def assert_same_tags(got: list, want: list) -> None:
    assert [t["label"] for t in got] == [t["label"] for t in want]
    assert [t["score"] for t in got] == pytest.approx([t["score"] for t in want], abs=PROB_ATOL)


def test_the_reference_answer_is_a_timeline(expected):
    """What the other tests compare with: windows every 7.5 s, times exact to the sample, the last one extended."""
    want = expected(LONG, **OPTIONS)
    starts = [s["start_s"] for s in want["segments"]]
    assert starts == [k * 240_000 / 32_000 for k in range(len(starts))] == [0.0, 7.5, 15.0, 22.5, 30.0, 37.5]
    assert want["segments"][-1]["end_s"] == pytest.approx(47.3, abs=0.05)
    assert set(want) == {"segments", "tags", "task", "audio"}


def test_raw_body_with_query_options(ts_server, clips, expected, engine):
    response = ts_server.request("POST", "/conette/predict", params={k: str(v) for k, v in OPTIONS.items()},
                                 data=clips[LONG], headers={"Content-Type": "audio/mp4"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_same_segmented(answer, expected(LONG, **OPTIONS))
    assert answer["model"]["checkpoint_sha256"] == engine.checkpoint_sha256


def test_multipart_form(ts_server, clips, expected):
    response = ts_server.predict(files={"audio": ("long.m4a", clips[LONG], "audio/mp4")},
                                 data={k: str(v) for k, v in OPTIONS.items()})
    assert response.status_code == 200, response.text
    assert_same_segmented(response.json(), expected(LONG, **OPTIONS))


def test_json_body(ts_server, clips, expected):
    response = ts_server.predict(json={"audio": b64(clips["speech_opus"]), "segment_s": 1.2, "hop_s": 0.4,
                                       "task": "macs", "beam_size": 2, "threshold": 0.4})
    assert response.status_code == 200, response.text
    assert_same_segmented(response.json(), expected("speech_opus", segment_s=1.2, hop_s=0.4, task="macs",
                                                    beam_size=2, threshold=0.4))


def test_kserve_v1_instances_each_segmented_or_not(ts_server, clips, expected):
    response = ts_server.request("POST", "/v1/models/conette:predict", json={"instances": [
        {"audio": {"b64": b64(clips[LONG])}, **OPTIONS},
        {"audio": {"b64": b64(clips["speech_wav"])}},
        {"audio": {"b64": b64(clips["noise_mp3"])}, "segment_s": 1},
    ]})
    assert response.status_code == 200, response.text
    long_answer, whole, short_segmented = response.json()["predictions"]
    assert_same_segmented(long_answer, expected(LONG, **OPTIONS))
    assert_same_answer(whole, expected("speech_wav"))
    assert_same_segmented(short_segmented, expected("noise_mp3", segment_s=1))


def test_oip_v2_json_segments_output(ts_server, clips, expected):
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [2],
                        "data": [b64(clips[LONG]), b64(clips["tone_flac"])]}],
            "parameters": {"segment_s": 10}}
    response = ts_server.request("POST", f"/v2/models/{ts_server.model_name}/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert list(outputs) == ["segments", "tags"]
    for n, name in enumerate([LONG, "tone_flac"]):
        want = expected(name, segment_s=10)
        got = {"segments": json.loads(outputs["segments"]["data"][n]), "tags": json.loads(outputs["tags"]["data"][n]),
               "task": want["task"], "audio": want["audio"]}
        assert_same_segmented(got, want)


def test_oip_v2_asking_for_a_whole_clip_output_of_a_segmented_request(ts_server, clips):
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": [b64(clips[LONG])]}],
            "parameters": {"segment_s": 10}, "outputs": [{"name": "caption"}]}
    response = ts_server.request("POST", f"/v2/models/{ts_server.model_name}/infer", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "invalid_request"
    assert "with segment_s: ['segments', 'tags']" in response.json()["error"]


def test_tritonclient_binary_segments(ts_server, clips, expected):
    client = triton.InferenceServerClient(url=ts_server.inference_url.removeprefix("http://"))
    audio = triton.InferInput("audio", [1], "BYTES")
    audio.set_data_from_numpy(np.array([clips[LONG]], dtype=np.object_))
    result = client.infer(ts_server.model_name, [audio], parameters=OPTIONS,
                          outputs=[triton.InferRequestedOutput("segments"), triton.InferRequestedOutput("tags")],
                          headers={"Authorization": f"Bearer {ts_server.token}"})
    want = expected(LONG, **OPTIONS)
    got = {"segments": json.loads(result.as_numpy("segments")[0]), "tags": json.loads(result.as_numpy("tags")[0]),
           "task": want["task"], "audio": want["audio"]}
    assert_same_segmented(got, want)


def test_segmented_and_whole_clip_requests_in_one_batch(ts_server, clips, expected):
    octet = {"Content-Type": "application/octet-stream"}
    calls = [
        lambda: ts_server.request("POST", "/conette/predict", params={"segment_s": "10"}, data=clips[LONG],
                                  headers=octet),
        lambda: ts_server.predict(data=clips["speech_wav"], headers=octet),
        lambda: ts_server.predict(json={"audio": b64(clips["noise_mp3"]), "segment_s": 1, "hop_s": 0.5}),
        lambda: ts_server.predict(data=clips["tone_flac"], headers=octet),
    ]
    batches_before, requests_before = batch_counts(ts_server)
    responses = fire_together(calls)
    batches_after, requests_after = batch_counts(ts_server)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert_same_segmented(responses[0].json(), expected(LONG, segment_s=10))
    assert_same_answer(responses[1].json(), expected("speech_wav"))
    assert_same_segmented(responses[2].json(), expected("noise_mp3", segment_s=1, hop_s=0.5))
    assert_same_answer(responses[3].json(), expected("tone_flac"))
    assert requests_after - requests_before == len(calls)
    assert batches_after - batches_before < len(calls), "no two concurrent requests shared a batch"


@pytest.mark.parametrize(("options", "words"), [
    ({"segment_s": 10, "hop_s": 12}, "hop_s (12) must be between"),
    ({"segment_s": 10, "hop_s": 2}, "hop_s (2) must be between"),
    ({"hop_s": 5}, "hop_s needs segment_s"),
    ({"segment_s": 0.5}, "segment_s"),
    ({"segment_s": 45}, "segment_s"),
    ({"segment_s": "ten"}, "segment_s"),
])
def test_bad_segment_options(ts_server, clips, options, words):
    response = ts_server.predict(json={"audio": b64(clips["speech_wav"]), **options})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_option" and words in error["message"], error


def test_a_segmented_request_at_the_limit_is_accepted(ts_server, clips):
    """At max_segmented_duration_s in 10 s windows and the default options, the work limit does not refuse it."""
    response = ts_server.request("POST", "/conette/predict", params={"segment_s": "10"},
                                 data=clips["segmented_max_wav"], headers={"Content-Type": "audio/wav"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["segments"]) == MAX_SEGMENTED_DURATION_S / 10
    assert answer["segments"][-1]["end_s"] == MAX_SEGMENTED_DURATION_S


@pytest.mark.parametrize(("name", "options", "words"), [
    ("segmented_too_long_wav", {"segment_s": "10"},
     [f"segmented captioning (segment_s) is {MAX_SEGMENTED_DURATION_S:g} s", "conette-caption --segment"]),
    ("segmented_max_wav", {"segment_s": "10", "hop_s": "5"},
     [f"{MAX_SEGMENTED_DURATION_S / 2:g} s", "hop_s 5 < segment_s 10", "conette-caption --segment"]),
    ("too_long_wav", {}, ["the maximum is 30 s", "segment_s", "conette-caption --segment"]),
])
def test_over_a_limit_is_audio_too_long(ts_server, clips, name, options, words):
    response = ts_server.request("POST", "/conette/predict", params=options, data=clips[name],
                                 headers={"Content-Type": "audio/wav"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "audio_too_long"
    assert all(w in error["message"] for w in words), error["message"]
