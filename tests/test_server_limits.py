"""Hostile and expensive requests against the real server: each gets a 4xx that says what is wrong, and the exact
answers of TorchServe's frontend where it answers before the handler (docs/reliability.md "Failure statuses")."""

from __future__ import annotations

import json
import subprocess

import pytest

from audio_factory import b64, make_audio
from fuzz_cases import handler_error

OCTET = {"Content-Type": "application/octet-stream"}



def assert_handler_error(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.text)  # strict: a bare NaN would not parse as an error body either
    error = handler_error(body)
    assert error["type"] == error_type, body
    return error


@pytest.fixture(scope="module")
def tone(tmp_path_factory) -> bytes:
    return make_audio(tmp_path_factory.mktemp("tone"), "wav16", seconds=1.0, sample_rate=16000).read_bytes()


def float_wav(tmp_path, name: str, gain: str) -> bytes:
    """A 32-bit float WAV made by FFmpeg with its samples scaled by `gain` (float PCM does not clip)."""
    path = tmp_path / f"{name}.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi",
                    "-i", "sine=frequency=440:duration=1.5:sample_rate=16000",
                    "-af", f"volume={gain}", "-c:a", "pcm_f32le", str(path)], check=True, capture_output=True)
    return path.read_bytes()


# ---- issue: option values that crashed parsing (500) -------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("beam_size", "²"), ("beam_size", "+-3"), ("beam_size", "9" * 5000), ("threshold", "1" * 401),
    ("threshold", "1e999"), ("max_pred_size", "٣"),
])
@pytest.mark.parametrize("style", ["json", "form", "v1"])
def test_hostile_option_values_get_400(ts_server, tone, style, name, value):
    if style == "json":
        response = ts_server.predict(json={"audio": b64(tone), name: value})
    elif style == "form":
        response = ts_server.predict(files={"audio": ("a.wav", tone, "audio/wav")}, data={name: value})
    else:
        response = ts_server.request("POST", "/v1/models/conette:predict",
                                     json={"instances": [{"audio": {"b64": b64(tone)}, name: value}]})
    error = assert_handler_error(response, 400, "invalid_option")
    assert name in error["message"] and len(error["message"]) < 300  # never echoes a 5000-digit value


def test_json_number_of_401_digits_gets_400(ts_server, tone):
    body = f'{{"audio": "{b64(tone)}", "threshold": {"1" * 401}}}'
    response = ts_server.predict(data=body, headers={"Content-Type": "application/json"})
    assert_handler_error(response, 400, "invalid_option")


# ---- issue: samples of huge magnitude gave "score": NaN ----------------------------------------------------------

def test_float_wav_beyond_the_sample_range_gets_400_and_never_nan(ts_server, tmp_path, tone):
    loud = float_wav(tmp_path, "loud", "1e18")  # samples ~1.2e17: the log-mel power overflowed to NaN
    for response in (
        ts_server.predict(data=loud, headers=OCTET),
        ts_server.request("POST", "/v2/models/conette/infer", json={"inputs": [
            {"name": "audio", "datatype": "BYTES", "shape": [2], "data": [b64(tone), b64(loud)]}]}),
    ):
        error = assert_handler_error(response, 400, "audio_out_of_range")
        assert "1000" in error["message"]


def test_float_wav_a_little_above_full_scale_is_captioned(ts_server, tmp_path):
    response = ts_server.predict(data=float_wav(tmp_path, "hot", "2"), headers=OCTET)
    assert response.status_code == 200, response.text
    answer = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in the answer"))
    assert answer["caption"]


# ---- issue: a legal workload that overran responseTimeout and killed the worker ----------------------------------

def test_request_over_the_work_limit_gets_400_before_any_model_work(ts_server, tmp_path):
    clip = make_audio(tmp_path, "wav16", seconds=30.0, sample_rate=8000).read_bytes()
    pid_before = [w["pid"] for w in ts_server.workers()]
    heavy = {"beam_size": 16, "min_pred_size": 100, "max_pred_size": 100}
    response = ts_server.request("POST", "/v1/models/conette:predict",
                                 json={"instances": [{"audio": {"b64": b64(clip)}, **heavy}] * 8}, timeout=30)
    error = assert_handler_error(response, 400, "request_too_expensive")
    assert "one request may use" in error["message"] and "beam_size" in error["message"]
    # One such clip is within the limit, and answered.
    response = ts_server.predict(json={"audio": b64(clip), **heavy})
    assert response.status_code == 200, response.text
    assert [w["pid"] for w in ts_server.workers()] == pid_before


# ---- answers of TorchServe's frontend (before the handler): pinned so that a change is noticed --------------------

def test_binary_body_declared_as_form_urlencoded_is_refused_by_the_frontend(ts_server, tone):
    """The frontend form-decodes such a body itself and answers 500 ErrorDataDecoderException (its own JSON shape,
    echoing part of the body); the handler never sees it. Clients must send audio/* or application/octet-stream."""
    response = ts_server.predict(data=tone, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == 500 and body["type"] == "ErrorDataDecoderException" and "error" not in body
    assert ts_server.predict(data=tone, headers={"Content-Type": "audio/wav"}).status_code == 200


def test_oversized_body_gets_a_bare_413(ts_server):
    response = ts_server.predict(data=b"\0" * (16 * 1024 * 1024 + 1), headers={"Content-Type": "audio/wav"})
    assert response.status_code == 413 and response.content == b""


def test_api_description_needs_no_token(ts_server):
    """OPTIONS / and GET /api-description sit before the token check: the OpenAPI text of TorchServe (no model
    data, no keys). Everything else on the inference port needs the key, /ping included."""
    for method, path in (("OPTIONS", "/"), ("GET", "/api-description")):
        response = ts_server.request(method, path, token=None)
        assert response.status_code == 200 and response.json()["openapi"].startswith("3.")
    assert ts_server.request("GET", "/ping", token=None).status_code == 400
