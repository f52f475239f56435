"""JSON {"audio": "<base64>", <option>: <value>, ...}: every key but `audio` is a decoding option."""

from .records import HttpRequest, Item, ParsedRequest, decode_base64, error_reply, json_object, one_answer

format = one_answer
format_error = error_reply


def accepts(request: HttpRequest) -> bool:
    return json_object(request) is not None


def parse(request: HttpRequest, max_instances: int) -> ParsedRequest:
    body = json_object(request)
    options = {k: v for k, v in body.items() if k != "audio"}
    audio = decode_base64(body.get("audio"), "JSON field 'audio'")
    return ParsedRequest(items=[Item(audio, {**request.query_options, **options})])
