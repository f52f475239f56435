"""multipart/form-data: the audio as file field `audio` (or `data`), options as the other form fields."""

from .records import AUDIO_FIELDS, HttpRequest, Item, ParsedRequest, error_reply, one_answer

format = one_answer
format_error = error_reply


def accepts(request: HttpRequest) -> bool:
    return _audio_field(request) is not None


def parse(request: HttpRequest, max_instances: int) -> ParsedRequest:
    return ParsedRequest(items=[Item(bytes(_audio_field(request)), request.query_options)])


def _audio_field(request: HttpRequest) -> bytes | None:
    return next((request.fields[name] for name in AUDIO_FIELDS
                 if isinstance(request.fields.get(name), (bytes, bytearray))), None)
