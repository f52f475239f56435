"""SIGKILL of the worker with requests in flight, on a server of its own: what clients get, and recovery.

TorchServe 0.12 answers the requests of the killed worker's batch itself (never the handler): status 507 when the
worker exited with 137 (SIGKILL, e.g. the kernel's OOM killer), 500 otherwise (a crash, or responseTimeout), with
its own body {"code", "type", "message": "Worker died."}. Both mean "retry", unlike the handler's errors, which
always have the {"error": {...}} shape (docs/reliability.md "Failure statuses and the retry rule").
The measured figures (time to READY again, statuses) are printed; run with -s to see them.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from audio_factory import make_audio
from conftest import TorchServeInstance

IN_FLIGHT = 6
RESTART_TIMEOUT_S = 180
# Options that keep a batch busy for a while on the small test checkpoint (within the work limit).
SLOW = {"beam_size": 16, "min_pred_size": 60, "max_pred_size": 60}


def is_worker_died(response: requests.Response) -> bool:
    """TorchServe's own answer for the requests of a dead worker's batch."""
    body = response.json()
    return response.status_code in (500, 507) and body.get("message") == "Worker died." and "error" not in body


@pytest.fixture
def own_server(tmp_path, model_store_dir):
    server = TorchServeInstance(workdir=tmp_path / "ts", model_store=model_store_dir)
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()
    assert not server.own_processes()


def flushed_batches(server: TorchServeInstance) -> int:
    """Inference batches the frontend has written to a worker so far (its ts_log.log records each one)."""
    log = server.workdir / "logs" / "ts_log.log"
    return log.read_text(errors="replace").count("Flushing req.cmd PREDICT") if log.is_file() else 0


def wait_for_flushed_batch(server: TorchServeInstance, before: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while flushed_batches(server) <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no batch reached the worker within {timeout} s:\n{server.log_tail()}")
        time.sleep(0.01)


def ready_worker(server: TorchServeInstance, not_pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = server.workers()
        except requests.RequestException:
            workers = []
        ready = [w for w in workers if w["status"] == "READY" and w["pid"] != not_pid]
        if ready:
            return ready[0]
        time.sleep(0.1)
    raise TimeoutError(f"no new READY worker within {timeout} s:\n{server.log_tail()}")


def test_sigkill_with_requests_in_flight(own_server, tmp_path):
    server = own_server
    clip = make_audio(tmp_path, "wav16", seconds=10.0, sample_rate=16000, signal="noise").read_bytes()
    body = {"audio": base64.b64encode(clip).decode("ascii"), **SLOW}
    before = server.predict(json=body)
    assert before.status_code == 200, before.text
    (worker,) = server.workers()
    pid = worker["pid"]
    assert any(line.startswith(f"{pid} ") for line in server.own_processes())

    with ThreadPoolExecutor(IN_FLIGHT + 1) as pool:
        batches_before = flushed_batches(server)
        in_flight = [pool.submit(server.predict, json=body) for _ in range(IN_FLIGHT)]
        wait_for_flushed_batch(server, batches_before)
        time.sleep(0.1)  # inside the batch's work (one SLOW request alone takes ~0.4 s), not in the next poll
        assert not all(future.done() for future in in_flight), "the batch was answered before the kill"
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # The dead batch's "Worker died." answers come from the frontend's worker thread once it has noticed the
        # death; from then on it no longer takes jobs from the queue (docs/reliability.md "Requests that get no
        # answer"), so a request sent now waits for the restarted worker.
        futures.wait(in_flight, timeout=60, return_when=futures.FIRST_COMPLETED)

        def late_request():
            sent = time.monotonic()
            response = server.predict(json=body)
            return response, time.monotonic() - sent

        late = pool.submit(late_request)
        new_worker = ready_worker(server, not_pid=pid, timeout=RESTART_TIMEOUT_S)
        ready_after_s = time.monotonic() - killed_at
        responses = [future.result() for future in in_flight]
        late_response, late_s = late.result()

    statuses = [r.status_code for r in responses]
    print(f"\nSIGKILL of worker {pid} with {IN_FLIGHT} requests in flight: statuses {statuses}; "
          f"new worker {new_worker['pid']} READY after {ready_after_s:.1f} s; "
          f"a request sent while it restarted: {late_response.status_code} in {late_s:.2f} s")
    died = [r for r in responses if r.status_code != 200]
    assert died, "the kill came after the batch was answered: nothing was in flight"
    for response in died:
        assert response.status_code == 507, response.text  # exit code 137 is remapped to 507
        assert is_worker_died(response), response.text
    for response in responses:
        if response.status_code == 200:
            assert response.json()["caption"] == before.json()["caption"]
    assert late_response.status_code == 200, late_response.text
    assert late_response.json()["caption"] == before.json()["caption"]

    after = server.predict(json=body)
    assert after.status_code == 200, after.text
    assert after.json()["caption"] == before.json()["caption"]
    assert [w["pid"] for w in server.workers()] == [new_worker["pid"]]
