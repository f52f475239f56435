#!/usr/bin/env python3
"""Pod-side checks for TorchServe in a container: readiness probe and graceful stop (preStop hook).

    torchserve_pod.py ready [--model conette]
        exit 0 only when the model has at least one worker with status READY. TorchServe's /ping says
        Healthy before any model is loaded and after a load failed, so it cannot gate traffic.
    torchserve_pod.py stop [--model conette] [--endpoint-grace-s 5] [--drain-timeout-s 60]
        preStop: keep serving while the endpoint is removed from the Service, wait until the model's queue
        is empty and the workers are idle, then `torchserve --stop`: SIGTERM to the Java frontend (which
        drops whatever is still in flight, hence the drain first); `torchserve --foreground`, the container's
        main process, returns when the frontend has exited, and the container ends.

Both talk to the management API (default http://127.0.0.1:8081, loopback-only by config.properties),
sending the management key from key_file.json (TorchServe writes it into its working directory) when
token authorization is on. Standard library only: it runs with the
image's python3 and must start fast (probes run every few seconds).
"""

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path



def describe_model(args: argparse.Namespace, timeout_s: float = 2.0) -> list:
    """GET /models/{model}: one entry per version, each with "workers" and "jobQueueStatus"."""
    request = urllib.request.Request(f"{args.management_url}/models/{args.model}")
    if args.key_file.is_file():
        key = json.loads(args.key_file.read_text())["management"]["key"]
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def ready_workers(versions: list) -> int:
    return sum(worker.get("status") == "READY" for version in versions for worker in version.get("workers", []))


def pending_requests(versions: list) -> int:
    return sum(version.get("jobQueueStatus", {}).get("pendingRequests", 0) for version in versions)


def cmd_ready(args: argparse.Namespace) -> int:
    try:
        versions = describe_model(args)
    except (OSError, ValueError, KeyError) as error:  # not up yet, model not registered (404), bad JSON
        print(f"not ready: {error}")
        return 1
    count = ready_workers(versions)
    if count == 0:
        print(f"not ready: model {args.model} has no READY worker")
        return 1
    print(f"ready: {count} READY worker(s)")
    return 0


def worker_cpu_ticks(versions: list) -> int:
    """CPU time (clock ticks) used so far by the model's worker processes. TorchServe reports queued requests
    but not the batch a worker is running; a worker that is computing keeps adding CPU time, an idle one
    blocks on its socket and adds none. This runs in the server's PID namespace, so /proc has them."""
    ticks = 0
    for version in versions:
        for worker in version.get("workers", []):
            try:
                fields = Path(f"/proc/{worker['pid']}/stat").read_text().rsplit(")", 1)[1].split()
            except (KeyError, OSError):
                continue  # no pid yet, or the worker is gone
            ticks += int(fields[11]) + int(fields[12])  # utime + stime (stat fields 14 and 15)
    return ticks


def cmd_stop(args: argparse.Namespace) -> int:
    # The pod is already out of the Service's endpoints or about to be: requests may still arrive for a
    # few seconds while kube-proxy / the ingress catch up.
    time.sleep(args.endpoint_grace_s)
    # Drained = nothing queued and no worker CPU activity across two consecutive polls: the frontend drops
    # whatever is still in flight when it gets SIGTERM, so the batch a worker is running must finish first.
    deadline = time.monotonic() + args.drain_timeout_s
    previous_ticks, idle_polls = None, 0
    while time.monotonic() < deadline and idle_polls < 2:
        try:
            versions = describe_model(args)
        except (OSError, ValueError, KeyError):
            break  # management API gone: nothing left to drain
        pending, ticks = pending_requests(versions), worker_cpu_ticks(versions)
        idle_polls = idle_polls + 1 if pending == 0 and ticks == previous_ticks else 0
        previous_ticks = ticks
        print(f"pending requests {pending}, worker CPU ticks {ticks}, idle polls {idle_polls}", flush=True)
        time.sleep(0.5)
    # SIGTERM to the Java frontend (pid file in TEMP) and return at once: waiting here (--foreground) would
    # only get this hook killed when the container ends, reported as a failed preStop hook.
    return subprocess.call(["torchserve", "--stop"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="conette")
    common.add_argument("--management-url", default="http://127.0.0.1:8081")
    common.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("ready", parents=[common], help="exit 0 iff the model has a READY worker")
    ready.set_defaults(run=cmd_ready)
    stop = commands.add_parser("stop", parents=[common], help="drain, then stop TorchServe (preStop hook)")
    stop.add_argument("--endpoint-grace-s", type=float, default=5.0)
    stop.add_argument("--drain-timeout-s", type=float, default=60.0)
    stop.set_defaults(run=cmd_stop)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
