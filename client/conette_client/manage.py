"""Operate a running conette-serve TorchServe without hand-crafted curl calls.

    conette-manage describe            # model, batching settings and workers
    conette-manage scale 3             # exactly 3 workers; returns once they are up (or down)
    conette-manage metrics             # key metrics from the metrics port, with averages
    conette-manage wait-ready          # block until the model has a READY worker (what `make serve` runs)

Addresses: --config config.properties takes the management, metrics and inference addresses from
TorchServe's configuration file; --management-url / --metrics-url override them; the default is
TorchServe's own (127.0.0.1:8081 and :8082). The management API needs the management key: --token, or the
"management" key of TorchServe's key_file.json (--key-file, else ./key_file.json, else the root of the
checkout this runs from). The metrics port needs none. --json prints the server's answers as they are.

Exit status: 0 on success, 1 when the server answers with an error, cannot be reached, or (wait-ready)
has no READY worker within --timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from .keys import KEY_FILE_NAME, KeyFileError, resolve_token
from .prometheus import Sample, parse_samples
from .torchserve import (
    DEFAULT_MODEL,
    NotReadyError,
    ServerError,
    addresses,
    call,
    describe_model,
    wait_until_ready,
)

# What an operator looks at first: traffic, errors, latency, queueing, batching, load (metrics.yaml).
KEY_METRICS = (
    "ts_inference_requests_total",
    "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
    "Requests2XX",
    "Requests4XX",
    "Requests5XX",
    "RequestErrors",
    "AudioSecondsProcessed",
    "BatchSize",
    "StageLatencySeconds",
    "QueueTime",
    "HandlerTime",
    "PredictionTime",
    "CPUUtilization",
    "MemoryUsed",
)


def describe_text(description: dict) -> str:
    workers = description.get("workers", [])
    queue = description.get("jobQueueStatus") or {}
    lines = [
        f"model {description.get('modelName')} version {description.get('modelVersion')} "
        f"({description.get('modelUrl')})",
        f"batch size {description.get('batchSize')}, max batch delay {description.get('maxBatchDelay')} ms, "
        f"response timeout {description.get('responseTimeout')} s",
        f"queue: {queue.get('pendingRequests', '?')} pending, room for {queue.get('remainingCapacity', '?')} more",
        f"workers: {len(workers)} (min {description.get('minWorkers')}, max {description.get('maxWorkers')}), "
        f"{sum(w.get('status') == 'READY' for w in workers)} READY",
    ]
    for worker in workers:
        lines.append(
            f"  worker {worker.get('id')}: {worker.get('status')}, pid {worker.get('pid')}, "
            f"memory {worker.get('memoryUsage', 0) / 2**20:.0f} MiB, gpu {worker.get('gpu')}"
        )
    return "\n".join(lines)


def describe(args: argparse.Namespace, token: str | None) -> str:
    descriptions = describe_model(args.management_url, args.model, token, args.timeout)
    if args.json:
        return json.dumps(descriptions, indent=2)
    return "\n\n".join(describe_text(description) for description in descriptions)


def scale(args: argparse.Namespace, token: str | None) -> str:
    max_workers = args.max_workers if args.max_workers is not None else args.workers
    if args.workers < 0 or max_workers < args.workers:
        raise ServerError(f"invalid worker counts: min {args.workers}, max {max_workers}")
    # synchronous=true: the call returns once the workers are started (or stopped), so that what
    # `describe` shows next is the new state, not a transition.
    response = call(
        "PUT",
        f"{args.management_url}/models/{args.model}",
        token,
        args.timeout,
        params={"min_worker": args.workers, "max_worker": max_workers, "synchronous": "true"},
    )
    if args.json:
        return response.text.strip()
    message = response.json().get("status", response.text.strip())
    return f"{message}\n{describe(args, token)}"


def base_name(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metrics(args: argparse.Namespace, _token: str | None) -> str:
    response = call("GET", f"{args.metrics_url}/metrics", None, args.timeout)
    if args.json:
        return json.dumps([sample._asdict() for sample in parse_samples(response.text)], indent=2)
    samples = [
        sample
        for sample in parse_samples(response.text)
        if (args.all or base_name(sample.name) in KEY_METRICS) and not sample.name.endswith("_bucket")
    ]
    if not samples:
        return f"no metrics yet at {args.metrics_url}/metrics (metrics_mode=prometheus? any request served yet?)"
    lines = [f"{name}{labels} {value:g}" for name, labels, value in samples]
    lines += averages(samples)
    return "\n".join(lines)


def averages(samples: list[Sample]) -> list[str]:
    """Mean per request (TorchServe's latency counters are sums) and per histogram observation."""
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for name, labels, value in samples:
        totals[(name, labels)] += value
    lines = []
    for (name, labels), total in sorted(totals.items()):
        if name in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds"):
            count = totals.get(("ts_inference_requests_total", labels))
            if count:
                lines.append(
                    f"mean {name.removeprefix('ts_').removesuffix('_microseconds')} per request{labels}: "
                    f"{total / count / 1000:.1f} ms"
                )
        elif name.endswith("_sum"):
            count = totals.get((base_name(name) + "_count", labels))
            if count:
                lines.append(f"mean {base_name(name)}{labels}: {total / count:.4g} over {count:g} observations")
    return lines


def wait_ready(args: argparse.Namespace, _token: str | None) -> str:
    # The token is looked up on every poll: TorchServe writes key_file.json only once it has started.
    def describe_now() -> list[dict]:
        return describe_model(args.management_url, args.model, resolve_token("management", args.token, args.key_file))

    found = wait_until_ready(describe_now, timeout_s=args.timeout, interval_s=1.0)
    ready = sum(worker.get("status") == "READY" for worker in found)
    return (
        f"{args.model} is READY ({ready} worker(s)): {args.inference_url}/predictions/{args.model} "
        f"(inference key in {KEY_FILE_NAME})"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="conette-manage",
        description="Describe, scale and watch the conette model on TorchServe; wait until it is READY.",
        epilog="Exit status: 0 success, 1 error answer, unreachable server, or no READY worker in time.",
    )
    parser.add_argument("--config", help="TorchServe config.properties to take the addresses from")
    parser.add_argument("--management-url", help="management API (default: from --config, else 127.0.0.1:8081)")
    parser.add_argument("--metrics-url", help="metrics API (default: from --config, else 127.0.0.1:8082)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="(default: %(default)s)")
    parser.add_argument("--token", help="management key (default: from TorchServe's key_file.json)")
    parser.add_argument("--key-file", help="TorchServe key file (default: ./key_file.json, then the checkout root)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for an answer (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the server's answers as JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("describe", help="model settings and workers").set_defaults(action=describe)
    scaler = commands.add_parser("scale", help="set the number of workers, waiting until they are up or down")
    scaler.add_argument("workers", type=int, help="number of workers (min_worker)")
    scaler.add_argument("--max-workers", type=int, help="max_worker (default: the same number)")
    scaler.set_defaults(action=scale)
    watcher = commands.add_parser("metrics", help="key metrics from the metrics port")
    watcher.add_argument("--all", action="store_true", help="every metric, not only the key ones")
    watcher.set_defaults(action=metrics)
    commands.add_parser(
        "wait-ready", help="wait up to --timeout seconds for a READY worker, polling the management API"
    ).set_defaults(action=wait_ready)
    args = parser.parse_args(argv)
    configured = addresses(args.config)
    args.management_url = (args.management_url or configured["management"]).rstrip("/")
    args.metrics_url = (args.metrics_url or configured["metrics"]).rstrip("/")
    args.inference_url = configured["inference"]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        token = None if args.action in (metrics, wait_ready) else resolve_token("management", args.token, args.key_file)
        print(args.action(args, token))
    except (ServerError, KeyFileError, NotReadyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
