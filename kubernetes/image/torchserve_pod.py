#!/usr/bin/env python3
"""Container entry point and readiness probe for TorchServe: drain on SIGTERM, KServe health routes.

    torchserve_pod.py serve [--kserve-port 8080 --upstream-url http://127.0.0.1:8085] -- torchserve --foreground ...
        The container's main process (under tini). Runs TorchServe as a child in its own session, so that a
        SIGTERM reaches only this process. On SIGTERM (`docker stop`, `podman stop`, the kubelet deleting the
        pod): keep serving for --endpoint-grace-s while load balancers drop the endpoint, wait until the
        model's queue is empty and the workers are idle, then `torchserve --stop`; the exit status is
        TorchServe's. Without the drain, SIGTERM to the Java frontend resets every request still in flight.
        The drain ends early, with a log line saying how many requests were still queued, when the
        termination grace period (--termination-grace-s, CONETTE_TERMINATION_GRACE_S) is about to run out:
        the kubelet or `docker stop -t` kills the container then anyway.
        With --kserve-port it also answers the KServe / Open Inference Protocol health routes on that port
        (GET /v2/health/live, /v2/health/ready, /v2/models/{model}/ready, /v1/models/{model}, /v1/models),
        which TorchServe 0.12 does not have (404), and forwards every other request unchanged to
        TorchServe's inference API (--upstream-url): one client request stays one TorchServe request, so
        dynamic batching keeps working.
    torchserve_pod.py ready [--model conette]
        exit 0 only when the model has at least one worker with status READY. TorchServe's /ping says
        Healthy before any model is loaded and after a load failed, so it cannot gate traffic.

Both talk to the management API (default http://127.0.0.1:8081, loopback-only by config.properties),
sending the management key from key_file.json (TorchServe writes it into its working directory) when
token authorization is on. Standard library only: it runs with the image's python3 and must start fast
(probes run every few seconds).
"""

import argparse
import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

# `torchserve --stop` and the JVM's own shutdown after the drain: seconds kept free at the end of the
# termination grace period.
STOP_MARGIN_S = 15.0
POLL_S = 0.5
# Headers that describe one connection, not the request (RFC 9110 section 7.6.1): never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


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


def count_ready_workers(args: argparse.Namespace) -> tuple[int, str]:
    """(READY workers, why there are none): 0 while TorchServe is starting, unreachable or without the model."""
    try:
        count = ready_workers(describe_model(args))
    except (OSError, ValueError, KeyError) as error:  # not up yet, model not registered (404), bad JSON
        return 0, str(error)
    return count, "" if count else f"model {args.model} has no READY worker"


def cmd_ready(args: argparse.Namespace) -> int:
    count, reason = count_ready_workers(args)
    if count == 0:
        print(f"not ready: {reason}")
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


def drain(args: argparse.Namespace, deadline: float) -> bool:
    """Wait until nothing is queued and no worker used CPU across two consecutive polls, or until the
    deadline. True when drained (or when the management API does not answer: TorchServe is gone)."""
    previous_ticks, idle_polls, pending, reported = None, 0, 0, None
    while idle_polls < 2:
        if time.monotonic() >= deadline:
            print(f"drain budget exhausted: the running batch and {pending} queued request(s) are dropped", flush=True)
            return False
        try:
            versions = describe_model(args)
        except (OSError, ValueError, KeyError) as error:
            print(f"management API not answering ({error}): nothing to drain", flush=True)
            return True
        pending, ticks = pending_requests(versions), worker_cpu_ticks(versions)
        idle_polls = idle_polls + 1 if pending == 0 and ticks == previous_ticks else 0
        previous_ticks = ticks
        if pending != reported:  # one line per change, not one per poll over a drain of many minutes
            print(f"draining: {pending} request(s) queued", flush=True)
            reported = pending
        time.sleep(POLL_S)
    return True


class _BodyReader:
    """The request body as a file for http.client: exactly Content-Length bytes from the client socket, in
    blocks, so that a large upload is streamed to TorchServe instead of being held in memory here."""

    def __init__(self, stream, length: int):
        self.stream, self.left = stream, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        block = self.stream.read(size) if size else b""
        self.left -= len(block)
        return block


class KServeFront(http.server.BaseHTTPRequestHandler):
    """KServe v1 / Open Inference Protocol health routes, everything else forwarded to TorchServe."""

    protocol_version = "HTTP/1.1"
    server: "KServeServer"

    def log_message(self, format: str, *values) -> None:  # TorchServe's access log has the requests
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def ready(self) -> bool:
        return not self.server.stopping.is_set() and count_ready_workers(self.server.args)[0] > 0

    def torchserve_alive(self) -> bool:
        """TorchServe's /ping: Healthy while the frontend runs and its workers are not failing for good."""
        try:
            with urllib.request.urlopen(f"{self.server.args.upstream_url}/ping", timeout=5) as response:
                return json.load(response).get("status") == "Healthy"
        except (OSError, ValueError):
            return False

    def health(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        model = self.server.args.model
        if path == "/v2/health/live":
            live = self.torchserve_alive()
            self.send_json(200 if live else 503, {"live": live})
        elif path == "/v2/health/ready":
            ready = self.ready()
            self.send_json(200 if ready else 503, {"ready": ready})
        elif path == "/v1/models":
            self.send_json(200, {"models": [model]})
        elif path in (f"/v2/models/{model}/ready", f"/v1/models/{model}"):
            ready = self.ready()
            self.send_json(200 if ready else 503, {"name": model, "ready": ready})
        elif path.startswith("/v2/models/") and path.endswith("/ready") or (
                path.startswith("/v1/models/") and ":" not in path):
            self.send_json(404, {"error": {"type": "ModelNotFound", "message": f"this server serves {model} only"}})
        else:
            return False
        return True

    def forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_json(411, {"error": {"type": "LengthRequired",
                                           "message": "send the body with a Content-Length header"}})
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        upstream = urllib.parse.urlsplit(self.server.args.upstream_url)
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=self.server.timeout_s)
        try:
            connection.request(self.command, self.path, body=_BodyReader(self.rfile, length) if length else None,
                               headers=headers, encode_chunked=False)
            response = connection.getresponse()
            body = response.read()
        except OSError as error:
            self.send_json(502, {"error": {"type": "BadGateway", "message": f"TorchServe did not answer: {error}"}})
            self.close_connection = True
            return
        finally:
            connection.close()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if not self.health():
            self.forward()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = forward


class KServeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, args: argparse.Namespace, stopping: threading.Event):
        super().__init__(("0.0.0.0", args.kserve_port), KServeFront)
        self.args, self.stopping = args, stopping
        # TorchServe answers within its responseTimeout (or resets the connection); this only bounds a hang.
        self.timeout_s = args.upstream_timeout_s


def cmd_serve(args: argparse.Namespace) -> int:
    command = args.torchserve[1:] if args.torchserve[:1] == ["--"] else args.torchserve
    if not command:
        print("error: give the TorchServe command after --", file=sys.stderr)
        return 2
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    # Own session: a signal sent to this process group (tini -g, Ctrl-C) must not reach the Java frontend,
    # which would drop the requests in flight.
    server = subprocess.Popen(command, start_new_session=True)
    front = None
    if args.kserve_port:
        front = KServeServer(args, stopping)
        threading.Thread(target=front.serve_forever, daemon=True).start()
    while server.poll() is None and not stopping.wait(POLL_S):
        pass
    if server.poll() is None:
        signalled = time.monotonic()
        grace = args.termination_grace_s
        deadline = signalled + grace - STOP_MARGIN_S if grace else float("inf")
        print(f"SIGTERM: serving {args.endpoint_grace_s:g} s more, then draining "
              f"({'until idle' if not grace else f'for at most {deadline - signalled - args.endpoint_grace_s:g} s'})",
              flush=True)
        time.sleep(args.endpoint_grace_s)
        drained = drain(args, deadline)
        subprocess.call(["torchserve", "--stop"])
        status = server.wait()
        print(f"TorchServe exited with {status} {time.monotonic() - signalled:.1f} s after SIGTERM "
              f"({'drained' if drained else 'not drained'})", flush=True)
    if front is not None:
        front.shutdown()
    return server.wait()


def env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name, "")
    return float(value) if value else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="conette")
    # TorchServe's own TS_* overrides (enable_envvars_config) move the APIs; follow them.
    common.add_argument("--management-url", default=os.environ.get("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081"))
    common.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("ready", parents=[common], help="exit 0 iff the model has a READY worker")
    ready.set_defaults(run=cmd_ready)
    serve = commands.add_parser("serve", parents=[common], help="run TorchServe; drain it on SIGTERM")
    serve.add_argument("--endpoint-grace-s", type=float, default=env_float("CONETTE_ENDPOINT_GRACE_S", 0.0),
                       help="keep serving this long after SIGTERM before draining (env CONETTE_ENDPOINT_GRACE_S)")
    serve.add_argument("--termination-grace-s", type=float, default=env_float("CONETTE_TERMINATION_GRACE_S", None),
                       help="the container's termination grace period; unset: drain until idle "
                            "(env CONETTE_TERMINATION_GRACE_S)")
    serve.add_argument("--kserve-port", type=int, default=0, help="answer KServe health routes on this port")
    serve.add_argument("--upstream-url", default=os.environ.get("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8085"),
                       help="TorchServe's inference API, where the KServe port forwards to")
    serve.add_argument("--upstream-timeout-s", type=float, default=600.0)
    serve.add_argument("torchserve", nargs=argparse.REMAINDER, help="-- then the TorchServe command line")
    serve.set_defaults(run=cmd_serve)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
