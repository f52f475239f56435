"""The request codecs in-process: every style parsed and formatted, good and bad inputs (no server, no model)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from audio_factory import b64
import tritonclient.http as triton
from tritonclient.utils import deserialize_bytes_tensor

from conette_engine.errors import InputError
from conette_protocol import (HttpRequest, ParsedRequest, ServerError, choose_codec, error_reply, json_body,
                              kserve_v1, multipart, oip_v2, oip_v2_binary, raw)

CLIP = b"RIFF\x24\x00\x00\x00WAVEfmt "  # bytes the codecs pass on untouched (decoding is the engine's job)
OTHER = b"OggS\x00\x02" + bytes(range(40))
MAX_INSTANCES = 8
MODEL = {"name": "conette", "version": "1.0", "checkpoint_sha256": "0" * 64}
HOSTILE_OPTIONS = {"beam_size": "\u00b2", "min_pred_size": "9" * 5000, "threshold": 10**400}


def parse_request(http_request: HttpRequest, max_instances: int) -> tuple:
    """(codec, ParsedRequest), as the handler gets them."""
    codec = choose_codec(http_request)
    return codec, codec.parse(http_request, max_instances)



def request(body=None, content_type: str | None = None, headers: dict | None = None, **fields) -> HttpRequest:
    all_fields = dict(fields)
    if body is not None:
        all_fields["body"] = body
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["content-type"] = content_type
    return HttpRequest(all_fields, all_headers)


def v2_binary(header: dict, binary: bytes) -> HttpRequest:
    head = json.dumps(header).encode()
    return request(head + binary, "application/octet-stream",
                   headers={"inference-header-content-length": str(len(head))})


def bytes_elements(*payloads: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(p)) + p for p in payloads)


def v2_input(data, shape=None, **extra) -> dict:
    return {"name": "audio", "datatype": "BYTES", "shape": shape or [len(data)], "data": data, **extra}


# ---- parse: good requests, table-driven -------------------------------------------------------------------------

GOOD = {
    "raw audio with query options": (
        request(CLIP, "audio/wav", task="macs", beam_size="2", model_name="conette"),
        raw, [(CLIP, {"task": "macs", "beam_size": "2"})], None),
    "raw body without Content-Type": (request(OTHER), raw, [(OTHER, {})], None),
    "multipart field audio": (request(audio=CLIP, threshold="0.5"), multipart, [(CLIP, {"threshold": "0.5"})], None),
    "multipart field data": (request(data=OTHER), multipart, [(OTHER, {})], None),
    "JSON decoded by TorchServe": (
        request({"audio": b64(CLIP), "beam_size": 4}, "application/json"), json_body, [(CLIP, {"beam_size": 4})],
        None),
    "JSON upper-case media type": (
        request(json.dumps({"audio": b64(CLIP), "task": "macs"}).encode(), "APPLICATION/JSON"),
        json_body, [(CLIP, {"task": "macs"})], None),
    "JSON with charset": (
        request(json.dumps({"audio": b64(CLIP)}).encode(), "application/json; charset=utf-8"),
        json_body, [(CLIP, {})], None),
    "JSON without Content-Type": (
        request(b' {"audio": "%s"}' % b64(CLIP).encode()), json_body, [(CLIP, {})], None),
    "JSON numbers and strings pass through unchanged": (
        request({"audio": b64(CLIP), **HOSTILE_OPTIONS}, "application/json"), json_body,
        [(CLIP, HOSTILE_OPTIONS)], None),
    "KServe v1": (
        request({"instances": [{"audio": {"b64": b64(CLIP)}, "task": "audiocaps"}, {"audio": b64(OTHER)}]},
                "application/json", beam_size="2"),
        kserve_v1, [(CLIP, {"beam_size": "2", "task": "audiocaps"}), (OTHER, {"beam_size": "2"})], None),
    "OIP v2 JSON": (
        request({"id": "r1", "inputs": [v2_input([b64(CLIP), b64(OTHER)])], "parameters": {"beam_size": 2}},
                "application/json"),
        oip_v2, [(CLIP, {"beam_size": 2}), (OTHER, {"beam_size": 2})], "r1"),
    "OIP v2 nested data, shape [2, 1], untyped body": (
        request(json.dumps({"inputs": [v2_input([[b64(CLIP)], [b64(OTHER)]], shape=[2, 1])]}).encode()),
        oip_v2, [(CLIP, {}), (OTHER, {})], None),
    "OIP v2 reserved parameters are not options": (
        request({"inputs": [v2_input([b64(CLIP)], parameters={"task": "macs"})],
                 "parameters": {"binary_data_output": True, "timeout": 5, "priority": 1, "sequence_id": 0,
                                "threshold": "0.4"}}, "application/json"),
        oip_v2, [(CLIP, {"threshold": "0.4", "task": "macs"})], None),
    "OIP v2 hostile option values pass through unchanged": (
        request({"inputs": [v2_input([b64(CLIP)])], "parameters": HOSTILE_OPTIONS}, "application/json"),
        oip_v2, [(CLIP, HOSTILE_OPTIONS)], None),
    "OIP v2 binary extension": (
        v2_binary({"id": 7, "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [2],
                                        "parameters": {"binary_data_size": len(bytes_elements(CLIP, OTHER))}}],
                   "parameters": {"task": "macs"}}, bytes_elements(CLIP, OTHER)),
        oip_v2_binary, [(CLIP, {"task": "macs"}), (OTHER, {"task": "macs"})], "7"),
}


@pytest.mark.parametrize("case", GOOD)
def test_parse_good_requests(case):
    http_request, codec, items, request_id = GOOD[case]
    chosen, parsed = parse_request(http_request, MAX_INSTANCES)
    assert chosen is codec
    assert [(item.audio, item.options) for item in parsed.items] == items
    assert parsed.request_id == request_id


def test_v2_items_say_where_they_came_from():
    _, parsed = parse_request(request({"inputs": [v2_input([b64(CLIP)] * 2)]}, "application/json"), MAX_INSTANCES)
    assert [item.where for item in parsed.items] == ["audio.data[0]: ", "audio.data[1]: "]


# ---- parse: bad requests, table-driven: (request, error type, words the message must hold) --------------------

def v2(inputs=None, **body) -> HttpRequest:
    return request({"inputs": [v2_input([b64(CLIP)])] if inputs is None else inputs, **body}, "application/json")


BINARY_HEADER = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                             "parameters": {"binary_data_size": len(bytes_elements(CLIP))}}]}
BAD = {
    "invalid JSON": (request(b'{"audio": ', "application/json"), "invalid_request", "not valid JSON"),
    "invalid JSON, upper-case type": (request(b"{nope", "Application/JSON"), "invalid_request", "not valid JSON"),
    "JSON list": (request([1, 2], "application/json"), "invalid_request", "must be an object"),
    "JSON without audio": (request({"task": "macs"}, "application/json"), "missing_audio", "'audio' is missing"),
    "JSON audio not a string": (request({"audio": 3}, "application/json"), "invalid_request", "base64 string"),
    "JSON bad base64": (request({"audio": "***"}, "application/json"), "invalid_base64", "not valid base64"),
    "text body": (request("hello", "text/plain"), "missing_audio", "no audio"),
    "form without audio": (request(task="macs"), "missing_audio", "no audio"),
    "v1 instances not a list": (request({"instances": {}}, "application/json"), "invalid_request", "non-empty"),
    "v1 empty instances": (request({"instances": []}, "application/json"), "invalid_request", "non-empty"),
    "v1 instance not an object": (request({"instances": [3]}, "application/json"), "invalid_request",
                                  "instances[0]"),
    "v1 bad base64 in instance 1": (
        request({"instances": [{"audio": b64(CLIP)}, {"audio": {"b64": "%%"}}]}, "application/json"),
        "invalid_base64", "instances[1].audio"),
    "v1 too many instances": (request({"instances": [{"audio": b64(CLIP)}] * 9}, "application/json"),
                              "too_many_instances", "maximum is 8"),
    "v2 inputs not a list": (v2(inputs={"name": "audio"}), "invalid_request", "list of objects"),
    "v2 no audio input": (v2(inputs=[{"name": "sound", "data": []}]), "invalid_request", "'audio'"),
    "v2 extra input": (v2(inputs=[v2_input([b64(CLIP)]), {"name": "extra", "data": [1]}]), "invalid_request",
                       "exactly one input"),
    "v2 wrong datatype": (v2(inputs=[v2_input([1.0], datatype="FP32")]), "invalid_request", "BYTES"),
    "v2 no data": (v2(inputs=[{"name": "audio", "datatype": "BYTES", "shape": [1]}]), "invalid_request", "'data'"),
    "v2 empty data": (v2(inputs=[v2_input([], shape=[0])]), "missing_audio", "no audio"),
    "v2 shape disagrees with data": (v2(inputs=[v2_input([b64(CLIP)] * 2, shape=[3])]), "invalid_request",
                                     "shape [3] holds 3"),
    "v2 shape [1, 2] for one item": (v2(inputs=[v2_input([b64(CLIP)], shape=[1, 2])]), "invalid_request", "shape"),
    "v2 shape not integers": (v2(inputs=[v2_input([b64(CLIP)], shape=["1"])]), "invalid_request",
                              "non-negative integers"),
    "v2 parameters a list": (v2(parameters=["beam_size", 2]), "invalid_request", "'parameters' must be an object"),
    "v2 input parameters a string": (v2(inputs=[v2_input([b64(CLIP)], parameters="x")]), "invalid_request",
                                     "audio.parameters"),
    "v2 shared memory": (v2(inputs=[v2_input([b64(CLIP)], parameters={"shared_memory_region": "r"})]),
                         "invalid_request", "not supported"),
    "v2 classification output": (v2(outputs=[{"name": "score", "parameters": {"classification": 3}}]),
                                 "invalid_request", "not supported"),
    "v2 unknown output": (v2(outputs=[{"name": "logits"}]), "invalid_request", "unknown output 'logits'"),
    "v2 outputs not a list": (v2(outputs={"name": "caption"}), "invalid_request", "'outputs'"),
    "v2 binary_data not a boolean": (v2(outputs=[{"name": "caption", "parameters": {"binary_data": "yes"}}]),
                                     "invalid_request", "true or false"),
    "v2 binary_data_output not a boolean": (v2(parameters={"binary_data_output": 1}), "invalid_request",
                                            "true or false"),
    "v2 binary_data_size without the extension": (
        v2(inputs=[{"name": "audio", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4}}]),
        "invalid_request", "Inference-Header-Content-Length"),
    "v2 too many instances": (v2(inputs=[v2_input([b64(CLIP)] * 9)]), "too_many_instances", "maximum is 8"),
    "v2 bad base64": (v2(inputs=[v2_input(["@@"])]), "invalid_base64", "audio.data[0]"),
    "binary header length not a number": (
        request(b"{}", headers={"inference-header-content-length": "x1"}), "invalid_request", "must be an integer"),
    "binary header length past the body": (
        request(b"{}", headers={"inference-header-content-length": "3"}), "invalid_request", "body length (2)"),
    "binary header not JSON": (
        request(b"{{{{", headers={"inference-header-content-length": "4"}), "invalid_request", "JSON header"),
    "binary header without inputs": (v2_binary({"id": 1}, b""), "invalid_request", "'inputs'"),
    "binary size disagrees with the section": (
        v2_binary(BINARY_HEADER, bytes_elements(CLIP) + b"\0"), "invalid_request", "binary section holds"),
    "binary element runs past the section": (
        v2_binary({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                               "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 99) + b"ab"),
        "invalid_request", "runs past"),
    "binary element length truncated": (
        v2_binary({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                               "parameters": {"binary_data_size": 2}}]}, b"\1\0"), "invalid_request", "truncated"),
    "binary section without binary_data_size": (
        v2_binary({"inputs": [v2_input([b64(CLIP)])]}, b"xyz"), "invalid_request", "no input has"),
    "binary and JSON data in one input": (
        v2_binary({"inputs": [v2_input([b64(CLIP)], parameters={"binary_data_size": 4})]}, bytes_elements(b"")),
        "invalid_request", "both 'data'"),
    "binary shape disagrees": (
        v2_binary({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [2],
                               "parameters": {"binary_data_size": len(bytes_elements(CLIP))}}]},
                  bytes_elements(CLIP)), "invalid_request", "shape [2]"),
    "binary_data_size negative": (
        v2_binary({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                               "parameters": {"binary_data_size": -1}}]}, b""), "invalid_request", "non-negative"),
}


@pytest.mark.parametrize("case", BAD)
def test_parse_bad_requests(case):
    http_request, error_type, words = BAD[case]
    with pytest.raises(InputError) as caught:
        parse_request(http_request, MAX_INSTANCES)
    assert caught.value.type == error_type
    assert words in caught.value.message
    assert caught.value.http_status == 400


# ---- format -------------------------------------------------------------------------------------------------------

def answer(caption: str, score: float) -> dict:
    return {"caption": caption, "score": score, "candidates": [{"caption": caption, "score": score}],
            "task": "clotho", "tags": [{"label": "Speech", "score": 0.75}],
            "audio": {"duration_s": 1.0, "sample_rate": 16000, "channels": 1}, "model": MODEL}


ANSWERS = [answer("a dog barks", -0.5), answer("rain falls on a roof", -1.25)]


@pytest.mark.parametrize("codec", [raw, multipart, json_body])
def test_single_clip_styles_answer_with_the_answer(codec):
    reply = codec.format(ParsedRequest(items=[]), ANSWERS[:1], MODEL)
    assert (reply.status, reply.content_type, reply.headers) == (200, "application/json", {})
    assert json.loads(reply.body) == ANSWERS[0]


def test_kserve_v1_answers_predictions():
    assert json.loads(kserve_v1.format(ParsedRequest(items=[]), ANSWERS, MODEL).body) == {"predictions": ANSWERS}


def test_v2_json_answer():
    codec, parsed = parse_request(v2(id="abc", inputs=[v2_input([b64(CLIP)] * 2)]), MAX_INSTANCES)
    reply = codec.format(parsed, ANSWERS, MODEL)
    assert reply.content_type == "application/json" and reply.headers == {}
    body = json.loads(reply.body)
    assert (body["model_name"], body["model_version"], body["id"]) == ("conette", "1.0", "abc")
    assert body["outputs"] == [
        {"name": "caption", "datatype": "BYTES", "shape": [2], "data": ["a dog barks", "rain falls on a roof"]},
        {"name": "score", "datatype": "FP32", "shape": [2], "data": [-0.5, -1.25]},
        {"name": "tags", "datatype": "BYTES", "shape": [2], "data": [json.dumps(ANSWERS[0]["tags"])] * 2},
    ]


def split_binary(reply) -> tuple[dict, bytes]:
    length = int(reply.headers["Inference-Header-Content-Length"])
    return json.loads(reply.body[:length]), reply.body[length:]


def test_v2_outputs_asked_in_binary_come_back_in_binary():
    codec, parsed = parse_request(v2(inputs=[v2_input([b64(CLIP)] * 2)], outputs=[
        {"name": "score", "parameters": {"binary_data": True}}, {"name": "caption"}]), MAX_INSTANCES)
    reply = codec.format(parsed, ANSWERS, MODEL)
    assert reply.content_type == "application/octet-stream"
    header, binary = split_binary(reply)
    assert [o["name"] for o in header["outputs"]] == ["score", "caption"]  # only those asked for, in that order
    score, caption = header["outputs"]
    assert score["parameters"] == {"binary_data_size": 8} and "data" not in score
    assert np.frombuffer(binary, dtype="<f4").tolist() == [-0.5, -1.25]
    assert caption["data"] == ["a dog barks", "rain falls on a roof"]


def test_binary_data_output_sends_every_output_in_binary():
    codec, parsed = parse_request(v2(inputs=[v2_input([b64(CLIP)] * 2)], parameters={"binary_data_output": True}),
                           MAX_INSTANCES)
    header, binary = split_binary(codec.format(parsed, ANSWERS, MODEL))
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sum(sizes) == len(binary)
    captions = deserialize_bytes_tensor(binary[: sizes[0]])
    assert [c.decode() for c in captions] == ["a dog barks", "rain falls on a roof"]
    tags = deserialize_bytes_tensor(binary[sizes[0] + sizes[1]:])
    assert [json.loads(t) for t in tags] == [ANSWERS[0]["tags"]] * 2


def test_tritonclient_reads_the_binary_answer():
    """tritonclient's own request builder and response parser, around the codec (no server)."""
    audio = triton.InferInput("audio", [2], "BYTES")
    audio.set_data_from_numpy(np.array([CLIP, OTHER], dtype=np.object_), binary_data=True)
    body, json_size = triton.InferenceServerClient.generate_request_body([audio], request_id="t1",
                                                                         parameters={"task": "macs"})
    http_request = request(body, headers={"inference-header-content-length": str(json_size)})
    codec, parsed = parse_request(http_request, MAX_INSTANCES)
    assert codec is oip_v2_binary and parsed.request_id == "t1"
    assert [(item.audio, item.options) for item in parsed.items] == [(CLIP, {"task": "macs"}),
                                                                      (OTHER, {"task": "macs"})]
    reply = codec.format(parsed, ANSWERS, MODEL)
    result = triton.InferenceServerClient.parse_response_body(
        reply.body, header_length=int(reply.headers["Inference-Header-Content-Length"]))
    assert result.as_numpy("caption").tolist() == [b"a dog barks", b"rain falls on a roof"]
    assert result.as_numpy("score").tolist() == [-0.5, -1.25]
    assert result.get_response()["id"] == "t1"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("style", ["json", "v1", "v2 json", "v2 binary"])
def test_non_finite_numbers_are_server_errors_not_invalid_json(style, value):
    requests_by_style = {
        "json": request({"audio": b64(CLIP)}, "application/json"),
        "v1": request({"instances": [{"audio": b64(CLIP)}]}, "application/json"),
        "v2 json": v2(),
        "v2 binary": v2(parameters={"binary_data_output": True}),
    }
    codec, parsed = parse_request(requests_by_style[style], MAX_INSTANCES)
    with pytest.raises(ServerError):
        codec.format(parsed, [answer("x", value)], MODEL)


def test_error_reply_shape():
    reply = error_reply(InputError("beam_size must be an integer in [1, 16], got 0", type="invalid_option"))
    assert reply.status == 400 and reply.content_type == "application/json"
    assert json.loads(reply.body) == {"error": {"type": "invalid_option",
                                                "message": "beam_size must be an integer in [1, 16], got 0"}}
    server = error_reply(ServerError())
    assert server.status == 500 and json.loads(server.body)["error"]["type"] == "internal_error"


@pytest.mark.parametrize("codec", [raw, multipart, json_body, kserve_v1])
def test_errors_have_the_project_shape(codec):
    reply = codec.format_error(InputError("audio.data[0]: no audio", type="missing_audio"))
    assert reply.status == 400
    assert json.loads(reply.body) == {"error": {"type": "missing_audio", "message": "audio.data[0]: no audio"}}


@pytest.mark.parametrize("codec", [oip_v2, oip_v2_binary])
def test_v2_errors_have_the_protocol_shape(codec):
    """OIP v2 clients read `error` as a string (tritonclient fails on an object there)."""
    reply = codec.format_error(InputError("shape [3] holds 3 elements", type="invalid_request"))
    assert reply.status == 400
    assert json.loads(reply.body) == {"error": "shape [3] holds 3 elements", "type": "invalid_request"}
    assert json.loads(codec.format_error(ServerError()).body)["type"] == "internal_error"
