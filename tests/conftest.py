"""Shared fixtures: a real TorchServe serving a .mar built from a generated test checkpoint.

Fixtures for any test module:

    test_checkpoint_dir   official-format checkpoint made by tools/make_test_checkpoint.py (session, tmp dir);
                          set CONETTE_TEST_CHECKPOINT=/path to use another checkpoint folder (official or serving)
    model_store_dir       a model store holding conette.mar built from it by scripts/build_mar.sh (session)
    ts_server             a running TorchServe (session), stopped cleanly at the end (asserts no process is left)

`ts_server` is a TorchServeInstance (stable interface):

    .inference_url      "http://127.0.0.1:18080"      .model_name        "conette"
    .management_url     "http://127.0.0.1:18081"      .token             inference key (Authorization: Bearer ...)
    .metrics_url        "http://127.0.0.1:18082"      .management_token  management key
    .workdir            TorchServe's cwd (key_file.json, logs/)
    .key_file           path of key_file.json
    .request(method, path, api="inference"|"management"|"metrics", token=<default key of that api>, **kw)
                        requests.request with the right base URL and Authorization header; token=None sends none
    .predict(**kw)      POST /predictions/<model_name> with the inference key
    .metrics_text()     GET /metrics body
    .workers()          the model's workers as described by the management API
    .wait_for_workers(n, timeout=...)   block until exactly n workers are READY
    .own_processes()    "pid cmdline" of this instance's live frontend and worker processes

A test that needs a server of its own (other config.properties entries, another model store) builds one:
    TorchServeInstance(workdir=..., model_store=..., ports=free_ports(...), overrides={...}).start() ... .stop()

The server runs the repository's config.properties with only the addresses, paths and ports changed (18080-18082,
gRPC 17070/17071), so it never collides with `make serve`; its TEMP (pid file, worker sockets, extracted .mar) is a
private tmp dir. Token authorization is ON, as in production. If another run holds those ports, free ones are
picked instead: always use the URL attributes, never hard-coded ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil
import pytest
import requests
from audio_factory import make_audio

from conette_client.files import free_ports
from conette_client.keys import KeyFileError, read_keys
from conette_client.torchserve import NotReadyError, describe_model, read_properties, wait_until_ready, workers_of
from conette_engine.engine import CaptioningEngine

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "conette"
TEST_PORTS = {"inference": 18080, "management": 18081, "metrics": 18082, "grpc_inference": 17070,
              "grpc_management": 17071}
STARTUP_TIMEOUT_S = 240
VENV_BIN = Path(sys.executable).parent


def checkout_env(**overrides: str) -> dict[str, str]:
    """The environment for a subprocess that runs this checkout's code (python -m conette_client.caption,
    tools/, scripts/): pytest's `pythonpath` reaches only this process, a shared virtualenv may hold another
    checkout's editable install."""
    own = os.pathsep.join(str(REPO_ROOT / folder) for folder in ("handler", "client", "tools"))
    inherited = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": own + (os.pathsep + inherited if inherited else ""), **overrides}


def run_checked(command: list, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", checkout_env())
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({completed.returncode}):\n"
                           f"{completed.stdout}\n{completed.stderr}")
    return completed


@dataclass
class TorchServeInstance:
    workdir: Path
    model_store: Path
    model_name: str = MODEL_NAME
    ports: dict = field(default_factory=partial(free_ports, TEST_PORTS))
    overrides: dict = field(default_factory=dict)  # extra config.properties entries (e.g. to disable auth)
    process: subprocess.Popen | None = None
    keys: dict = field(default_factory=dict)

    def url(self, api: str) -> str:
        """Base URL of an API: "inference", "management" or "metrics"."""
        return f"http://127.0.0.1:{self.ports[api]}"

    inference_url = property(lambda self: self.url("inference"))
    management_url = property(lambda self: self.url("management"))
    metrics_url = property(lambda self: self.url("metrics"))

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def token(self) -> str | None:
        return self.keys.get("inference")

    @property
    def management_token(self) -> str | None:
        return self.keys.get("management")

    @property
    def temp_dir(self) -> Path:
        return self.workdir / "tmp"

    @property
    def env(self) -> dict:
        # TEMP isolates the pid file, the worker sockets and the extracted .mar from any other TorchServe.
        return {**os.environ, "TEMP": str(self.temp_dir), "TMPDIR": str(self.temp_dir),
                "LOG_LOCATION": str(self.workdir / "logs"), "METRICS_LOCATION": str(self.workdir / "logs"),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def write_config(self) -> Path:
        properties = read_properties(REPO_ROOT / "config.properties")
        properties.update({
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(self.model_store),
            "workflow_store": str(self.workdir / "no-workflows"),
            "metrics_config": str(REPO_ROOT / properties.get("metrics_config", "metrics.yaml")),
            **self.overrides,
        })
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
        return config

    def start(self) -> TorchServeInstance:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "no-workflows").mkdir(exist_ok=True)
        config = self.write_config()
        self.process = subprocess.Popen(
            [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=self.workdir, env=self.env, stdout=open(self.workdir / "torchserve.out", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self.wait_for_workers(1, timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_keys(self) -> None:
        if self.keys or self.overrides.get("disable_token_authorization") == "true":
            return
        if self.key_file.is_file():
            try:
                self.keys = read_keys(self.key_file)
            except KeyFileError:
                return  # TorchServe is still writing it: read again on the next poll

    def request(self, method: str, path: str, api: str = "inference", token: str | None = "default",
                **kwargs) -> requests.Response:
        base = self.url(api)
        if token == "default":
            token = {"inference": self.token, "management": self.management_token}.get(api)
        headers = dict(kwargs.pop("headers", None) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", 120)
        return requests.request(method, base + path, headers=headers, **kwargs)

    def predict(self, **kwargs) -> requests.Response:
        return self.request("POST", f"/predictions/{self.model_name}", **kwargs)

    def metrics_text(self) -> str:
        response = self.request("GET", "/metrics", api="metrics")
        response.raise_for_status()
        return response.text

    def describe(self) -> list[dict]:
        return describe_model(self.management_url, self.model_name, self.management_token, timeout=120)

    def workers(self) -> list[dict]:
        return workers_of(self.describe())

    def wait_for_workers(self, n: int, timeout: float = 120) -> list[dict]:
        def still_starting() -> None:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited ({self.process.returncode}):\n{self.log_tail()}")
            if self.worker_died():
                raise RuntimeError(f"a TorchServe worker died:\n{self.log_tail()}")
            self._read_keys()

        try:
            return wait_until_ready(self.describe, workers=n, timeout_s=timeout, check=still_starting)
        except NotReadyError as error:
            raise TimeoutError(f"{error}:\n{self.log_tail()}") from error

    def worker_died(self) -> bool:
        model_log = self.workdir / "logs" / "model_log.log"
        return model_log.is_file() and "Backend worker process died" in model_log.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        texts = []
        for log in [self.workdir / "torchserve.out", *sorted((self.workdir / "logs").glob("*.log"))]:
            if log.is_file():
                texts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(texts)

    def own_processes(self) -> list[str]:
        """Live processes of this instance, as "pid cmdline": the frontend and the workers (their command lines
        name our workdir: the config file, the TEMP dir and the worker sockets in it)."""
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if str(self.workdir) in cmdline:
                found.append(f"{process.info['pid']} {cmdline[:200]}")
        return found

    def stop(self, timeout: float = 60) -> None:
        if self.process is None:
            return
        subprocess.run([str(VENV_BIN / "torchserve"), "--stop", "--foreground"], cwd=self.workdir, env=self.env,
                       capture_output=True, timeout=timeout + 10)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"TorchServe did not stop within {timeout} s") from None
        finally:
            self.process = None
        deadline = time.monotonic() + 30
        while self.own_processes() and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="session")
def test_checkpoint_dir(tmp_path_factory) -> Path:
    configured = os.environ.get("CONETTE_TEST_CHECKPOINT")
    if configured:
        return Path(configured)
    out = tmp_path_factory.mktemp("checkpoint")
    run_checked([sys.executable, str(REPO_ROOT / "tools" / "make_test_checkpoint.py"), str(out), "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def model_store_dir(tmp_path_factory, test_checkpoint_dir) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    run_checked(["bash", str(REPO_ROOT / "scripts" / "build_mar.sh"), str(test_checkpoint_dir), str(store)],
                env=checkout_env(PYTHON=sys.executable))
    return store


@pytest.fixture(scope="session")
def ts_server(tmp_path_factory, model_store_dir):
    if shutil.which("java") is None:
        pytest.fail("java is not installed: TorchServe needs a JRE 17 (apt-get install default-jre-headless)")
    server = TorchServeInstance(workdir=tmp_path_factory.mktemp("torchserve"), model_store=model_store_dir)
    server.start()
    yield server
    server.stop()
    left = server.own_processes()
    assert not left, f"processes left after stop: {left}"


# ---- real encoded audio, and the in-process engine as the oracle of what the server must answer ----------------

MAX_DURATION_S = 30.0  # handler: max_duration_s in handler/model-config.yaml
MAX_SEGMENTED_DURATION_S = 180.0  # handler: max_segmented_duration_s


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, bytes]:
    """Short clips in several containers/codecs, made with espeak-ng, FFmpeg and SoX."""
    tmp = tmp_path_factory.mktemp("clips")
    sox_clip = tmp / "pink_sox.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(sox_clip), "synth", "1.2", "pinknoise",
                    "vol", "0.3"], check=True, capture_output=True)
    paths = {
        "speech_wav": make_audio(tmp, "wav16", seconds=2.0, sample_rate=22050, signal="speech"),
        "tone_flac": make_audio(tmp, "flac", seconds=1.5, sample_rate=44100, channels=2),
        "noise_mp3": make_audio(tmp, "mp3", seconds=2.5, sample_rate=44100, signal="noise"),
        "tone_ogg": make_audio(tmp, "ogg", seconds=1.0, sample_rate=48000),
        "speech_opus": make_audio(tmp, "opus", seconds=1.8, sample_rate=24000, signal="speech"),
        "tone_m4a": make_audio(tmp, "m4a", seconds=1.3, sample_rate=32000, channels=2),
        "noise_wav24": make_audio(tmp, "wav24", seconds=0.9, sample_rate=48000, signal="noise"),
        "pink_sox_wav": sox_clip,
        "too_long_wav": make_audio(tmp, "wav16", seconds=MAX_DURATION_S + 1, sample_rate=8000),
        # Segmented captioning: a long recording (noise, AAC stereo 44.1 kHz), clips at and over the segmented limit.
        "long_m4a": make_audio(tmp, "m4a", seconds=47.3, sample_rate=44100, channels=2, signal="noise"),
        "segmented_max_wav": make_audio(tmp, "wav16", seconds=MAX_SEGMENTED_DURATION_S, sample_rate=8000),
        "segmented_too_long_wav": make_audio(tmp, "wav16", seconds=MAX_SEGMENTED_DURATION_S + 1, sample_rate=8000),
    }
    return {name: Path(path).read_bytes() for name, path in paths.items()}


@pytest.fixture(scope="session")
def engine(test_checkpoint_dir) -> CaptioningEngine:
    return CaptioningEngine.load(test_checkpoint_dir, max_duration_s=MAX_DURATION_S)


@pytest.fixture(scope="session")
def expected(engine, clips):
    """expected(clip_name, **options) -> the engine's answer for that clip alone (memoized)."""
    cache: dict = {}

    def answer(name: str, **options) -> dict:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:  # segment_s in the options: the segmented answer
            opts = engine.parse_options({"beam_size": 3, **options})
            cache[key] = engine.caption_segments([engine.load_audio(clips[name], options=opts)], [opts])[0].to_dict()
        return cache[key]

    return answer
