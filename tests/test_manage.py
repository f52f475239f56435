"""conette-manage (conette_client.manage) against the real TorchServe of the session (`ts_server`,
tests/conftest.py), and its pure helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from audio_factory import make_audio
from conette_client import manage
from conette_client.files import unused_local_port
from conette_client.prometheus import parse_samples
from conette_client.torchserve import NotReadyError, ServerError, wait_until_ready
from conftest import checkout_env

MANAGE = [sys.executable, "-m", "conette_client.manage"]


def run_manage(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MANAGE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=checkout_env())


def run_against(ts_server, *args: str, cwd: Path | None = None, token: str | None = "default"
                ) -> subprocess.CompletedProcess:
    urls = ["--management-url", ts_server.management_url, "--metrics-url", ts_server.metrics_url]
    tokens = ["--token", ts_server.management_token if token == "default" else token] if token else []
    return run_manage(*urls, *tokens, *args, cwd=cwd)


def test_describe_shows_the_model_and_its_workers(ts_server):
    workers = ts_server.workers()
    result = run_against(ts_server, "describe")
    assert result.returncode == 0, result.stderr
    assert f"model {ts_server.model_name} version" in result.stdout
    assert f"workers: {len(workers)} " in result.stdout
    assert "queue: 0 pending, room for " in result.stdout
    for worker in workers:
        assert f"worker {worker['id']}: READY, pid {worker['pid']}" in result.stdout

    as_json = run_against(ts_server, "--json", "describe")
    assert as_json.returncode == 0, as_json.stderr
    [description] = json.loads(as_json.stdout)
    assert description["modelName"] == ts_server.model_name
    assert description["batchSize"] >= 1


def test_management_key_is_read_from_key_file_in_cwd(ts_server):
    result = run_against(ts_server, "describe", cwd=ts_server.workdir, token=None)
    assert result.returncode == 0, result.stderr
    assert f"model {ts_server.model_name}" in result.stdout


def test_wrong_management_key_is_an_error(ts_server):
    result = run_against(ts_server, "describe", token="not-the-key")
    assert result.returncode == 1
    assert "answered 400" in result.stderr and "InvalidKeyException" in result.stderr


def test_scale_up_and_back_down(ts_server):
    before = len(ts_server.workers())
    try:
        up = run_against(ts_server, "scale", str(before + 1))
        assert up.returncode == 0, up.stderr
        # synchronous=true: the new worker is READY when the command returns.
        workers = ts_server.workers()
        assert len(workers) == before + 1 and all(w["status"] == "READY" for w in workers)
        assert f"workers: {before + 1} " in up.stdout
    finally:
        down = run_against(ts_server, "scale", str(before))
    assert down.returncode == 0, down.stderr
    ts_server.wait_for_workers(before, timeout=60)


def test_metrics_show_key_series_after_a_request(tmp_path, ts_server):
    audio = make_audio(tmp_path, "wav16", seconds=1.0)
    response = ts_server.predict(data=audio.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    result = run_against(ts_server, "metrics", token=None)  # the metrics port needs no key
    assert result.returncode == 0, result.stderr
    served = [line for line in result.stdout.splitlines() if line.startswith("ts_inference_requests_total{")]
    assert served and float(served[0].rsplit(" ", 1)[1]) >= 1
    assert "mean inference_latency per request" in result.stdout
    assert "_bucket" not in result.stdout
    everything = run_against(ts_server, "metrics", "--all", token=None)
    assert len(everything.stdout.splitlines()) >= len(result.stdout.splitlines())


def test_averages_from_prometheus_text():
    text = "\n".join([
        "# HELP ts_inference_requests_total Total number of inference requests.",
        "# TYPE ts_inference_requests_total counter",
        'ts_inference_requests_total{model_name="conette",model_version="default",hostname="h"} 4.0',
        'ts_inference_latency_microseconds{model_name="conette",model_version="default",hostname="h"} 200000.0',
        'BatchSize_bucket{ModelName="conette",Level="Model",le="+Inf"} 3.0',
        'BatchSize_sum{ModelName="conette",Level="Model"} 7.0',
        'BatchSize_count{ModelName="conette",Level="Model"} 2.0',
    ])
    samples = parse_samples(text)
    assert len(samples) == 5
    lines = manage.averages([s for s in samples if not s[0].endswith("_bucket")])
    assert lines == [
        'mean BatchSize{ModelName="conette",Level="Model"}: 3.5 over 2 observations',
        'mean inference_latency per request{model_name="conette",model_version="default",hostname="h"}: 50.0 ms',
    ]


def test_unreachable_server_is_an_error():
    result = run_manage("--management-url", "http://127.0.0.1:9", "--token", "x", "describe", timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: GET http://127.0.0.1:9/models/conette failed")


def test_wait_ready_takes_the_addresses_from_config_properties(tmp_path, ts_server):
    config = tmp_path / "config.properties"
    config.write_text(
        "# as make serve passes it\n"
        f"inference_address={ts_server.inference_url}\n"
        f"management_address={ts_server.management_url}\n"
        f"metrics_address={ts_server.metrics_url}\n"
    )
    result = run_manage("--config", str(config), "--timeout", "60", "wait-ready", cwd=ts_server.workdir)
    assert result.returncode == 0, result.stderr
    assert f"{ts_server.inference_url}/predictions/{ts_server.model_name}" in result.stdout
    described = run_manage("--config", str(config), "--key-file", str(ts_server.key_file), "describe")
    assert described.returncode == 0 and f"model {ts_server.model_name}" in described.stdout


def test_wait_ready_gives_up_after_its_timeout():
    result = run_manage("--management-url", f"http://127.0.0.1:{unused_local_port()}", "--token", "x",
                        "--timeout", "2", "wait-ready", timeout=60)
    assert result.returncode == 1
    assert "no READY worker after 2 s" in result.stderr and "failed" in result.stderr


def test_wait_until_ready_counts_ready_workers():
    answers = iter([
        ServerError("GET /models/conette answered 404"),  # not registered yet
        [{"workers": [{"id": "9000", "status": "UNLOADING"}]}],
        [{"workers": [{"id": "9000", "status": "READY"}, {"id": "9001", "status": "STARTING"}]}],
        [{"workers": [{"id": "9000", "status": "READY"}, {"id": "9001", "status": "READY"}]}],
    ])

    def describe():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    found = wait_until_ready(describe, workers=2, timeout_s=5, interval_s=0)
    assert [worker["id"] for worker in found] == ["9000", "9001"]
    one = [{"workers": [{"id": "9000", "status": "READY"}, {"id": "9001", "status": "STARTING"}]}]
    assert len(wait_until_ready(lambda: one, timeout_s=5, interval_s=0)) == 2  # any READY worker will do
    with pytest.raises(NotReadyError, match="not 2 READY worker"):
        wait_until_ready(lambda: one, workers=2, timeout_s=0.05, interval_s=0.01)
