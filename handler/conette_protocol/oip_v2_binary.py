"""The Open Inference Protocol v2 binary tensor extension (Triton's, also spoken by the KServe SDK).

The body is the JSON request (its length in the header Inference-Header-Content-Length) followed by the binary
section; an input with parameter `binary_data_size` takes that many bytes of it: for BYTES, elements of a
4-byte little-endian length followed by the bytes (here: raw encoded audio, no base64). The answer has the same
layout when an output is asked for in binary (see oip_v2).
"""

from conette_engine.errors import InputError

from . import oip_v2
from .records import HttpRequest, ParsedRequest, loads

HEADER_LENGTH = "inference-header-content-length"
format = oip_v2.format
format_error = oip_v2.format_error


def accepts(request: HttpRequest) -> bool:
    return HEADER_LENGTH in request.headers


def parse(request: HttpRequest, max_instances: int) -> ParsedRequest:
    body = request.body
    if isinstance(body, dict):  # sent as application/json and it all parsed: no binary section
        header, binary = body, b""
    elif isinstance(body, (bytes, bytearray)):
        length = request.headers[HEADER_LENGTH].strip()
        if not length.isascii() or not length.isdigit() or int(length) > len(body):
            raise InputError(f"Inference-Header-Content-Length {length[:32]!r} must be an integer between 0 and "
                             f"the body length ({len(body)})", type="invalid_request")
        header, binary = loads(bytes(body[: int(length)]), "the JSON header"), bytes(body[int(length):])
    else:
        raise InputError("the binary tensor extension needs a binary body", type="invalid_request")
    if not isinstance(header, dict) or "inputs" not in header:
        raise InputError("the JSON header must be an object with 'inputs'", type="invalid_request")
    return oip_v2.parse_header(header, request.query_options, max_instances, binary)
