"""The records passed between the handler and the codecs, and the helpers every codec shares."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from conette_engine.errors import InputError

AUDIO_FIELDS = ("audio", "data")  # multipart file field names; "data" is TorchServe's conventional name
BODY_FIELD = "body"  # where TorchServe puts a request body that is not a form
# Query parameters TorchServe uses for routing (POST /invocations?model_name=conette), not options.
ROUTING_FIELDS = ("model_name",)
HOW_TO_SEND_AUDIO = (
    "send the audio as the request body with Content-Type audio/* or application/octet-stream, "
    "as multipart/form-data file field 'audio', or base64-encoded in JSON {\"audio\": \"...\"}"
)


class ServerError(Exception):
    """The server failed on one request (a bug, a non-finite number from the model): HTTP 500 for it alone."""

    type = "internal_error"
    http_status = 500

    def __init__(self, message: str = "the server failed on this request; see the model log"):
        super().__init__(message)
        self.message = message


@dataclass
class HttpRequest:
    """One HTTP request as TorchServe hands it over.

    fields: TorchServe's decoded parameters (query parameters, form fields, and `body`: bytes, str, or the
    parsed JSON when the Content-Type was exactly application/json); headers: lower-case names.
    """

    fields: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> Any:
        return self.fields.get(BODY_FIELD)

    @property
    def media_type(self) -> str:
        """The Content-Type without parameters, lower case (media types are case-insensitive)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def query_options(self) -> dict[str, Any]:
        """Query parameters and form fields: everything but the body, the audio and routing parameters."""
        return {k: v for k, v in self.fields.items() if k not in (BODY_FIELD, *AUDIO_FIELDS, *ROUTING_FIELDS)}

    @cached_property
    def json(self) -> Any:
        """The body as JSON when it is JSON (by Content-Type, or an untyped body that starts with '{'), else None.

        TorchServe decodes only an exact `application/json`; `APPLICATION/JSON`, `application/json;
        charset=utf-8` and clients that send no Content-Type (tritonclient, kserve) arrive as bytes.
        """
        body = self.body
        if isinstance(body, (dict, list)):
            return body
        typed_json = self.media_type == "application/json" or self.media_type.endswith("+json")
        untyped_object = not self.media_type and isinstance(body, (bytes, bytearray)) and body.lstrip()[:1] == b"{"
        if not (typed_json or untyped_object):
            return None
        return loads(body, "the body")


@dataclass
class Item:
    """One clip of a request: encoded audio bytes, its options as the client sent them, where it came from."""

    audio: bytes
    options: dict[str, Any]
    where: str = ""  # prefix for error messages, e.g. "instances[1]: "


@dataclass
class ParsedRequest:
    """A request's clips and what its answer needs: the client's request id and (OIP v2) the outputs asked for
    and which of them go back as binary."""

    items: list[Item]
    request_id: str | None = None
    outputs: dict[str, bool] | None = None  # OIP v2: output name -> binary


@dataclass
class Reply:
    """One HTTP answer."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def loads(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{what} is not valid JSON: {err}", type="invalid_request") from None


def dumps(value: Any) -> bytes:
    """Strict JSON: a NaN or infinity from the engine is a server error, never invalid JSON on the wire."""
    try:
        return json.dumps(value, allow_nan=False).encode("utf-8")
    except ValueError as err:
        raise ServerError(f"the answer holds a non-finite number ({err}); see the model log") from None


def error_reply(error: InputError | ServerError) -> Reply:
    """{"error": {"type", "message"}} with the error's HTTP status, whatever the request style."""
    body = json.dumps({"error": {"type": error.type, "message": error.message}}).encode("utf-8")
    return Reply(body=body, status=error.http_status)


def one_answer(parsed: ParsedRequest, answers: list[dict], model: dict) -> Reply:
    """The format of the single-clip styles: the answer itself."""
    return Reply(body=dumps(answers[0]))


def decode_base64(text: Any, where: str) -> bytes:
    if isinstance(text, dict) and "b64" in text:  # KServe v1 binary convention {"b64": "..."}
        text = text["b64"]
    if text is None:
        raise InputError(f"{where} is missing: {HOW_TO_SEND_AUDIO}", type="missing_audio")
    if not isinstance(text, str):
        raise InputError(f"{where} must be a base64 string", type="invalid_request")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(f"{where} is not valid base64: {err}", type="invalid_base64") from None


def check_instance_count(count: int, max_instances: int) -> None:
    if count > max_instances:
        raise InputError(f"{count} audio instances in one request; the maximum is {max_instances}",
                         type="too_many_instances")


def json_object(request: HttpRequest) -> dict | None:
    """The body when it is a JSON object; a JSON body of another kind is a client error."""
    body = request.json
    if body is None or isinstance(body, dict):
        return body
    raise InputError("a JSON body must be an object", type="invalid_request")
