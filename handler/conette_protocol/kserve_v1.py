"""KServe v1 {"instances": [{"audio": {"b64": "..."}, <options>}, ...]} -> {"predictions": [<answer>, ...]}.

Served on POST /v1/models/{model}:predict (TorchServe's KServe v1 route) and on every other route.
"""

from conette_engine.errors import InputError

from .records import (HttpRequest, Item, ParsedRequest, Reply, check_instance_count, decode_base64, dumps,
                      error_reply, json_object)

format_error = error_reply


def accepts(request: HttpRequest) -> bool:
    body = json_object(request)
    return body is not None and "instances" in body


def parse(request: HttpRequest, max_instances: int) -> ParsedRequest:
    instances = json_object(request)["instances"]
    if not isinstance(instances, list) or not instances:
        raise InputError("'instances' must be a non-empty list", type="invalid_request")
    check_instance_count(len(instances), max_instances)
    items = []
    for n, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InputError(f"instances[{n}] must be an object", type="invalid_request")
        audio = decode_base64(instance.get("audio"), f"instances[{n}].audio")
        options = {k: v for k, v in instance.items() if k != "audio"}
        items.append(Item(audio, {**request.query_options, **options}, where=f"instances[{n}]: "))
    return ParsedRequest(items=items)


def format(parsed: ParsedRequest, answers: list[dict], model: dict) -> Reply:
    return Reply(body=dumps({"predictions": answers}))
