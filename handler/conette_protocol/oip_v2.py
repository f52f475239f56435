"""Open Inference Protocol v2 (KServe v2 / Triton) JSON on POST /v2/models/{model}/infer.

Request: {"id": ..., "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [n], "data": [<base64>, ...]}],
"parameters": {<option>: <value>, ...}, "outputs": [{"name": "caption", "parameters": {"binary_data": true}}]}.
Answer: outputs `caption` (BYTES), `score` (FP32) and `tags` (BYTES, each a JSON list of {"label", "score"}),
each of shape [n]; with the option segment_s (a timeline of windows), `segments` (BYTES, each a JSON list of
{"start_s", "end_s", "caption", "score", "candidates", "tags"}) and `tags` (the whole recording's) instead.
Outputs asked for with `binary_data` (or all, with the request parameter `binary_data_output`)
come back in the binary tensor extension (see oip_v2_binary). Errors: {"error": "<message>", "type": "<type>"},
the protocol's shape (`error` is a string).
"""

from __future__ import annotations

import math
import struct
from typing import Any

from conette_engine.errors import InputError

from .records import (HttpRequest, Item, ParsedRequest, Reply, ServerError, check_instance_count, decode_base64,
                      dumps, json_object)

INPUT_NAME = "audio"
OUTPUT_DATATYPES = {"caption": "BYTES", "score": "FP32", "tags": "BYTES", "segments": "BYTES"}
CLIP_OUTPUTS = ("caption", "score", "tags")
SEGMENTED_OUTPUTS = ("segments", "tags")  # options are per request: all its clips are segmented or none
JSON_OUTPUTS = ("tags", "segments")  # BYTES outputs whose elements are JSON texts
# Parameters the protocol (or Triton's clients) define for their own use: never decoding options.
IGNORED_PARAMETERS = ("timeout", "priority", "sequence_id", "sequence_start", "sequence_end", "headers")
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size",
                          "classification")
BINARY_SIZE = "binary_data_size"  # input parameter: the input's bytes in the binary section
BINARY_OUTPUT = "binary_data"  # output parameter: this output in binary
BINARY_OUTPUTS = "binary_data_output"  # request parameter: every output not asked otherwise in binary
BINARY_PARAMETERS = (BINARY_SIZE, BINARY_OUTPUT, BINARY_OUTPUTS)


def accepts(request: HttpRequest) -> bool:
    body = json_object(request)
    return body is not None and "inputs" in body


def parse(request: HttpRequest, max_instances: int) -> ParsedRequest:
    return parse_header(json_object(request), request.query_options, max_instances, binary=None)


def parse_header(body: dict, query_options: dict, max_instances: int, binary: bytes | None) -> ParsedRequest:
    """The JSON part of a v2 request; `binary`: the binary section (binary extension) or None (plain JSON)."""
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise InputError("'inputs' must be a list of objects", type="invalid_request")
    names = [i.get("name") for i in inputs]
    if names != [INPUT_NAME]:
        raise InputError(f"'inputs' must hold exactly one input, a BYTES input named '{INPUT_NAME}'; got {names}",
                         type="invalid_request")
    audio_input = inputs[0]
    if audio_input.get("datatype", "BYTES") != "BYTES":
        raise InputError(f"input '{INPUT_NAME}' must have datatype BYTES", type="invalid_request")
    request_parameters = _parameters(body.get("parameters"), "parameters")
    input_parameters = _parameters(audio_input.get("parameters"), f"{INPUT_NAME}.parameters")
    binary_size = input_parameters.get(BINARY_SIZE)
    if binary_size is not None:
        payloads = _binary_payloads(audio_input, binary_size, binary)
    else:
        if binary:
            raise InputError(f"the binary section holds {len(binary)} bytes but no input has '{BINARY_SIZE}'",
                             type="invalid_request")
        payloads = [decode_base64(text, f"{INPUT_NAME}.data[{n}]") for n, text in enumerate(_flat_data(audio_input))]
    if not payloads:
        raise InputError(f"input '{INPUT_NAME}' holds no audio", type="missing_audio")
    _check_shape(audio_input.get("shape"), len(payloads))
    check_instance_count(len(payloads), max_instances)
    options = {**query_options, **_options(request_parameters), **_options(input_parameters)}
    client_id = body.get("id")
    return ParsedRequest(
        items=[Item(audio, options, where=f"{INPUT_NAME}.data[{n}]: ") for n, audio in enumerate(payloads)],
        request_id=str(client_id) if client_id is not None else None,
        outputs=_requested_outputs(body.get("outputs"), request_parameters.get(BINARY_OUTPUTS, False),
                                   SEGMENTED_OUTPUTS if options.get("segment_s") is not None else CLIP_OUTPUTS),
    )


def format(parsed: ParsedRequest, answers: list[dict], model: dict) -> Reply:
    tensors = {name: [dumps(answer[name]).decode("utf-8") if name in JSON_OUTPUTS else answer[name]
                      for answer in answers]
               for name in parsed.outputs}
    header = {"model_name": model["name"], "model_version": model["version"], "id": parsed.request_id,
              "outputs": []}
    buffers = []
    for name, binary in parsed.outputs.items():
        output = {"name": name, "datatype": OUTPUT_DATATYPES[name], "shape": [len(answers)]}
        if binary:
            buffers.append(_serialize(OUTPUT_DATATYPES[name], tensors[name]))
            output["parameters"] = {BINARY_SIZE: len(buffers[-1])}
        else:
            output["data"] = tensors[name]
        header["outputs"].append(output)
    head = dumps(header)
    if not buffers:
        return Reply(body=head)
    return Reply(body=head + b"".join(buffers), content_type="application/octet-stream",
                 headers={"Inference-Header-Content-Length": str(len(head))})


def format_error(error: InputError | ServerError) -> Reply:
    """The protocol's error object: `error` is the message (a string, as tritonclient requires), plus its type."""
    return Reply(body=dumps({"error": error.message, "type": error.type}), status=error.http_status)


def _parameters(value: Any, where: str) -> dict:
    """A parameters object without the protocol's own entries; what is left are decoding options."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"'{where}' must be an object", type="invalid_request")
    unsupported = sorted(set(value) & set(UNSUPPORTED_PARAMETERS))
    if unsupported:
        raise InputError(f"'{where}': {unsupported} not supported by this server", type="invalid_request")
    parameters = {k: v for k, v in value.items() if k not in IGNORED_PARAMETERS}
    for flag in (BINARY_OUTPUT, BINARY_OUTPUTS):
        if not isinstance(parameters.get(flag, False), bool):
            raise InputError(f"'{where}.{flag}' must be true or false", type="invalid_request")
    size = parameters.get(BINARY_SIZE)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InputError(f"'{where}.{BINARY_SIZE}' must be a non-negative integer", type="invalid_request")
    return parameters


def _options(parameters: dict) -> dict:
    """What is left of a parameters object for the decoding options: not the binary extension's entries."""
    return {k: v for k, v in parameters.items() if k not in BINARY_PARAMETERS}


def _requested_outputs(outputs: Any, binary_default: bool, available: tuple[str, ...]) -> dict[str, bool]:
    """Output name -> binary, in the order asked for (every available output when none is named)."""
    if outputs is None:
        return {name: binary_default for name in available}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InputError("'outputs' must be a list of objects", type="invalid_request")
    requested = {}
    for n, output in enumerate(outputs):
        name = output.get("name")
        if name not in available:
            kind = "with segment_s" if available == SEGMENTED_OUTPUTS else "without segment_s"
            raise InputError(f"outputs[{n}]: unknown output {name!r}; outputs {kind}: {list(available)}",
                             type="invalid_request")
        parameters = _parameters(output.get("parameters"), f"outputs[{n}].parameters")
        requested[name] = parameters.get(BINARY_OUTPUT, binary_default)
    return requested


def _flat_data(audio_input: dict) -> list:
    data = audio_input.get("data")
    if not isinstance(data, list):
        raise InputError(f"input '{INPUT_NAME}' needs a 'data' list (or '{BINARY_SIZE}' with binary data)",
                         type="invalid_request")
    flat = []
    for element in data:  # row-major nesting is allowed: [[a], [b]] for shape [2, 1]
        flat.extend(_flat_data({"data": element}) if isinstance(element, list) else [element])
    return flat


def _binary_payloads(audio_input: dict, size: int, binary: bytes | None) -> list[bytes]:
    """BYTES elements of the binary section: each a 4-byte little-endian length, then that many bytes."""
    if "data" in audio_input:
        raise InputError(f"input '{INPUT_NAME}' has both 'data' and '{BINARY_SIZE}'", type="invalid_request")
    if binary is None:
        raise InputError(f"'{BINARY_SIZE}' needs the binary tensor extension (header Inference-Header-Content-Length)",
                         type="invalid_request")
    if size != len(binary):
        raise InputError(f"'{BINARY_SIZE}' is {size} but the binary section holds {len(binary)} bytes",
                         type="invalid_request")
    payloads, offset = [], 0
    while offset < size:
        if offset + 4 > size:
            raise InputError("truncated BYTES element length in the binary section", type="invalid_request")
        (length,) = struct.unpack_from("<I", binary, offset)
        if offset + 4 + length > size:
            raise InputError(f"BYTES element {len(payloads)} runs past the binary section", type="invalid_request")
        payloads.append(bytes(binary[offset + 4: offset + 4 + length]))
        offset += 4 + length
    return payloads


def _check_shape(shape: Any, count: int) -> None:
    if shape is None:
        return
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InputError(f"input '{INPUT_NAME}': 'shape' must be a list of non-negative integers",
                         type="invalid_request")
    if math.prod(shape) != count:
        raise InputError(f"input '{INPUT_NAME}': shape {shape} holds {math.prod(shape)} elements but the data "
                         f"holds {count}", type="invalid_request")


def _serialize(datatype: str, values: list) -> bytes:
    if datatype == "FP32":
        if not all(math.isfinite(v) for v in values):
            raise ServerError("the answer holds a non-finite score; see the model log")
        return struct.pack(f"<{len(values)}f", *values)
    encoded = [v.encode("utf-8") for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
