"""The TorchServe handler in-process: a real ts Context and the generated test checkpoint, no server.

Every answer is checked against the engine run on the same clip alone; the 500 paths use the real engine with
one request made to fail.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace

import pytest
import yaml
from ts.context import Context, RequestProcessor

from audio_factory import b64, make_audio
from conette_engine.engine import CaptioningEngine
from conette_handler import ConetteHandler
from conftest import REPO_ROOT

SCORE_ATOL = 1e-4


class RecordedMetric:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def add_or_update(self, value, dimension_values):
        self.log.append((self.name, value, tuple(dimension_values)))


class RecordingMetrics:
    """TorchServe's metrics cache interface (get_metric(...).add_or_update(...)), keeping what was recorded."""

    def __init__(self):
        self.log: list = []

    def get_metric(self, name, metric_type):
        return RecordedMetric(self.log, name)


@pytest.fixture(scope="module")
def handler(test_checkpoint_dir) -> ConetteHandler:
    config = yaml.safe_load((REPO_ROOT / "handler" / "model-config.yaml").read_text())
    context = Context("conette", str(test_checkpoint_dir), {"model": {"modelVersion": "1.0"}}, 8, None, "0.12.0",
                      metrics=RecordingMetrics(), model_yaml_config=config)
    handler = ConetteHandler()
    handler.initialize(context)
    return handler


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("handler_clips")
    return {"tone": make_audio(tmp, "ogg", seconds=1.0, sample_rate=48000).read_bytes(),
            "speech": make_audio(tmp, "wav16", seconds=1.6, sample_rate=22050, signal="speech").read_bytes()}


@pytest.fixture(scope="module")
def solo(handler, clips):
    """solo(clip, **options) -> the engine's answer for that clip alone."""
    def answer(name: str, **options) -> dict:
        engine: CaptioningEngine = handler.engine
        options = engine.parse_options({**handler.default_options, **options})
        return engine.caption_segments([engine.load_audio(clips[name], options=options)], [options])[0].to_dict()
    return answer



def serve(handler: ConetteHandler, requests: list[tuple[dict, dict]]) -> list[tuple[int, dict, bytes]]:
    """One TorchServe batch: (fields, HTTP headers) per request -> (status, response headers, body) per request."""
    context = handler.context
    context.request_ids = {idx: f"ts-{idx}" for idx in range(len(requests))}
    processors = []
    for fields, headers in requests:
        # TorchServe's layout: each parameter's content type under its name, then the HTTP headers.
        content_type = headers.get("Content-Type", "")
        per_field = {name: {"content-type": content_type if name == "body" else ""} for name in fields}
        processors.append(RequestProcessor({**per_field, **headers}))
    context.request_processor = processors
    bodies = handler.handle([fields for fields, _ in requests], context)
    return [(context.get_response_status(idx)[0], context.get_response_headers(idx), body)
            for idx, body in enumerate(bodies)]


def raw(audio: bytes, content_type="audio/ogg", **query) -> tuple[dict, dict]:
    return {"body": audio, **query}, {"Content-Type": content_type}


def as_json(body: dict, content_type="application/json") -> tuple[dict, dict]:
    decoded = content_type == "application/json"  # TorchServe decodes only this exact type
    return {"body": body if decoded else json.dumps(body).encode()}, {"Content-Type": content_type}


def v2_binary(header: dict, payloads: list[bytes]) -> tuple[dict, dict]:
    binary = b"".join(struct.pack("<I", len(p)) + p for p in payloads)
    header["inputs"][0].setdefault("parameters", {})["binary_data_size"] = len(binary)
    head = json.dumps(header).encode()
    return {"body": head + binary}, {"Inference-Header-Content-Length": str(len(head))}


def assert_same(got: dict, want: dict) -> None:
    assert got["caption"] == want["caption"] and got["task"] == want["task"]
    assert got["score"] == pytest.approx(want["score"], abs=SCORE_ATOL)
    assert [t["label"] for t in got["tags"]] == [t["label"] for t in want["tags"]]


def test_every_request_style_in_one_batch(handler, clips, solo):
    v2_header = {"id": "bin-1", "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [2]}],
                 "parameters": {"task": "macs", "binary_data_output": True}}
    replies = serve(handler, [
        raw(clips["tone"], task="audiocaps", beam_size="2", model_name="conette"),
        ({"audio": clips["speech"], "threshold": "0.5"}, {"Content-Type": "multipart/form-data; boundary=x"}),
        as_json({"audio": b64(clips["tone"]), "beam_size": 4}, "APPLICATION/JSON; charset=utf-8"),
        as_json({"instances": [{"audio": {"b64": b64(clips["speech"])}}, {"audio": b64(clips["tone"]),
                                                                          "task": "clotho"}]}),
        as_json({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": [b64(clips["tone"])]}]}),
        v2_binary(v2_header, [clips["speech"], clips["tone"]]),
    ])
    assert [status for status, _, _ in replies] == [200] * 6
    assert_same(json.loads(replies[0][2]), solo("tone", task="audiocaps", beam_size=2))
    assert_same(json.loads(replies[1][2]), solo("speech", threshold=0.5))
    assert_same(json.loads(replies[2][2]), solo("tone", beam_size=4))
    predictions = json.loads(replies[3][2])["predictions"]
    assert_same(predictions[0], solo("speech"))
    assert_same(predictions[1], solo("tone", task="clotho"))
    assert predictions[0]["model"] == {"name": "conette", "version": "1.0",
                                       "checkpoint_sha256": handler.engine.checkpoint_sha256}
    v2_json = json.loads(replies[4][2])
    assert v2_json["id"] == "ts-4"  # no client id: TorchServe's request id
    assert v2_json["outputs"][0]["data"] == [solo("tone")["caption"]]

    status, headers, body = replies[5]
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["id"] == "bin-1" and [o["name"] for o in header["outputs"]] == ["caption", "score", "tags"]
    caption_size, score_size = (o["parameters"]["binary_data_size"] for o in header["outputs"][:2])
    binary = body[length:]
    scores = struct.unpack("<2f", binary[caption_size: caption_size + score_size])
    assert list(scores) == pytest.approx([solo(n, task="macs")["score"] for n in ("speech", "tone")], abs=SCORE_ATOL)
    first = struct.unpack_from("<I", binary)[0]
    assert binary[4: 4 + first].decode() == solo("speech", task="macs")["caption"]


def test_client_errors_get_their_own_status_in_a_mixed_batch(handler, clips, solo):
    v2_input = {"name": "audio", "datatype": "BYTES", "shape": [1], "data": [b64(clips["tone"])]}
    replies = serve(handler, [
        as_json({"audio": b64(clips["tone"]), "beam_size": "\u00b2"}),
        ({"audio": clips["tone"], "min_pred_size": "9" * 5000}, {"Content-Type": "multipart/form-data; b=1"}),
        as_json({"inputs": [v2_input], "parameters": {"threshold": 10**401}}),
        raw(clips["speech"], content_type="application/octet-stream"),
        as_json({"inputs": [{**v2_input, "shape": [2]}]}),
        ({"body": b'{"audio": '}, {"Content-Type": "Application/Json"}),
        as_json({"instances": [{"audio": b64(clips["tone"])}, {"audio": b64(b"not audio" * 40)}]}),
        raw(b"", content_type="audio/wav"),
    ])
    statuses = [status for status, _, _ in replies]
    assert statuses == [400, 400, 400, 200, 400, 400, 400, 400]
    assert_same(json.loads(replies[3][2]), solo("speech"))
    errors = [json.loads(body) for _, _, body in replies]
    assert errors[0]["error"]["type"] == "invalid_option" and "beam_size" in errors[0]["error"]["message"]
    assert errors[1]["error"]["type"] == "invalid_option" and "min_pred_size" in errors[1]["error"]["message"]
    assert len(errors[1]["error"]["message"]) < 200  # the 5000 digits are not echoed back
    assert errors[2] == {"error": errors[2]["error"], "type": "invalid_option"}  # OIP v2 error shape
    assert "audio.data[0]: threshold" in errors[2]["error"]
    assert errors[4]["type"] == "invalid_request" and "shape [2]" in errors[4]["error"]
    assert errors[5]["error"]["type"] == "invalid_request" and "JSON" in errors[5]["error"]["message"]
    assert errors[6]["error"]["type"] == "undecodable_audio" and "instances[1]" in errors[6]["error"]["message"]
    assert errors[7]["error"]["type"] == "empty_audio"
    recorded = [entry for entry in handler.context.metrics.log if entry[0] == "RequestErrors"]
    assert ("RequestErrors", 1, ("conette", "Model", "undecodable_audio")) in recorded


@pytest.fixture
def poisoned(handler, clips, monkeypatch):
    """The real engine, except that clips as long as the speech clip make it raise (or, with .nan, give NaN)."""
    poison_s = handler.engine.load_audio(clips["speech"]).duration_s
    real_caption = handler.engine.caption_segments
    mode = {"nan": False}

    def caption(audios, options, timings=None):
        results = real_caption(audios, options, timings=timings)
        if any(audio.duration_s == poison_s for audio in audios):
            if not mode["nan"]:
                raise RuntimeError("simulated engine failure")
            results = [replace(r, score=math.nan) if a.duration_s == poison_s else r for a, r in zip(audios, results)]
        return results

    monkeypatch.setattr(handler.engine, "caption_segments", caption)
    return mode


def test_engine_failure_on_one_request_is_a_500_for_it_alone(handler, clips, solo, poisoned):
    replies = serve(handler, [
        raw(clips["tone"]),
        as_json({"audio": b64(clips["speech"])}),
        as_json({"instances": [{"audio": b64(clips["tone"])}]}),
        as_json({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": [b64(clips["speech"])]}]}),
    ])
    assert [status for status, _, _ in replies] == [200, 500, 200, 500]
    assert_same(json.loads(replies[0][2]), solo("tone"))
    assert_same(json.loads(replies[2][2])["predictions"][0], solo("tone"))
    assert json.loads(replies[1][2])["error"]["type"] == "internal_error"
    assert json.loads(replies[3][2])["type"] == "internal_error"
    assert replies[1][1]["content-type"] == "application/json"


@pytest.mark.parametrize("style", ["json", "v2"])
def test_non_finite_number_from_the_engine_is_a_500_not_invalid_json(handler, clips, solo, poisoned, style):
    poisoned["nan"] = True
    speech = {"json": as_json({"audio": b64(clips["speech"])}),
              "v2": as_json({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                         "data": [b64(clips["speech"])]}]})}[style]
    replies = serve(handler, [speech, raw(clips["tone"])])
    assert [status for status, _, _ in replies] == [500, 200]
    body = json.loads(replies[0][2])  # valid JSON
    assert (body["error"]["type"] if style == "json" else body["type"]) == "internal_error"
    assert_same(json.loads(replies[1][2]), solo("tone"))


def test_crash_while_decoding_one_request_is_a_500_for_it_alone(handler, clips, solo, monkeypatch):
    real_load = handler.engine.load_audio

    def load_audio(source, sample_rate=None, options=None):
        if source == clips["speech"]:
            raise MemoryError("simulated decoder crash")
        return real_load(source, sample_rate, options=options)

    monkeypatch.setattr(handler.engine, "load_audio", load_audio)
    replies = serve(handler, [raw(clips["speech"]), raw(clips["tone"])])
    assert [status for status, _, _ in replies] == [500, 200]
    assert json.loads(replies[0][2]) == {"error": {"type": "internal_error", "message": (
        "the server failed on this request; see the model log")}}


def test_unknown_handler_settings_fail_at_load(test_checkpoint_dir):
    context = Context("conette", str(test_checkpoint_dir), {}, 1, None, "0.12.0", metrics=RecordingMetrics(),
                      model_yaml_config={"handler": {"beam_size": 2, "beam": 3}})
    with pytest.raises(ValueError, match="beam"):
        ConetteHandler().initialize(context)


def test_segmented_and_whole_clip_requests_share_one_engine_call(handler, clips, solo, monkeypatch):
    """One caption_segments call for the batch; each request gets the answer it gets alone."""
    calls = []
    real_caption = handler.engine.caption_segments

    def caption_segments(audios, options, timings=None):
        calls.append(len(audios))
        return real_caption(audios, options, timings=timings)

    monkeypatch.setattr(handler.engine, "caption_segments", caption_segments)
    replies = serve(handler, [raw(clips["speech"], segment_s="1"), raw(clips["tone"]),
                              as_json({"audio": b64(clips["speech"]), "segment_s": 1, "hop_s": 0.5})])
    assert [status for status, _, _ in replies] == [200, 200, 200] and calls == [3]
    for (_, _, body), want in zip(replies, [solo("speech", segment_s=1), solo("tone"),
                                            solo("speech", segment_s=1, hop_s=0.5)]):
        got = json.loads(body)
        assert set(got) == set(want) | {"model"}
        for got_part, want_part in zip(got.get("segments", [got]), want.get("segments", [want])):
            assert_same({**got_part, "task": got["task"]}, {**want_part, "task": want["task"]})
    assert [(s["start_s"], s["end_s"]) for s in json.loads(replies[2][2])["segments"]] == [(0.0, 1.0), (0.5, 1.6)]


def test_segment_options_are_not_handler_settings(test_checkpoint_dir):
    context = Context("conette", str(test_checkpoint_dir), {}, 1, None, "0.12.0", metrics=RecordingMetrics(),
                      model_yaml_config={"handler": {"segment_s": 10}})
    with pytest.raises(ValueError, match="per-request"):
        ConetteHandler().initialize(context)


def test_work_limit_comes_from_the_handler_settings(test_checkpoint_dir, clips):
    """max_request_work_s / max_request_beam_mib in model-config.yaml bound one request (400 beyond them)."""
    def handler_with(settings: dict) -> ConetteHandler:
        context = Context("conette", str(test_checkpoint_dir), {}, 8, None, "0.12.0", metrics=RecordingMetrics(),
                          model_yaml_config={"handler": settings})
        one = ConetteHandler()
        one.initialize(context)
        return one

    request = raw(clips["speech"], beam_size="16", max_pred_size="100")
    assert serve(handler_with({}), [request])[0][0] == 200
    for settings in ({"max_request_work_s": 0.5}, {"max_request_beam_mib": 1}):
        ((status, _, body),) = serve(handler_with(settings), [request])
        error = json.loads(body)["error"]
        assert (status, error["type"]) == (400, "request_too_expensive"), body
        assert "one request may use" in error["message"]
