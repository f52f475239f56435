"""A running TorchServe as a client sees it: its config.properties, its management API, READY polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import requests

DEFAULT_MODEL = "conette"
# TorchServe's own defaults, which config.properties here sets to the same loopback addresses.
DEFAULT_ADDRESSES = {
    "inference": "http://127.0.0.1:8080",
    "management": "http://127.0.0.1:8081",
    "metrics": "http://127.0.0.1:8082",
}


class ServerError(Exception):
    """The server answered with an error or could not be reached; str(self) says which."""


class NotReadyError(Exception):
    """No READY worker in time; str(self) says what the server last answered."""


def parse_properties(text: str, strict: bool = False) -> dict[str, str]:
    """The subset of the Java properties format TorchServe's files use: key=value lines, # and ! comments.

    strict: a line that is not key=value, or a key given twice, is a ValueError (Java would take it,
    the last value winning), for checks of the files this project ships.
    """
    properties: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, separator, value = line.partition("=")
        key = key.strip()
        if strict and not separator:
            raise ValueError(f"not a key=value line: {line!r}")
        if strict and key in properties:
            raise ValueError(f"duplicate key {key}")
        if separator:
            properties[key] = value.strip()
    return properties


def read_properties(path: str | Path) -> dict[str, str]:
    """parse_properties of a file, e.g. TorchServe's config.properties."""
    return parse_properties(Path(path).read_text())


def addresses(config: str | Path | None) -> dict[str, str]:
    """Base URLs of the inference, management and metrics APIs that `config` (config.properties) binds."""
    found = dict(DEFAULT_ADDRESSES)
    if config is not None:
        properties = read_properties(config)
        for api in found:
            address = properties.get(f"{api}_address")
            if address:
                # 0.0.0.0 is where it listens, not an address to call: the loopback interface is one of them.
                found[api] = address.replace("//0.0.0.0", "//127.0.0.1").rstrip("/")
    return found


def call(method: str, url: str, token: str | None, timeout: float, **kwargs) -> requests.Response:
    """One request with the Authorization header `token` needs; ServerError on an error status or no answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.request(method, url, headers=headers, timeout=timeout, **kwargs)
    except requests.RequestException as error:
        raise ServerError(f"{method} {url} failed: {error}") from error
    if response.status_code >= 400:
        raise ServerError(f"{method} {url} answered {response.status_code}: {response.text.strip()[:500]}")
    return response


def describe_model(management_url: str, model: str, token: str | None, timeout: float = 10.0) -> list[dict]:
    """GET /models/{model}: one description per version, each with "workers" and "jobQueueStatus"."""
    return call("GET", f"{management_url}/models/{model}", token, timeout).json()


def workers_of(descriptions: list[dict]) -> list[dict]:
    return [worker for description in descriptions for worker in description.get("workers", [])]


def wait_until_ready(
    describe: Callable[[], list[dict]],
    workers: int | None = None,
    timeout_s: float = 300.0,
    interval_s: float = 0.5,
    check: Callable[[], None] | None = None,
) -> list[dict]:
    """Poll `describe` (e.g. describe_model with its arguments bound) until the model is READY; its workers.

    READY means at least one worker with status READY or, with `workers`, exactly that many workers, all
    READY (what a scale up or down settles on). `check`, called before each poll, may raise to give up
    early (the server process exited, a worker died). Errors from `describe` (not up yet, no token yet,
    model not registered yet) count as not ready. Raises NotReadyError after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if check is not None:
            check()
        try:
            found = workers_of(describe())
            ready = sum(worker.get("status") == "READY" for worker in found)
            if (workers is None and ready >= 1) or (workers is not None and ready == len(found) == workers):
                return found
            last = ", ".join(f"worker {w.get('id')} {w.get('status')}" for w in found) or "no worker"
        except (ServerError, requests.RequestException, ValueError, KeyError, TypeError) as error:
            last = str(error)
        if time.monotonic() >= deadline:
            wanted = "no READY worker" if workers is None else f"not {workers} READY worker(s)"
            raise NotReadyError(f"{wanted} after {timeout_s:g} s (last: {last})")
        time.sleep(interval_s)
