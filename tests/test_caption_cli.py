"""conette-caption (conette_client.caption), the batch captioning client.

Client behaviour that a healthy server never shows (retries on 503/507, dropped connections, refused
tokens, bounded concurrency) is tested against an in-thread HTTP server whose answers the test
scripts. What the client writes (stdout, JSON lines, CSV) is tested against the real TorchServe of
the session (`ts_server`, tests/conftest.py) with real encoded audio.
"""

from __future__ import annotations

import csv
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from audio_factory import make_audio
from conette_client.files import unused_local_port
from conette_engine.decoding import OPTION_NAMES
from conftest import checkout_env

CAPTION = [sys.executable, "-m", "conette_client.caption"]
DROP = "drop"  # a scripted answer: close the connection without answering


def run_caption(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CAPTION, "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=checkout_env(),
    )


class ScriptedServer:
    """Answers any POST with `answer(n, request)`, n = 0, 1, ... per request received, `request` a dict
    of path, params, headers and body.

    `answer` returns (status, json_payload) or DROP. Records each request and the peak number of
    requests being answered at once.
    """

    def __init__(self, answer, delay_s: float = 0.0):
        self.answer, self.delay_s = answer, delay_s
        self.requests: list[dict] = []
        self.in_flight = self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self):
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                split = urlsplit(self.path)
                request = {
                    "path": split.path,
                    "params": {k: v[0] for k, v in parse_qs(split.query).items()},
                    "headers": dict(self.headers),
                    "body": body,
                }
                with scripted._lock:
                    n = len(scripted.requests)
                    scripted.requests.append(request)
                    scripted.in_flight += 1
                    scripted.peak_in_flight = max(scripted.peak_in_flight, scripted.in_flight)
                try:
                    time.sleep(scripted.delay_s)
                    answer = scripted.answer(n, request)
                    if answer == DROP:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    status, payload = answer
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with scripted._lock:
                        scripted.in_flight -= 1

            def log_message(self, *args):
                pass

        return Handler


def caption_payload(body: bytes, task: str = "clotho") -> dict:
    return {
        "caption": f"a sound of {len(body)} bytes",
        "score": -1.5,
        "task": task,
        "candidates": [{"caption": f"a sound of {len(body)} bytes", "score": -1.5}],
        "tags": [{"label": "Speech", "score": 0.9}, {"label": "Music", "score": 0.6}],
        "audio": {"duration_s": 1800.0, "sample_rate": 16000, "channels": 1},
    }


BUSY = (
    503,
    {
        "code": 503,
        "type": "ServiceUnavailableException",
        "message": "Model conette has no worker to serve inference request.",
    },
)
# What TorchServe's frontend answers when the worker running a request dies (as 500 or as 507).
WORKER_DIED = {"code": 500, "type": "InternalServerException", "message": "Worker died."}


@pytest.fixture
def two_files(tmp_path) -> list[Path]:
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for index, path in enumerate(paths):
        path.write_bytes(b"RIFF" + bytes(10 + index))
    return paths


# ------------------------------------------------------------------------------ scripted server


def test_503_and_507_are_retried_with_backoff(two_files):
    def answer(n, request):
        if n == 0:
            return BUSY
        if n == 1:
            return 507, {"code": 507, "type": "WorkerOOM", "message": "out of memory"}
        return 200, caption_payload(request["body"])

    with ScriptedServer(answer) as server:
        result = run_caption("--audio", str(two_files[0]), "--url", server.url, "--backoff", "0.2", "--token", "t")
    assert result.returncode == 0, result.stderr
    assert len(server.requests) == 3
    assert result.stdout.strip() == f"{two_files[0]} [clotho] a sound of {two_files[0].stat().st_size} bytes"
    assert "1 files, 1 captioned, 0 failed, 0.5000 audio hours" in result.stderr


@pytest.mark.parametrize(
    "status, payload",
    [
        (500, WORKER_DIED),
        (507, {**WORKER_DIED, "code": 507}),
        (502, {"message": "Bad Gateway"}),
        (504, {"message": "Gateway Timeout"}),
    ],
    ids=["500-worker-died", "507-worker-died", "502", "504"],
)
def test_server_side_failures_worth_another_try_are_retried(two_files, status, payload):
    with ScriptedServer(
        lambda n, request: (status, payload) if n == 0 else (200, caption_payload(request["body"]))
    ) as server:
        result = run_caption("--audio", str(two_files[0]), "--url", server.url, "--backoff", "0.01")
    assert result.returncode == 0, result.stderr
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "status, payload",
    [
        (400, {"error": {"type": "option_out_of_range", "message": "beam_size must be an integer in [1, 16]"}}),
        (404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: conette"}),
        (413, {"code": 413, "type": "RequestEntityTooLarge", "message": "request too large"}),
        (500, {"error": {"type": "internal_error", "message": "the server failed on this request; see the model log"}}),
        (500, {"code": 500, "type": "InternalServerException", "message": "something else"}),
    ],
    ids=["400-bad-option", "404", "413", "500-internal-error", "500-other"],
)
def test_client_errors_and_server_bugs_are_not_retried(two_files, status, payload):
    with ScriptedServer(lambda n, request: (status, payload)) as server:
        result = run_caption("--audio", str(two_files[0]), "--url", server.url, "--backoff", "0.01", "--json")
    assert result.returncode == 1, result.stderr
    assert len(server.requests) == 1
    [line] = map(json.loads, result.stdout.splitlines())
    assert line["status"] == status
    assert line["error"]["message"] == payload.get("error", payload)["message"]


def test_dropped_connections_are_retried(two_files):
    with ScriptedServer(lambda n, request: DROP if n < 2 else (200, caption_payload(request["body"]))) as server:
        result = run_caption("--audio", str(two_files[0]), "--url", server.url, "--backoff", "0.05")
    assert result.returncode == 0, result.stderr
    assert len(server.requests) == 3


def test_retries_run_out_and_the_file_is_reported(two_files):
    with ScriptedServer(lambda n, request: BUSY) as server:
        result = run_caption(
            "--audio", *map(str, two_files), "--url", server.url, "--retries", "2", "--backoff", "0.01"
        )
    assert result.returncode == 1
    assert len(server.requests) == 6  # 2 files x (1 + 2 retries)
    for path in two_files:
        assert f"error: {path}: HTTP 503, ServiceUnavailableException: Model conette has no worker" in result.stderr
        assert "after 3 attempts" in result.stderr
    assert "2 files, 0 captioned, 2 failed" in result.stderr


def test_unreachable_server_is_a_per_file_connection_error(two_files):
    result = run_caption(
        "--audio",
        str(two_files[0]),
        "--url",
        f"http://127.0.0.1:{unused_local_port()}",
        "--retries",
        "1",
        "--backoff",
        "0",
    )
    assert result.returncode == 1
    assert "connection_error" in result.stderr and "after 2 attempts" in result.stderr


def test_client_errors_are_not_retried_and_other_files_go_on(two_files):
    bad = {"error": {"type": "audio_decode_error", "message": "cannot decode the audio"}}
    rejected = two_files[0].read_bytes()
    with ScriptedServer(
        lambda n, request: (400, bad) if request["body"] == rejected else (200, caption_payload(request["body"]))
    ) as server:
        result = run_caption("--audio", *map(str, two_files), "--url", server.url, "--json")
    assert result.returncode == 1
    lines = {line["file"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert len(server.requests) == 2
    assert lines[str(two_files[0])]["error"] == bad["error"] and lines[str(two_files[0])]["status"] == 400
    assert lines[str(two_files[1])]["caption"] == f"a sound of {two_files[1].stat().st_size} bytes"


def test_refused_token_stops_the_run(tmp_path):
    paths = []
    for index in range(20):
        paths.append(tmp_path / f"{index}.wav")
        paths[-1].write_bytes(b"RIFF")
    refusal = (
        400,
        {
            "code": 400,
            "type": "InvalidKeyException",
            "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
        },
    )
    with ScriptedServer(lambda n, request: refusal, delay_s=0.05) as server:
        result = run_caption("--audio", *map(str, paths), "--url", server.url, "--concurrency", "2", "--token", "wrong")
    assert result.returncode == 2
    assert "refused the inference token" in result.stderr and "--key-file" in result.stderr
    assert len(server.requests) < len(paths)


def test_ctrl_c_stops_without_sending_the_queued_files(tmp_path):
    paths = []
    for index in range(40):
        paths.append(tmp_path / f"{index}.wav")
        paths[-1].write_bytes(b"RIFF")
    with ScriptedServer(lambda n, request: (200, caption_payload(request["body"])), delay_s=0.5) as server:
        process = subprocess.Popen(
            [*CAPTION, "--no-progress", "--audio", *map(str, paths), "--url", server.url, "--concurrency", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=checkout_env(),
        )
        deadline = time.monotonic() + 30
        while len(server.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert len(server.requests) <= 6  # the requests in flight (and maybe one round more), not all 40


def test_request_shape_options_and_key_file_token(tmp_path, two_files):
    (tmp_path / "key_file.json").write_text(
        json.dumps(
            {
                "management": {"key": "mgmt-key", "expiration time": "x"},
                "inference": {"key": "infer-key", "expiration time": "x"},
                "API": {"key": "api-key"},
            }
        )
    )
    with ScriptedServer(lambda n, request: (200, caption_payload(request["body"], task="audiocaps"))) as server:
        result = run_caption(
            "--audio",
            str(two_files[0]),
            "--url",
            server.url + "/",
            "--model",
            "conette",
            "--task",
            "audiocaps",
            "--beam_size",
            "2",
            "--min_pred_size",
            "1",
            "--max_pred_size",
            "7",
            "--forbid_rep_mode",
            "none",
            "--threshold",
            "0.25",
            cwd=tmp_path,  # key_file.json is found in the current directory
        )
    assert result.returncode == 0, result.stderr
    [request] = server.requests
    assert request["path"] == "/invocations"
    assert request["params"] == {
        "model_name": "conette",
        "task": "audiocaps",
        "beam_size": "2",
        "min_pred_size": "1",
        "max_pred_size": "7",
        "forbid_rep_mode": "none",
        "threshold": "0.25",
    }
    assert request["headers"]["Content-Type"] == "application/octet-stream"
    assert request["headers"]["Authorization"] == "Bearer infer-key"
    assert request["body"] == two_files[0].read_bytes()


def test_concurrency_is_bounded(tmp_path):
    paths = []
    for index in range(8):
        paths.append(tmp_path / f"{index}.wav")
        paths[-1].write_bytes(b"RIFF" + bytes(index))
    with ScriptedServer(lambda n, request: (200, caption_payload(request["body"])), delay_s=0.3) as server:
        result = run_caption("--audio", *map(str, paths), "--url", server.url, "--concurrency", "3")
    assert result.returncode == 0, result.stderr
    assert server.peak_in_flight == 3
    assert len(result.stdout.splitlines()) == 8


def test_directories_globs_and_missing_files(tmp_path):
    clips = tmp_path / "clips"
    (clips / "nested").mkdir(parents=True)
    for name in ("b.flac", "a.wav", "nested/c.mp3", "notes.txt"):
        (clips / name).write_bytes(b"RIFF" + name.encode())
    missing = tmp_path / "missing.wav"
    with ScriptedServer(lambda n, request: (200, caption_payload(request["body"]))) as server:
        result = run_caption(
            "--audio",
            str(clips),
            str(clips / "*.wav"),
            str(missing),
            "--url",
            server.url,
            "--csv_export",
            str(tmp_path / "out" / "captions.csv"),
        )
    assert result.returncode == 1
    # Directory walked (audio suffixes only, sorted), a.wav not sent twice, the missing file reported.
    sent = sorted(request["body"] for request in server.requests)
    assert sent == sorted(b"RIFF" + name.encode() for name in ("a.wav", "b.flac", "nested/c.mp3"))
    assert f"error: {missing}: file_unreadable" in result.stderr
    with open(tmp_path / "out" / "captions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["audio"] for row in rows] == [
        str(clips / "a.wav"),
        str(clips / "b.flac"),
        str(clips / "nested" / "c.mp3"),
        str(missing),
    ]
    assert rows[0]["tags"] == "Speech; Music" and rows[0]["error"] == ""
    assert rows[3]["candidate"] == "" and rows[3]["error"].startswith("file_unreadable")


def test_usage_errors_exit_2(tmp_path, two_files):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_caption("--audio", str(empty)).returncode == 2
    assert run_caption("--audio", str(tmp_path / "*.nothing")).returncode == 2
    mismatch = run_caption("--audio", *map(str, two_files), "--task", "clotho", "audiocaps", "macs")
    assert mismatch.returncode == 2 and "one per file" in mismatch.stderr
    no_key = run_caption("--audio", str(two_files[0]), "--key-file", str(tmp_path / "nope.json"))
    assert no_key.returncode == 2 and "does not exist" in no_key.stderr


def test_decoding_option_flags_are_the_servers_options_with_their_ranges(two_files):
    # Wide enough that argparse does not wrap a range across lines.
    help_text = subprocess.run(
        [*CAPTION, "--help"], capture_output=True, text=True, env=checkout_env(COLUMNS="300"), timeout=60
    ).stdout
    for name in OPTION_NAMES:  # --task is among them: it takes one task or one per file
        assert f"--{name} " in help_text, name
    assert "an integer in [1, 16]" in help_text and "one of ['none', 'content_words', 'all']" in help_text
    with ScriptedServer(lambda n, request: (200, caption_payload(request["body"]))) as server:
        for bad in (
            ["--beam_size", "17"],
            ["--threshold", "1.5"],
            ["--forbid_rep_mode", "sometimes"],
            ["--min_pred_size", "two"],
        ):
            result = run_caption("--audio", str(two_files[0]), "--url", server.url, *bad)
            assert result.returncode == 2, (bad, result.stderr)
            assert bad[0] in result.stderr
    assert server.requests == []  # refused before anything was sent


# ------------------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    clips = {
        "wav": make_audio(folder, "wav16", seconds=2.0, sample_rate=16000, signal="noise", name="noise"),
        "mp3": make_audio(folder, "mp3", seconds=3.0, sample_rate=44100, channels=2, name="tone"),
        "ogg": make_audio(folder, "ogg", seconds=2.0, sample_rate=22050, signal="speech", name="speech"),
    }
    not_audio = folder / "readme.wav"
    not_audio.write_text("this is text, not audio\n")
    clips["not_audio"] = not_audio
    return clips


def test_real_server_csv_json_and_per_file_errors(tmp_path, ts_server, real_clips):
    audio_paths = [real_clips[name] for name in ("wav", "mp3", "ogg")]
    csv_path = tmp_path / "captions.csv"
    result = run_caption(
        "--audio",
        *map(str, audio_paths),
        str(real_clips["not_audio"]),
        "--url",
        ts_server.inference_url,
        "--key-file",
        str(ts_server.key_file),
        "--task",
        "audiocaps",
        "--json",
        "--csv_export",
        str(csv_path),
        "--concurrency",
        "3",
    )
    assert result.returncode == 1, result.stderr
    lines = {line["file"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert set(lines) == {str(p) for p in audio_paths} | {str(real_clips["not_audio"])}

    for path in audio_paths:
        # What the CLI reports is what the server answers for the same bytes and options sent as a form.
        direct = ts_server.predict(files={"audio": (path.name, path.read_bytes())}, data={"task": "audiocaps"})
        assert direct.status_code == 200, direct.text
        expected = direct.json()
        line = lines[str(path)]
        assert line["caption"] == expected["caption"] and line["task"] == "audiocaps"
        assert line["score"] == pytest.approx(expected["score"], abs=1e-4)
    bad = lines[str(real_clips["not_audio"])]
    assert 400 <= bad["status"] < 500 and bad["error"]["type"] and bad["error"]["message"]
    assert f"error: {real_clips['not_audio']}: HTTP {bad['status']}" in result.stderr

    with open(csv_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["audio", "task", "candidate", "score", "tags", "duration_s", "error"]
    by_audio = {row["audio"]: row for row in rows}
    for path in audio_paths:
        row, line = by_audio[str(path)], lines[str(path)]
        assert row["candidate"] == line["caption"] and row["task"] == "audiocaps" and row["error"] == ""
        assert float(row["score"]) == pytest.approx(line["score"])
        assert row["tags"] == "; ".join(tag["label"] for tag in line["tags"])
        assert float(row["duration_s"]) == pytest.approx(line["audio"]["duration_s"])
    assert by_audio[str(real_clips["not_audio"])]["error"].startswith(bad["error"]["type"])
    total_hours = sum(lines[str(p)]["audio"]["duration_s"] for p in audio_paths) / 3600
    assert f"4 files, 3 captioned, 1 failed, {total_hours:.4f} audio hours" in result.stderr


def test_real_server_options_and_key_file_in_cwd(ts_server, real_clips):
    result = run_caption(
        "--audio",
        str(real_clips["wav"]),
        "--url",
        ts_server.inference_url,
        "--beam_size",
        "2",
        "--max_pred_size",
        "6",
        "--json",
        cwd=ts_server.workdir,
    )
    assert result.returncode == 0, result.stderr
    [line] = map(json.loads, result.stdout.splitlines())
    assert line["task"] == "clotho"
    assert len(line["candidates"]) == 2


def test_real_server_refuses_a_wrong_token(ts_server, real_clips):
    result = run_caption("--audio", str(real_clips["wav"]), "--url", ts_server.inference_url, "--token", "not-the-key")
    assert result.returncode == 2
    assert "InvalidKeyException" in result.stderr


def test_real_server_behind_a_proxy_that_is_busy_twice(ts_server, real_clips):
    """503 twice from a proxy, then the proxy forwards to the real server: the caption is the server's."""

    def busy_then_forward(n, request):
        if n < 2:
            return BUSY
        forwarded = ts_server.request(
            "POST",
            request["path"],
            params=request["params"],
            data=request["body"],
            headers={"Content-Type": request["headers"]["Content-Type"]},
        )
        return forwarded.status_code, forwarded.json()

    with ScriptedServer(busy_then_forward) as proxy:
        result = run_caption(
            "--audio", str(real_clips["mp3"]), "--url", proxy.url, "--task", "macs", "--backoff", "0.1", "--json"
        )
    assert result.returncode == 0, result.stderr
    assert len(proxy.requests) == 3
    [line] = map(json.loads, result.stdout.splitlines())
    direct = ts_server.predict(files={"audio": ("tone.mp3", real_clips["mp3"].read_bytes())}, data={"task": "macs"})
    assert line["task"] == "macs" and line["caption"] == direct.json()["caption"]
