"""Real client libraries, unmodified, against the real server: NVIDIA's tritonclient[http] and the KServe SDK.

Both call TorchServe's built-in routes POST /v2/models/{model}/infer and POST /v1/models/{model}:predict; the
only argument they need beyond the defaults is the Authorization header of TorchServe's token authorization.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from audio_factory import b64
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from test_server import SCORE_ATOL

CLIP_NAMES = ["speech_wav", "noise_mp3"]



@pytest.fixture(scope="module")
def triton_client(ts_server):
    return triton.InferenceServerClient(url=ts_server.inference_url.removeprefix("http://"))


def auth(ts_server) -> dict:
    return {"Authorization": f"Bearer {ts_server.token}"}


def assert_answers(captions, scores, want: list[dict]) -> None:
    assert [c.decode() if isinstance(c, bytes) else c for c in captions] == [w["caption"] for w in want]
    assert list(scores) == pytest.approx([w["score"] for w in want], abs=SCORE_ATOL)


def test_tritonclient_default_binary_mode(ts_server, triton_client, clips, expected):
    """Defaults: BYTES input as binary data, no outputs named, so every output comes back in binary."""
    audio = triton.InferInput("audio", [len(CLIP_NAMES)], "BYTES")
    audio.set_data_from_numpy(np.array([clips[n] for n in CLIP_NAMES], dtype=np.object_))
    result = triton_client.infer(ts_server.model_name, [audio], request_id="triton-1",
                                 parameters={"task": "audiocaps"}, headers=auth(ts_server))
    response = result.get_response()
    assert response["id"] == "triton-1" and response["model_name"] == ts_server.model_name
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])
    want = [expected(n, task="audiocaps") for n in CLIP_NAMES]
    assert_answers(result.as_numpy("caption"), result.as_numpy("score"), want)
    tags = [json.loads(t) for t in result.as_numpy("tags")]
    assert [[t["label"] for t in item] for item in tags] == [[t["label"] for t in w["tags"]] for w in want]


def test_tritonclient_json_input_and_chosen_outputs(ts_server, triton_client, clips, expected):
    audio = triton.InferInput("audio", [len(CLIP_NAMES), 1], "BYTES")
    audio.set_data_from_numpy(np.array([[b64(clips[n])] for n in CLIP_NAMES], dtype=np.object_), binary_data=False)
    outputs = [triton.InferRequestedOutput("caption", binary_data=False), triton.InferRequestedOutput("score")]
    result = triton_client.infer(ts_server.model_name, [audio], outputs=outputs, parameters={"beam_size": 2},
                                 headers=auth(ts_server))
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["caption", "score"]
    assert "data" in response["outputs"][0] and "binary_data_size" in response["outputs"][1]["parameters"]
    assert_answers(result.as_numpy("caption"), result.as_numpy("score"),
                   [expected(n, beam_size=2) for n in CLIP_NAMES])


def test_tritonclient_sees_client_errors(ts_server, triton_client, clips):
    audio = triton.InferInput("audio", [1], "BYTES")
    audio.set_data_from_numpy(np.array([clips["speech_wav"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(ts_server.model_name, [audio], parameters={"beam_size": "\u00b2"},
                            headers=auth(ts_server))
    assert caught.value.status() == "400"
    assert "beam_size must be an integer in [1, 16]" in caught.value.message()


# `make test` sets it to .venv-kserve's python (make install builds it from requirements-kserve.txt): kserve pins
# psutil<6, TorchServe's virtualenv has psutil 7. Set but missing is a failure, not a skip.
KSERVE_PYTHON = os.environ.get("CONETTE_KSERVE_PYTHON")


@pytest.mark.skipif(not KSERVE_PYTHON, reason="set CONETTE_KSERVE_PYTHON to a python with kserve installed "
                                              "(make test does: .venv-kserve)")
def test_kserve_sdk_v1_and_v2(ts_server, clips, expected, tmp_path):
    assert Path(KSERVE_PYTHON).is_file(), f"CONETTE_KSERVE_PYTHON={KSERVE_PYTHON} does not exist: run make install"
    paths = []
    for name in CLIP_NAMES:
        paths.append(tmp_path / name)
        paths[-1].write_bytes(clips[name])
    completed = subprocess.run(
        [KSERVE_PYTHON, str(Path(__file__).with_name("kserve_sdk_client.py")), ts_server.inference_url,
         ts_server.model_name, ts_server.token, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["v1"] == [expected(n)["caption"] for n in CLIP_NAMES]
    want = [expected(n, beam_size=2) for n in CLIP_NAMES]
    for style in ("v2_json", "v2_binary"):
        assert_answers(found[style]["caption"], found[style]["score"], want)
    assert found["v2_json"]["id"] == "kserve-json" and found["v2_binary"]["id"] == "kserve-binary"
    assert int(found["v2_binary_header"]) > 0  # the answer came back in the binary extension
    assert found["v2_error"]["status"] == 400
    assert found["v2_error"]["body"]["type"] == "invalid_option"  # the OIP v2 error shape
