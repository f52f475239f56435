"""The TorchServe handler against a real running TorchServe (the `ts_server` fixture in conftest.py).

Every answer is checked against the in-process engine run on the same checkpoint, one clip at a time, so a
request's answer is the answer it would get alone, whatever shared its batch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from audio_factory import b64, make_audio
from conette_engine.engine import CaptioningEngine
from conette_client.files import free_ports
from conette_client.prometheus import metric_total
from conette_client.torchserve import read_properties
from conftest import MAX_DURATION_S, REPO_ROOT, TorchServeInstance, checkout_env

SCORE_ATOL = 1e-4
PROB_ATOL = 1e-5
GOOD_CLIPS = ("speech_wav", "tone_flac", "noise_mp3", "tone_ogg", "speech_opus", "tone_m4a", "noise_wav24",
              "pink_sox_wav")



def assert_same_answer(got: dict, want: dict) -> None:
    assert got["caption"] == want["caption"]
    assert got["task"] == want["task"]
    assert got["audio"] == want["audio"]
    assert [c["caption"] for c in got["candidates"]] == [c["caption"] for c in want["candidates"]]
    assert [c["score"] for c in got["candidates"]] == pytest.approx([c["score"] for c in want["candidates"]],
                                                                    abs=SCORE_ATOL)
    assert got["score"] == pytest.approx(want["score"], abs=SCORE_ATOL)
    assert [t["label"] for t in got["tags"]] == [t["label"] for t in want["tags"]]
    assert [t["score"] for t in got["tags"]] == pytest.approx([t["score"] for t in want["tags"]], abs=PROB_ATOL)


def assert_model_info(got: dict, engine: CaptioningEngine) -> None:
    assert got["model"]["name"] == "conette"
    assert got["model"]["version"] == (REPO_ROOT / "handler" / "conette_engine" / "VERSION").read_text().strip()
    assert got["model"]["checkpoint_sha256"] == engine.checkpoint_sha256


def batch_counts(server: TorchServeInstance) -> tuple[float, float]:
    """(batches so far, requests in them so far) from the handler's BatchSize histogram."""
    text = server.metrics_text()
    return metric_total(text, "BatchSize_count"), metric_total(text, "BatchSize_sum")


def fire_together(calls: list) -> list[requests.Response]:
    """Run the calls at the same moment from separate threads, so the server can batch them."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# ---- the four request styles ------------------------------------------------------------------------------------

# TorchServe 0.12 forwards the query string on these two routes (not on /predictions/<model>; see README).
@pytest.mark.parametrize("route", ["/conette/predict", "/invocations?model_name=conette"])
def test_raw_body_with_query_options(ts_server, clips, expected, engine, route):
    response = ts_server.request("POST", route, params={"task": "audiocaps", "beam_size": "2"},
                                 data=clips["noise_mp3"], headers={"Content-Type": "audio/mpeg"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    answer = response.json()
    assert_same_answer(answer, expected("noise_mp3", task="audiocaps", beam_size=2))
    assert len(answer["candidates"]) == 2
    assert_model_info(answer, engine)


def test_raw_body_on_predictions_uses_defaults(ts_server, clips, expected):
    response = ts_server.predict(data=clips["speech_wav"], headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_same_answer(answer, expected("speech_wav"))
    assert answer["task"] == "clotho" and len(answer["candidates"]) == 3


@pytest.mark.parametrize("field", ["audio", "data"])
def test_multipart_form(ts_server, clips, expected, field):
    response = ts_server.predict(files={field: ("clip.flac", clips["tone_flac"], "audio/flac")},
                                 data={"task": "macs", "beam_size": "2", "threshold": "0.5"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_same_answer(answer, expected("tone_flac", task="macs", beam_size=2, threshold=0.5))
    assert all(tag["score"] >= 0.5 for tag in answer["tags"])


def test_json_base64(ts_server, clips, expected):
    response = ts_server.predict(json={"audio": b64(clips["tone_ogg"]), "task": "wavcaps_freesound",
                                       "beam_size": 4, "max_pred_size": 8, "forbid_rep_mode": "all"})
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), expected("tone_ogg", task="wavcaps_freesound", beam_size=4,
                                                  max_pred_size=8, forbid_rep_mode="all"))


def test_kserve_v1_several_instances(ts_server, clips, expected, engine):
    body = {"instances": [{"audio": {"b64": b64(clips["speech_opus"])}, "task": "audiocaps"},
                          {"audio": {"b64": b64(clips["tone_m4a"])}, "beam_size": 2}]}
    response = ts_server.request("POST", f"/v1/models/{ts_server.model_name}:predict", json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    assert_same_answer(predictions[0], expected("speech_opus", task="audiocaps"))
    assert_same_answer(predictions[1], expected("tone_m4a", beam_size=2))
    assert_model_info(predictions[1], engine)


def test_open_inference_protocol_v2(ts_server, clips, expected):
    names = ["noise_wav24", "pink_sox_wav"]
    body = {"id": "req-42",
            "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [2], "data": [b64(clips[n]) for n in names]}],
            "parameters": {"task": "macs", "beam_size": 2}}
    response = ts_server.request("POST", f"/v2/models/{ts_server.model_name}/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == ts_server.model_name and answer["id"] == "req-42"
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert set(outputs) == {"caption", "score", "tags"}
    for i, name in enumerate(names):
        want = expected(name, task="macs", beam_size=2)
        assert outputs["caption"]["data"][i] == want["caption"]
        assert outputs["score"]["data"][i] == pytest.approx(want["score"], abs=SCORE_ATOL)
        tags = json.loads(outputs["tags"]["data"][i])
        assert [t["label"] for t in tags] == [t["label"] for t in want["tags"]]
    assert outputs["caption"]["shape"] == [2] and outputs["score"]["datatype"] == "FP32"


# ---- batching -------------------------------------------------------------------------------------------------------

def test_concurrent_requests_are_batched_with_solo_answers(ts_server, clips):
    solo = {}
    for name in GOOD_CLIPS:  # one at a time: each request is a batch of one
        response = ts_server.predict(data=clips[name], headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        solo[name] = response.json()

    batches_before, requests_before = batch_counts(ts_server)
    responses = fire_together([
        (lambda name=name: ts_server.predict(data=clips[name], headers={"Content-Type": "application/octet-stream"}))
        for name in GOOD_CLIPS
    ])
    batches_after, requests_after = batch_counts(ts_server)

    for name, response in zip(GOOD_CLIPS, responses):
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), solo[name])
    assert requests_after - requests_before == len(GOOD_CLIPS)
    assert batches_after - batches_before < len(GOOD_CLIPS), "no two concurrent requests shared a batch"


def test_bad_requests_in_a_mixed_batch(ts_server, clips, expected):
    pid_before = [w["pid"] for w in ts_server.workers()]
    octet = {"Content-Type": "application/octet-stream"}
    good = ["speech_wav", "tone_flac", "noise_mp3"]
    bad = {
        "invalid_audio": lambda: ts_server.predict(data=b"definitely not audio " * 64, headers=octet),
        "too_long": lambda: ts_server.predict(data=clips["too_long_wav"], headers=octet),
        "invalid_option": lambda: ts_server.predict(json={"audio": b64(clips["tone_ogg"]), "task": "karaoke"}),
        "out_of_range": lambda: ts_server.predict(json={"audio": b64(clips["tone_ogg"]), "beam_size": 0}),
        "unknown_option": lambda: ts_server.predict(json={"audio": b64(clips["tone_ogg"]), "beam": 3}),
        "invalid_base64": lambda: ts_server.predict(json={"audio": "***not base64***"}),
        "invalid_json": lambda: ts_server.predict(data=b'{"audio": ', headers={"Content-Type": "application/json"}),
        "empty_audio": lambda: ts_server.predict(data=b"", headers=octet),
        "missing_audio": lambda: ts_server.predict(json={"task": "macs"}),
        "bad_instance": lambda: ts_server.request("POST", "/v1/models/conette:predict", json={"instances": [
            {"audio": {"b64": b64(clips["tone_ogg"])}}, {"audio": {"b64": b64(b"junk" * 50)}}]}),
        "bad_parameters": lambda: ts_server.request("POST", "/v2/models/conette/infer", json={"inputs": [
            {"name": "audio", "datatype": "BYTES", "shape": [1], "data": [b64(clips["tone_ogg"])]}],
            "parameters": ["beam_size", 2]}),
        "too_many_instances": lambda: ts_server.request("POST", "/v2/models/conette/infer", json={"inputs": [
            {"name": "audio", "datatype": "BYTES", "shape": [9], "data": [b64(clips["tone_ogg"])] * 9}]}),
    }
    batches_before, requests_before = batch_counts(ts_server)
    responses = fire_together(
        [(lambda name=name: ts_server.predict(data=clips[name], headers=octet)) for name in good] + list(bad.values()))
    batches_after, requests_after = batch_counts(ts_server)

    for name, response in zip(good, responses):
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), expected(name))
    bad_responses = dict(zip(bad, responses[len(good):]))
    v2_cases = ("bad_parameters", "too_many_instances")  # OIP v2 errors: {"error": "<message>", "type": ...}
    for case, response in bad_responses.items():
        assert response.status_code == 400, (case, response.text)
        error = response.json() if case in v2_cases else response.json()["error"]
        message = error["error"] if case in v2_cases else error["message"]
        assert set(error) == ({"error", "type"} if case in v2_cases else {"type", "message"}) and message, case
    types = {case: (response.json() if case in v2_cases else response.json()["error"])["type"]
             for case, response in bad_responses.items()}
    assert types == {"invalid_audio": "undecodable_audio", "too_long": "audio_too_long",
                     "invalid_option": "invalid_option", "out_of_range": "invalid_option",
                     "unknown_option": "unknown_option", "invalid_base64": "invalid_base64",
                     "invalid_json": "invalid_request",
                     "empty_audio": "empty_audio", "missing_audio": "missing_audio",
                     "bad_instance": "undecodable_audio", "too_many_instances": "too_many_instances",
                     "bad_parameters": "invalid_request"}
    assert "30" in bad_responses["too_long"].json()["error"]["message"]  # the message states the limit
    assert "instances[1]" in bad_responses["bad_instance"].json()["error"]["message"]
    assert requests_after - requests_before == len(good) + len(bad)
    assert batches_after - batches_before < len(good) + len(bad), "the good and bad requests never shared a batch"
    # Nothing a client sent killed the worker.
    assert [w["pid"] for w in ts_server.workers()] == pid_before


def test_oversized_body_gets_413(ts_server):
    max_request_size = int(read_properties(REPO_ROOT / "config.properties")["max_request_size"])
    response = ts_server.predict(data=b"\0" * (max_request_size + 1), headers={"Content-Type": "audio/wav"})
    assert response.status_code == 413


def test_longest_accepted_clip_fits_as_base64_json(ts_server, tmp_path):
    """max_request_size holds 30 s of 48 kHz stereo float WAV, base64-encoded in JSON."""
    clip = make_audio(tmp_path, "wavf32", seconds=MAX_DURATION_S, sample_rate=48000, channels=2)
    response = ts_server.predict(json={"audio": b64(clip.read_bytes()), "max_pred_size": 3})
    assert response.status_code == 200, response.text
    assert response.json()["audio"] == {"duration_s": MAX_DURATION_S, "sample_rate": 48000, "channels": 2}


# ---- operations: scaling, metrics, security -------------------------------------------------------------------------

# A request that gets no answer at all waits this long (docs/reliability.md "Requests that get no answer"); an
# answered one takes about a second here, even on a busy host.
NO_ANSWER_TIMEOUT_S = 60


def test_scaling_up_and_down_under_load(ts_server, clips, expected):
    want = expected("tone_ogg")
    audio = {"data": clips["tone_ogg"], "headers": {"Content-Type": "audio/ogg"}}

    def scale(workers: int) -> None:
        response = ts_server.request("PUT", f"/models/{ts_server.model_name}", api="management",
                                     params={"min_worker": workers, "max_worker": workers, "synchronous": "true"})
        assert response.status_code == 200, response.text
        ts_server.wait_for_workers(workers, timeout=120)

    def under_load(action) -> list[tuple[int | None, object]]:
        """(status, JSON body) of every request 3 clients sent back to back while action ran; (None, error)
        for a request that got no answer within NO_ANSWER_TIMEOUT_S."""
        stop = threading.Event()
        outcomes: list = []

        def load():
            while not stop.is_set():
                try:
                    response = ts_server.predict(timeout=NO_ANSWER_TIMEOUT_S, **audio)
                    outcomes.append((response.status_code, response.json()))
                except requests.RequestException as error:
                    outcomes.append((None, error))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            action()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        return outcomes

    grown = under_load(lambda: scale(2))
    assert len(grown) > 3
    assert [outcome for outcome in grown if outcome[0] != 200] == []
    for _, answer in grown:
        assert_same_answer(answer, want)

    # TorchServe 0.12 stops the removed worker at once: the requests it had taken from the queue are put back,
    # answered "Worker died.", or (a frontend race) never answered. Only these three outcomes may occur.
    def serve_a_while_then_scale_down() -> None:
        time.sleep(2.0)  # both workers take batches when the removal comes
        scale(1)

    shrunk = under_load(serve_a_while_then_scale_down)
    answered = [answer for status, answer in shrunk if status == 200]
    died = [answer for status, answer in shrunk if status == 500 and answer.get("message") == "Worker died."]
    no_answer = [error for status, error in shrunk if status is None and isinstance(error, requests.ReadTimeout)]
    print(f"\nscale 2 -> 1 under load: {len(shrunk)} requests, {len(answered)} answered, {len(died)} "
          f"'Worker died.', {len(no_answer)} without an answer in {NO_ANSWER_TIMEOUT_S} s")
    assert len(answered) + len(died) + len(no_answer) == len(shrunk), shrunk
    for answer in answered:
        assert_same_answer(answer, want)

    # Once scaled, the remaining worker serves concurrent requests, each answered.
    assert len(ts_server.workers()) == 1
    with ThreadPoolExecutor(3) as pool:
        after = list(pool.map(lambda _: ts_server.predict(timeout=NO_ANSWER_TIMEOUT_S, **audio), range(3)))
    for response in after:
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), want)


def test_metrics_endpoint(ts_server, clips):
    ts_server.predict(data=clips["speech_wav"], headers={"Content-Type": "audio/wav"})
    ts_server.predict(data=b"garbage" * 100, headers={"Content-Type": "audio/wav"})
    text = ts_server.metrics_text()
    model = {"ModelName": ts_server.model_name}
    assert metric_total(text, "ts_inference_requests_total", model_name=ts_server.model_name) >= 2
    assert metric_total(text, "AudioSecondsProcessed", **model) >= 2.0
    assert metric_total(text, "BatchSize_count", **model) >= 1
    for stage in ("decode", "logmel", "encoder", "beam_search"):
        assert metric_total(text, "StageLatencySeconds_count", Stage=stage, **model) >= 1, stage
    assert metric_total(text, "RequestErrors", ErrorType="undecodable_audio", **model) >= 1
    assert "# TYPE StageLatencySeconds histogram" in text


def test_token_required(ts_server, clips):
    audio = {"data": clips["tone_ogg"], "headers": {"Content-Type": "audio/ogg"}}
    for token in (None, "wrong-key"):
        response = ts_server.predict(token=token, **audio)
        assert response.status_code == 400, response.text  # TorchServe answers a bad key with 400
        assert response.json()["type"] == "InvalidKeyException"
        response = ts_server.request("GET", "/models", api="management", token=token)
        assert response.status_code == 400
    # The inference key does not open the management API.
    assert ts_server.request("GET", "/models", api="management", token=ts_server.token).status_code == 400
    assert ts_server.predict(**audio).status_code == 200


def test_worker_logs_its_thread_choice(ts_server):
    """threads: auto = available CPUs // maxWorkers (1), logged when the worker loads the model."""
    log = (ts_server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    match = re.search(r"CoNeTTE engine loaded on cpu with (\d+) torch threads \((\d+) CPUs available\)", log)
    assert match, "the worker did not log its thread choice"
    assert int(match.group(1)) == int(match.group(2)) >= 1


def test_model_registration_is_disabled(ts_server):
    response = ts_server.request("POST", "/models", api="management", params={"url": "conette.mar"})
    assert response.status_code == 405, response.text
    response = ts_server.request("DELETE", f"/models/{ts_server.model_name}", api="management")
    assert response.status_code == 405, response.text


def test_no_archive_model_directory_serves_and_stops_cleanly(tmp_path, test_checkpoint_dir, clips, expected):
    """The unpacked model directory (make mar-dir, for volume mounts) serves; stop leaves no process behind."""
    store = tmp_path / "store"
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_mar.sh"), str(test_checkpoint_dir), str(store),
                    "--no-archive"], check=True, capture_output=True, env=checkout_env(PYTHON=sys.executable))
    assert (store / "conette" / "MAR-INF" / "MANIFEST.json").is_file() and not (store / "conette.mar").exists()
    other_ports = {"inference": 18180, "management": 18181, "metrics": 18182, "grpc_inference": 17170,
                   "grpc_management": 17171}
    server = TorchServeInstance(workdir=tmp_path / "run", model_store=store, ports=free_ports(other_ports),
                                overrides={"load_models": "conette=conette"})
    server.workdir.mkdir()
    server.start()
    try:
        response = server.predict(data=clips["tone_ogg"], headers={"Content-Type": "audio/ogg"})
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), expected("tone_ogg"))
        assert server.own_processes(), "the server should be running"
        assert server.key_file.is_file()
    finally:
        server.stop()
    left = server.own_processes()
    assert not left, f"processes left after stop: {left}"
    assert not server.key_file.exists()
