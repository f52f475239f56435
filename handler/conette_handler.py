"""TorchServe handler for CoNeTTE audio captioning: TorchServe glue only.

`conette_protocol` turns each request of a batch into audio items (and formats the answers), `conette_engine`
decodes and captions them; both ship next to this file inside the .mar. Every item of every request goes through
the engine in one call; a request that fails gets its own status and JSON error, the others their answers.
"""

from __future__ import annotations

import http
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from conette_engine.decoding import OPTION_NAMES
from conette_engine.engine import (DEFAULT_MAX_SEGMENTED_DURATION_S, DEFAULT_REQUEST_BEAM_BYTES, DEFAULT_REQUEST_WORK_S,
                                   CaptioningEngine, Work)
from conette_engine.errors import InputError
from conette_protocol import HttpRequest, ServerError, choose_codec, error_reply

logger = logging.getLogger(__name__)

# Engine settings read from the `handler:` section of model-config.yaml; option values are server-wide defaults.
HANDLER_SETTINGS = ("max_duration_s", "max_segmented_duration_s", "max_instances", "max_request_work_s",
                    "max_request_beam_mib", "threads",
                    *OPTION_NAMES)


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


class ConetteHandler(BaseHandler):
    """CoNeTTE captioning: audio in, caption + candidates + AudioSet tags out."""

    def initialize(self, context):
        settings = (context.model_yaml_config or {}).get("handler") or {}
        unknown = sorted(set(settings) - set(HANDLER_SETTINGS))
        if unknown:
            raise ValueError(f"unknown keys in the handler: section of model-config.yaml: {unknown}")
        threads = settings.get("threads", "auto")
        if threads == "auto":  # workers share the cores: workers x threads must not exceed them
            threads = max(1, available_cpus() // max(1, int((context.model_yaml_config or {}).get("maxWorkers", 1))))
        torch.set_num_threads(int(threads))
        gpu_id = context.system_properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        # Importing BaseHandler turns TF32 on for Ampere+ GPUs; keep full float32 so answers match the reference.
        torch.set_float32_matmul_precision("highest")
        work_limit = Work(float(settings.get("max_request_work_s", DEFAULT_REQUEST_WORK_S)),
                          int(float(settings.get("max_request_beam_mib", DEFAULT_REQUEST_BEAM_BYTES / 2**20)) * 2**20))
        self.engine = CaptioningEngine.load(context.system_properties["model_dir"], device=device,
                                            max_duration_s=float(settings.get("max_duration_s", 30.0)),
                                            max_request_work=work_limit,
                                            max_segmented_duration_s=float(settings.get(
                                                "max_segmented_duration_s", DEFAULT_MAX_SEGMENTED_DURATION_S)))
        # Clips per v1/v2 request: bounds one batch's work (batchSize x max_instances clips) below responseTimeout.
        self.max_instances = int(settings.get("max_instances", 8))
        self.default_options = {name: settings[name] for name in OPTION_NAMES if name in settings}
        if {"segment_s", "hop_s"} & set(self.default_options):  # the answer's shape is the client's choice
            raise ValueError("segment_s and hop_s are per-request options, not settings of the handler: section")
        self.engine.parse_options(self.default_options)  # fail at load, not per request
        self.model_info = {"name": context.model_name,
                           "version": str((context.manifest or {}).get("model", {}).get("modelVersion")
                                          or self.engine.version),
                           "checkpoint_sha256": self.engine.checkpoint_sha256}
        self.context, self.initialized = context, True
        logger.info("CoNeTTE engine loaded on %s with %d torch threads (%d CPUs available); tasks=%s; "
                    "max_duration_s=%s; max_segmented_duration_s=%s; default options=%s; checkpoint sha256=%s", device,
                    torch.get_num_threads(), available_cpus(), self.engine.tasks, self.engine.max_duration_s,
                    self.engine.max_segmented_duration_s, self.default_options,
                    self.engine.checkpoint_sha256)

    def handle(self, data, context):
        self.context = context
        started = time.perf_counter()
        decoded = [self._decode(idx, request) for idx, request in enumerate(data)]
        self._record("StageLatencySeconds", MetricTypes.HISTOGRAM, time.perf_counter() - started, "decode")
        outcomes = self._caption(decoded)
        self._record("BatchSize", MetricTypes.HISTOGRAM, len(data))
        return [self._respond(idx, *request, outcome) for idx, (request, outcome) in enumerate(zip(decoded, outcomes))]

    def _decode(self, idx: int, request: dict) -> tuple:
        """(codec, ParsedRequest, [(DecodedAudio, DecodingOptions), ...]); the error that stops the request takes
        the place of the items (and of the rest, when it comes before them)."""
        headers = {k.lower(): v for k, v in (self.context.get_all_request_header(idx) or {}).items()
                   if isinstance(v, str)}
        headers.setdefault("content-type", (self.context.get_request_header(idx, "body") or {}).get("content-type")
                           or "")
        codec = parsed = None
        try:
            http_request = HttpRequest(request, headers)
            codec = choose_codec(http_request)
            parsed = codec.parse(http_request, self.max_instances)
            parsed = replace(parsed, request_id=parsed.request_id or self.context.get_request_id(idx))
            inputs = [self._engine_input(item) for item in parsed.items]
            self.engine.check_request_work(inputs)  # keeps a batch of batchSize requests under responseTimeout
            return codec, parsed, inputs
        except InputError as error:
            return codec, parsed, error
        except Exception:  # a bug or a decoder crash on this request must not fail the others
            logger.exception("unexpected error while decoding request %d of the batch", idx)
            return codec, parsed, ServerError()

    def _engine_input(self, item):
        try:
            options = self.engine.parse_options({**self.default_options, **item.options})
            return self.engine.load_audio(item.audio, options=options), options
        except InputError as error:
            raise type(error)(item.where + error.message, type=error.type) from None

    def _caption(self, decoded: list) -> list:
        """Per request: its results (SegmentedResults for segmented clips), or its error. One engine call for the
        batch; one per request if it fails."""
        outcomes = [inputs for _, _, inputs in decoded]
        pending = [i for i, inputs in enumerate(outcomes) if not isinstance(inputs, Exception)]
        timings: dict = {}
        try:
            for i, results in zip(pending, self._run([outcomes[i] for i in pending], timings)):
                outcomes[i] = results
        except Exception:  # only visible at inference time: find which request, keep the others
            logger.warning("batch of %d requests failed; captioning them one by one", len(pending), exc_info=True)
            for i in pending:
                try:
                    outcomes[i] = self._run([decoded[i][2]], timings)[0]
                except InputError as error:
                    outcomes[i] = error
                except Exception:
                    logger.exception("request %s failed", decoded[i][1].request_id)
                    outcomes[i] = ServerError()
        for stage, seconds in timings.items():
            self._record("StageLatencySeconds", MetricTypes.HISTOGRAM, seconds, stage)
        return outcomes

    def _run(self, requests: list, timings: dict) -> list:
        items = [item for inputs in requests for item in inputs]
        if not items:
            return []
        with torch.inference_mode():
            results = iter(self.engine.caption_segments([a for a, _ in items], [o for _, o in items],
                                                        timings=timings))
        return [[next(results) for _ in inputs] for inputs in requests]

    def _respond(self, idx: int, codec, parsed, inputs, outcome) -> bytes:
        error = outcome if isinstance(outcome, Exception) else None
        if error is None:
            answers = [{**result.to_dict(), "model": self.model_info} for result in outcome]
            try:
                reply = codec.format(parsed, answers, self.model_info)
                self._record("AudioSecondsProcessed", MetricTypes.COUNTER, sum(a.duration_s for a, _ in inputs))
            except ServerError as failure:  # e.g. a non-finite number in the answer
                logger.error("request %s: %s", parsed.request_id, failure.message)
                error = failure
            except Exception:
                logger.exception("formatting the answer of request %s failed", parsed.request_id)
                error = ServerError()
        if error is not None:
            reply = codec.format_error(error) if codec is not None else error_reply(error)
            self.context.set_response_status(reply.status, http.HTTPStatus(reply.status).phrase, idx)
            self._record("RequestErrors", MetricTypes.COUNTER, 1, error.type)
        self.context.set_response_content_type(idx, reply.content_type)
        for name, value in reply.headers.items():
            self.context.set_response_header(idx, name, value)
        return reply.body

    def _record(self, metric: str, kind: MetricTypes, value: float, *dimensions: str) -> None:
        """A metric declared in metrics.yaml, with dimensions ModelName, Level and the given ones."""
        self.context.metrics.get_metric(metric, kind).add_or_update(value, [self.context.model_name, "Model",
                                                                           *dimensions])
