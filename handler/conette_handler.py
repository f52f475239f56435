"""TorchServe handler for CoNeTTE audio captioning.

Thin on purpose: request parsing and response shaping live here, everything about audio and the model lives in
the `conette_engine` package shipped next to this file inside the .mar.

One TorchServe batch holds several HTTP requests; a KServe v1 / OIP v2 request may itself hold several audio
instances. Every instance of every request becomes one engine item, the whole batch goes through the engine in
one call, and the answers are folded back into one response per request. A request whose input is bad gets its
own 4xx (via context.set_response_status) while the other requests of the batch get their normal answers.

Request styles (see README.md):
  1. raw body (audio/*, application/octet-stream), options as query parameters; TorchServe 0.12 forwards the
     query string on POST /conette/predict and /invocations?model_name=conette but drops it on
     /predictions/conette (its frontend passes no query decoder there)
  2. multipart/form-data: file field `audio` (or `data`), options as form fields
  3. JSON {"audio": "<base64>", "task": ..., ...}
  4. KServe v1 {"instances": [{"audio": {"b64": ...}, ...}]} and OIP v2 {"inputs": [{"name": "audio", ...}]}
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import logging
import os
import time
from pathlib import Path

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from conette_engine.engine import CaptioningEngine
from conette_engine.errors import InputError

logger = logging.getLogger(__name__)

AUDIO_FIELDS = ("audio", "data")  # multipart file field names; "data" is TorchServe's conventional name
RAW_BODY_FIELD = "body"  # where TorchServe puts a non-form request body
# Query parameters TorchServe uses for routing (POST /invocations?model_name=conette), not options.
ROUTING_FIELDS = ("model_name",)
OPTION_NAMES = ("task", "beam_size", "min_pred_size", "max_pred_size", "forbid_rep_mode", "threshold")
# Engine settings read from the `handler:` section of model-config.yaml.
HANDLER_SETTINGS = ("max_duration_s", "max_instances", "threads") + OPTION_NAMES
HOW_TO_SEND_AUDIO = (
    "send the audio as the request body with Content-Type audio/* or application/octet-stream, "
    "as multipart/form-data file field 'audio', or base64-encoded in JSON {\"audio\": \"...\"}"
)


def parsed_request(protocol: str, items: list | None = None, error: InputError | None = None,
                   request_id: str | None = None) -> dict:
    """One TorchServe request as the stages pass it on (a dict: the module may define only one class).

    protocol: "plain" (styles 1-3), "v1" or "v2"; items: (DecodedAudio, DecodingOptions) per instance;
    then results (one per item) or error (an InputError for the whole request); request_id: the client's
    v2 "id", else TorchServe's request id.
    """
    return {"protocol": protocol, "items": items or [], "error": error, "results": [], "request_id": request_id}


def available_cpus() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def decode_base64(text, where: str) -> bytes:
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


def server_error() -> InputError:
    """A request-level 500 in the same JSON shape as a client error (the module may define only one class)."""
    error = InputError("the server failed on this request; see the model log", type="internal_error")
    error.http_status = 500
    return error


def error_body(error: InputError) -> str:
    return json.dumps({"error": {"type": error.type, "message": error.message}})


class ConetteHandler(BaseHandler):
    """CoNeTTE captioning: audio in, caption + candidates + AudioSet tags out (JSON)."""

    def initialize(self, context):
        properties = context.system_properties
        settings = (context.model_yaml_config or {}).get("handler") or {}
        unknown = sorted(set(settings) - set(HANDLER_SETTINGS))
        if unknown:
            raise ValueError(f"unknown keys in the handler: section of model-config.yaml: {unknown}")

        threads = settings.get("threads", "auto")
        if threads == "auto":
            # Workers share the cores: workers x threads must not exceed them (oversubscription is slower).
            workers = max(1, int((context.model_yaml_config or {}).get("maxWorkers", 1)))
            threads = max(1, available_cpus() // workers)
        torch.set_num_threads(int(threads))

        gpu_id = properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        # Importing BaseHandler turns TF32 on for Ampere+ GPUs; keep full float32 so answers match the reference.
        torch.set_float32_matmul_precision("highest")

        self.engine = CaptioningEngine.load(
            properties["model_dir"], device=device, max_duration_s=float(settings.get("max_duration_s", 30.0))
        )
        # Clips per v1/v2 request: bounds the work of one batch (batchSize x max_instances clips) below
        # responseTimeout, since a batch that overruns it gets its worker restarted.
        self.max_instances = int(settings.get("max_instances", 8))
        # Server-wide default options from the yaml; a request's own options override them.
        self.default_options = {name: settings[name] for name in OPTION_NAMES if name in settings}
        self.engine.parse_options(self.default_options)  # fail at load, not per request
        manifest_model = (context.manifest or {}).get("model", {})
        self.model_info = {
            "name": context.model_name,
            "version": str(manifest_model.get("modelVersion") or self.engine.version),
            "checkpoint_sha256": self.engine.checkpoint_sha256,
        }
        self.context = context
        self.initialized = True
        logger.info(
            "CoNeTTE engine loaded on %s with %d torch threads (%d CPUs available); tasks=%s; max_duration_s=%s; "
            "default options=%s; checkpoint sha256=%s",
            device, torch.get_num_threads(), available_cpus(), self.engine.tasks, self.engine.max_duration_s,
            self.default_options, self.engine.checkpoint_sha256,
        )

    # ---- preprocess: one parsed_request per TorchServe request --------------------------------------------------

    def preprocess(self, data):
        started = time.perf_counter()
        parsed = []
        for idx, request in enumerate(data):
            # TorchServe keeps each parameter's content type; the body's is the request's Content-Type.
            body_type = (self.context.get_request_header(idx, RAW_BODY_FIELD) or {}).get("content-type", "")
            try:
                one = self._parse_request(request, body_type)
                self.engine.check_request_work(one["items"])  # keeps batchSize requests under responseTimeout
                parsed.append(one)
            except InputError as error:
                parsed.append(parsed_request("plain", error=error))
            except Exception:  # a bug or a decoder crash on this request must not fail the others
                logger.exception("unexpected error while parsing request %d of the batch", idx)
                parsed.append(parsed_request("plain", error=server_error()))
            parsed[-1]["request_id"] = parsed[-1]["request_id"] or self.context.get_request_id(idx)
        self._record_stage("decode", time.perf_counter() - started)
        return parsed

    def _parse_request(self, request: dict, body_type: str) -> dict:
        body = request.get(RAW_BODY_FIELD)
        if isinstance(body, (bytes, bytearray)) and body_type.startswith("application/json"):
            # TorchServe hands over the raw bytes when its JSON decoding fails.
            raise InputError("the body is not valid JSON (Content-Type: application/json)", type="invalid_request")
        # Query parameters and form fields: everything but the audio and TorchServe's routing parameters.
        not_options = (RAW_BODY_FIELD, *AUDIO_FIELDS, *ROUTING_FIELDS)
        form_options = {k: v for k, v in request.items() if k not in not_options}
        if isinstance(body, dict):
            if "instances" in body:
                return parsed_request("v1", self._parse_v1(body, form_options))
            if "inputs" in body:
                client_id = body.get("id")
                return parsed_request("v2", self._parse_v2(body, form_options),
                                      request_id=str(client_id) if client_id is not None else None)
            options = {k: v for k, v in body.items() if k != "audio"}
            audio = decode_base64(body.get("audio"), "JSON field 'audio'")
            return parsed_request("plain", [self._make_item(audio, {**form_options, **options})])
        if isinstance(body, list):
            raise InputError("a JSON body must be an object, not a list", type="invalid_request")
        audio = next((request[name] for name in AUDIO_FIELDS if name in request), None)
        if audio is None:
            audio = body
        if not isinstance(audio, (bytes, bytearray)):
            raise InputError(f"no audio in the request: {HOW_TO_SEND_AUDIO}", type="missing_audio")
        return parsed_request("plain", [self._make_item(bytes(audio), form_options)])

    def _parse_v1(self, body: dict, form_options: dict) -> list:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InputError("'instances' must be a non-empty list", type="invalid_request")
        self._check_instance_count(len(instances))
        items = []
        for n, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise InputError(f"instances[{n}] must be an object", type="invalid_request")
            audio = decode_base64(instance.get("audio"), f"instances[{n}].audio")
            options = {k: v for k, v in instance.items() if k != "audio"}
            items.append(self._make_item(audio, {**form_options, **options}, where=f"instances[{n}]: "))
        return items

    def _parse_v2(self, body: dict, form_options: dict) -> list:
        inputs = body["inputs"]
        audio_input = next((i for i in inputs if isinstance(i, dict) and i.get("name") == "audio"), None) \
            if isinstance(inputs, list) else None
        if audio_input is None:
            raise InputError("'inputs' must hold a BYTES input named 'audio'", type="invalid_request")
        if audio_input.get("datatype", "BYTES") != "BYTES":
            raise InputError("input 'audio' must have datatype BYTES (base64 items)", type="invalid_request")
        payloads = audio_input.get("data")
        if not isinstance(payloads, list) or not payloads:
            raise InputError("input 'audio' needs a non-empty 'data' list", type="invalid_request")
        self._check_instance_count(len(payloads))
        parameters = {}
        for where, extra in (("parameters", body.get("parameters")),
                             ("audio.parameters", audio_input.get("parameters"))):
            if not isinstance(extra, (dict, type(None))):
                raise InputError(f"'{where}' must be an object", type="invalid_request")
            parameters.update(extra or {})
        return [
            self._make_item(decode_base64(payload, f"audio.data[{n}]"), {**form_options, **parameters},
                            where=f"audio.data[{n}]: ")
            for n, payload in enumerate(payloads)
        ]

    def _check_instance_count(self, count: int) -> None:
        if count > self.max_instances:
            raise InputError(f"{count} audio instances in one request; the maximum is {self.max_instances}",
                             type="too_many_instances")

    def _make_item(self, audio: bytes, options: dict, where: str = ""):
        try:
            parsed_options = self.engine.parse_options({**self.default_options, **options})
            return self.engine.load_audio(audio), parsed_options
        except InputError as error:
            raise type(error)(where + error.message, type=error.type) from None

    # ---- inference: every item of every valid request in one engine call ---------------------------------------

    def inference(self, parsed, *args, **kwargs):
        valid = [request for request in parsed if request["error"] is None]
        if valid:
            timings: dict = {}
            try:
                self._caption(valid, timings)
            except Exception:
                # Something only visible at inference time failed the batch: find which request, keep the others.
                logger.warning("batch of %d requests failed; captioning them one by one", len(valid), exc_info=True)
                for request in valid:
                    try:
                        self._caption([request], timings)
                    except InputError as error:
                        request["error"] = error
                    except Exception:
                        logger.exception("request %s failed", request["request_id"])
                        request["error"] = server_error()
            for stage, seconds in timings.items():
                self._record_stage(stage, seconds)
        return parsed

    def _caption(self, requests: list, timings: dict) -> None:
        items = [item for request in requests for item in request["items"]]
        with torch.inference_mode():
            results = self.engine.caption([a for a, _ in items], [o for _, o in items], timings=timings)
        for request in requests:
            request["results"], results = results[: len(request["items"])], results[len(request["items"]):]

    # ---- postprocess: one JSON response per request, per-request status -----------------------------------------

    def postprocess(self, parsed):
        responses = []
        for idx, request in enumerate(parsed):
            self.context.set_response_content_type(idx, "application/json")
            if request["error"] is not None:
                status = request["error"].http_status
                self.context.set_response_status(status, http.HTTPStatus(status).phrase, idx)
                self._count_error(request["error"].type)
                responses.append(error_body(request["error"]))
                continue
            self._record_audio_seconds(request["items"])
            answers = [{**result.to_dict(), "model": self.model_info} for result in request["results"]]
            responses.append(json.dumps(self._envelope(request, answers)))
        self._record_batch_size(len(parsed))
        return responses

    def _envelope(self, request: dict, answers: list) -> dict:
        if request["protocol"] == "v1":
            return {"predictions": answers}
        if request["protocol"] == "v2":
            n = len(answers)
            return {
                "model_name": self.model_info["name"],
                "model_version": self.model_info["version"],
                "id": request["request_id"],
                "outputs": [
                    {"name": "caption", "datatype": "BYTES", "shape": [n], "data": [a["caption"] for a in answers]},
                    {"name": "score", "datatype": "FP32", "shape": [n], "data": [a["score"] for a in answers]},
                    {"name": "tags", "datatype": "BYTES", "shape": [n],
                     "data": [json.dumps(a["tags"]) for a in answers]},
                ],
            }
        return answers[0]

    # ---- metrics (declared in metrics.yaml; see README "Metrics") -----------------------------------------------

    def _metric_dims(self, *extra: str) -> list:
        return [self.context.model_name, "Model", *extra]

    def _record_stage(self, stage: str, seconds: float) -> None:
        self.context.metrics.get_metric("StageLatencySeconds", MetricTypes.HISTOGRAM).add_or_update(
            seconds, self._metric_dims(stage))

    def _record_batch_size(self, size: int) -> None:
        self.context.metrics.get_metric("BatchSize", MetricTypes.HISTOGRAM).add_or_update(size, self._metric_dims())

    def _record_audio_seconds(self, items: list) -> None:
        seconds = sum(audio.duration_s for audio, _ in items)
        self.context.metrics.get_metric("AudioSecondsProcessed", MetricTypes.COUNTER).add_or_update(
            seconds, self._metric_dims())

    def _count_error(self, error_type: str) -> None:
        self.context.metrics.get_metric("RequestErrors", MetricTypes.COUNTER).add_or_update(
            1, self._metric_dims(error_type))
