"""HTTP request styles of the CoNeTTE server: bytes and JSON in, engine items out; answers in, HTTP bodies out.

No TorchServe and no model code here: the handler turns TorchServe's request into an `HttpRequest`, calls
`choose_codec` and `codec.parse`, runs the engine on the items and calls `codec.format` with the answers (or
`codec.format_error`; `error_reply` when no codec took the request).

One codec module per request style, tried in this order (the first whose `accepts` says yes parses):
    oip_v2_binary  Open Inference Protocol v2 with the binary tensor extension (Inference-Header-Content-Length)
    kserve_v1      KServe v1 JSON {"instances": [...]}
    oip_v2         Open Inference Protocol v2 JSON {"inputs": [...]}
    json_body      JSON {"audio": "<base64>", <options>}
    multipart      multipart/form-data file field `audio` (or `data`), options as form fields
    raw            the audio as the body, options as query parameters
Each codec has `accepts(request)`, `parse(request, max_instances) -> ParsedRequest` (raises InputError) and
`format(parsed, answers, model) -> Reply` and `format_error(error) -> Reply`. Adding a request style is one
module here plus its entry in CODECS.
"""

from . import json_body, kserve_v1, multipart, oip_v2, oip_v2_binary, raw
from .records import HttpRequest, Item, ParsedRequest, Reply, ServerError, error_reply

CODECS = (oip_v2_binary, kserve_v1, oip_v2, json_body, multipart, raw)


def choose_codec(request: HttpRequest):
    """The first codec that accepts the request; raises InputError when its body is unusable JSON."""
    return next(codec for codec in CODECS if codec.accepts(request))


__all__ = ["CODECS", "HttpRequest", "Item", "ParsedRequest", "Reply", "ServerError", "choose_codec", "error_reply"]
