"""The audio as the request body (audio/*, application/octet-stream), options as query parameters.

TorchServe 0.12 forwards the query string on POST /{model}/predict and /invocations?model_name={model}, but
drops it on /predictions/{model}.
"""

from conette_engine.errors import InputError

from .records import HOW_TO_SEND_AUDIO, HttpRequest, Item, ParsedRequest, error_reply, one_answer

format = one_answer
format_error = error_reply


def accepts(request: HttpRequest) -> bool:
    return True  # the last codec tried: whatever the others do not take


def parse(request: HttpRequest, max_instances: int) -> ParsedRequest:
    body = request.body
    if not isinstance(body, (bytes, bytearray)):
        raise InputError(f"no audio in the request: {HOW_TO_SEND_AUDIO}", type="missing_audio")
    return ParsedRequest(items=[Item(bytes(body), request.query_options)])
