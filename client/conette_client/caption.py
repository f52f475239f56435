#!/usr/bin/env python
"""Caption many audio files with a running conette-serve (TorchServe) server.

    conette-caption --audio clips/ "more/**/*.flac" one.wav --csv_export captions.csv

The client-side counterpart of the reference's `conette-predict`: the same --audio, --task and
--csv_export arguments, plus the decoding options the server accepts (their names, help and ranges come
from conette_engine.decoding.DecodingOptions, as the server's do). Each file is POSTed as raw bytes
(Content-Type: application/octet-stream) to {url}/invocations?model_name={model} with the options as
further query parameters, several at a time (--concurrency).

Retries (up to --retries per file, exponential backoff with jitter, or the server's Retry-After):
  * HTTP 502, 503, 504, 507: the server or a proxy in front of it is busy, restarting or out of memory;
  * HTTP 500 from TorchServe's own frontend ({"code", "type", "message"}, message "Worker died."): the
    worker running the batch died; TorchServe starts another, and the same file usually succeeds then;
  * no answer: connection refused or dropped, timeouts.
Never retried: every 4xx (the request itself is wrong: bad audio, bad option, refused token), and a 500
with this project's own error body ({"error": {"type": "internal_error", ...}}): the handler failed on this
input, a server bug that the same bytes would hit again. Such a file is reported and the run goes on.

Output: one line per file on stdout ("PATH [task] caption"), or JSON lines with --json (the server's
response plus "file", or "file", "task", "status" and "error" for a failed file); errors, the progress bar and a
closing summary (files, audio hours, wall time, failures) on stderr.

Long recordings and video (--segment S [--hop H]): each file is read locally in bounded memory with the
engine's streamed decoding and resampling, cut into the windows a server would cut for segment_s / hop_s,
and each window is sent as its own request (its 32 kHz samples as a float32 WAV), --concurrency at a time,
with the retry rule above; the answers are reassembled into the server's segmented answer. --format text,
json, csv, srt or vtt (subtitles: one cue per window; several inputs need --out-dir). See
docs/long-recordings.md and docs/commands.md.

The inference token is --token, or the "inference" key of TorchServe's key_file.json, read from
--key-file, else from ./key_file.json, else from the root of the checkout the command runs from.

Exit status: 0 when every file was captioned, 1 when some failed, 2 when the run could not start or
the server refused the token.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path

import requests

from .keys import KEY_FILE_NAME, KeyFileError, resolve_token
from .timeline import SAMPLE_RATE, SUBTITLE_FORMATS, assemble, float_wav_bytes, text_lines, timestamp
from .torchserve import DEFAULT_ADDRESSES, DEFAULT_MODEL

# What a directory given to --audio contributes; files named explicitly are sent whatever their name.
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".aif", ".aiff", ".wma"}
# Server busy (TorchServe: 503 queue full or no worker, 507 worker out of memory or died) or a proxy in
# front of it restarting (502, 504): worth another try later.
RETRY_STATUSES = {502, 503, 504, 507}
# TorchServe's frontend answers a request whose worker died with 500 and this message (or with 507).
WORKER_DIED_MESSAGE = "Worker died."
# --task takes one task or one per file, so it is not one of the generated decoding-option flags.
PER_FILE_OPTIONS = ("task",)
# Segmentation is done on the client side (any length, streamed): never sent, and also spelled --segment / --hop.
CLIENT_SIDE_OPTIONS = {"segment_s": "--segment", "hop_s": "--hop"}
CSV_COLUMNS = ("audio", "task", "candidate", "score", "tags", "duration_s", "error")
SEGMENT_CSV_COLUMNS = ("file", "start_s", "end_s", "task", "caption", "score", "tags", "error")
OUTPUT_FORMATS = ("text", "json", "csv", *SUBTITLE_FORMATS)
EXIT_OK, EXIT_SOME_FAILED, EXIT_CANNOT_RUN = 0, 1, 2


class UsageError(Exception):
    """The run cannot start; str(self) says why."""


class AuthorizationError(Exception):
    """The server refused the token: every other file would fail the same way."""


@dataclass
class Outcome:
    """What happened to one file: `response` on success, `error` ({"type", "message"}) otherwise."""

    path: str
    task: str | None
    response: dict | None = None
    error: dict | None = None
    status: int | None = None
    attempts: int = 0

    def json_line(self) -> str:
        # "file", not "audio": the server's answer already has an "audio" object (duration, rate, channels).
        if self.response is not None:
            return json.dumps({"file": self.path, **self.response}, ensure_ascii=False)
        return json.dumps(
            {"file": self.path, "task": self.task, "status": self.status, "error": self.error}, ensure_ascii=False
        )

    def segment_csv_rows(self) -> list[dict]:
        """With --segment: one row per window (file, start_s, end_s, task, caption, score, tags), or the error."""
        if self.response is None:
            error = f"{self.error['type']}: {self.error['message']}"
            return [{"file": self.path, "task": self.task or "", "error": error}]
        return [
            {
                "file": self.path,
                "start_s": segment["start_s"],
                "end_s": segment["end_s"],
                "task": self.response["task"],
                "caption": segment["caption"],
                "score": segment["score"],
                "tags": "; ".join(tag["label"] for tag in segment["tags"]),
                "error": "",
            }
            for segment in self.response["segments"]
        ]

    def csv_row(self) -> dict:
        if self.response is None:
            return {
                "audio": self.path,
                "task": self.task or "",
                "error": f"{self.error['type']}: {self.error['message']}",
            }
        return {
            "audio": self.path,
            "task": self.response.get("task", ""),
            "candidate": self.response.get("caption", ""),
            "score": self.response.get("score", ""),
            "tags": "; ".join(tag["label"] for tag in self.response.get("tags", [])),
            "duration_s": self.response.get("audio", {}).get("duration_s", ""),
            "error": "",
        }


# ---------------------------------------------------------------------------------------------- inputs


def expand_audio_args(entries: list[str]) -> list[str]:
    """Files as given, directories walked (audio suffixes only), globs expanded; order kept, no duplicates."""
    paths: list[str] = []
    for entry in entries:
        if os.path.isdir(entry):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(entry)
                for name in names
                if Path(name).suffix.lower() in AUDIO_SUFFIXES
            ]
            if not found:
                raise UsageError(f"directory {entry} holds no audio file ({', '.join(sorted(AUDIO_SUFFIXES))})")
            paths.extend(sorted(found))
        elif not os.path.exists(entry) and glob.has_magic(entry):
            found = [path for path in glob.glob(entry, recursive=True) if os.path.isfile(path)]
            if not found:
                raise UsageError(f"pattern {entry} matches no file")
            paths.extend(sorted(found))
        else:
            # A missing file is reported per file, like any other failure, not as a usage error.
            paths.append(entry)
    return list(dict.fromkeys(paths))


def tasks_per_file(tasks: list[str] | None, n_files: int) -> list[str | None]:
    """Like conette-predict: no task (server default), one task for all files, or one per file."""
    if not tasks:
        return [None] * n_files
    if len(tasks) == 1:
        return tasks * n_files
    if len(tasks) == n_files:
        return list(tasks)
    raise UsageError(f"--task takes one task, or one per file: got {len(tasks)} tasks for {n_files} files")


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class Client:
    endpoint: str
    token: str | None
    params: dict[str, str]
    retries: int
    backoff_s: float
    timeout_s: float
    _local: threading.local = field(default_factory=threading.local)
    # Set when the run must end early (token refused, Ctrl-C): files not yet started are then skipped.
    stopping: threading.Event = field(default_factory=threading.Event)

    def session(self) -> requests.Session:
        # One session per thread: requests.Session is not documented as thread-safe.
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            if self.token:
                self._local.session.headers["Authorization"] = f"Bearer {self.token}"
        return self._local.session

    def caption(self, path: str, task: str | None) -> Outcome | None:
        """The outcome for one file, or None when the run was stopped before it started."""
        if self.stopping.is_set():
            return None
        outcome = Outcome(path=path, task=task)
        try:
            body = Path(path).read_bytes()
        except OSError as error:
            outcome.error = {"type": "file_unreadable", "message": f"{error.strerror or error}"}
            return outcome
        return self.send(body, outcome)

    def send(self, body: bytes, outcome: Outcome) -> Outcome:
        """POST one body with the retry rule; the answer or the error goes into `outcome`."""
        params = dict(self.params, **({"task": outcome.task} if outcome.task else {}))
        for attempt in range(self.retries + 1):
            outcome.attempts = attempt + 1
            retry_after = None
            try:
                response = self.session().post(
                    self.endpoint,
                    params=params,
                    data=body,
                    headers={"Content-Type": "application/octet-stream"},
                    timeout=(10.0, self.timeout_s),
                )
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                outcome.status, outcome.error = None, {"type": "connection_error", "message": str(error)}
            except requests.RequestException as error:
                outcome.status, outcome.error = None, {"type": "request_error", "message": str(error)}
                return outcome
            else:
                outcome.status = response.status_code
                if response.status_code == 200:
                    try:
                        outcome.response, outcome.error = response.json(), None
                    except ValueError:
                        outcome.error = {"type": "bad_response", "message": f"not JSON: {response.text[:200]!r}"}
                    return outcome
                outcome.error = error_of(response)
                if is_authorization_failure(response):
                    self.stopping.set()
                    raise AuthorizationError(f"{outcome.error['type']}: {outcome.error['message']}")
                if not is_worth_retrying(response):
                    return outcome
                retry_after = response.headers.get("Retry-After")
            if attempt < self.retries:
                time.sleep(backoff_delay(attempt, self.backoff_s, retry_after))
        return outcome


def error_of(response: requests.Response) -> dict:
    """{"type", "message"} from our handler's {"error": {...}} or TorchServe's {"code", "type", "message"}."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        inner = payload.get("error") if isinstance(payload.get("error"), dict) else payload
        if "message" in inner:
            return {"type": str(inner.get("type", f"http_{response.status_code}")), "message": str(inner["message"])}
    return {"type": f"http_{response.status_code}", "message": response.text.strip()[:500] or response.reason}


def is_worth_retrying(response: requests.Response) -> bool:
    """Busy, restarting, or a worker that died under the request: the module docstring states the rule."""
    if response.status_code in RETRY_STATUSES:
        return True
    if response.status_code != 500:
        return False
    try:
        payload = response.json()
    except ValueError:
        return False
    # TorchServe's frontend shape, never the handler's {"error": {...}} (internal_error: a server bug).
    return isinstance(payload, dict) and "error" not in payload and payload.get("message") == WORKER_DIED_MESSAGE


def is_authorization_failure(response: requests.Response) -> bool:
    # TorchServe answers a missing or wrong token with 400 InvalidKeyException; proxies use 401/403.
    return response.status_code in (401, 403) or (
        response.status_code == 400 and "InvalidKeyException" in response.text
    )


def backoff_delay(attempt: int, base_s: float, retry_after: str | None) -> float:
    """Exponential backoff with jitter, or the server's Retry-After when it gives one in seconds."""
    if retry_after is not None and retry_after.strip().isdigit():
        return float(retry_after)
    return min(base_s * 2**attempt, 30.0) * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------------------------------------- output


class ProgressBar:
    """One self-rewriting line on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool, unit: str = "files"):
        self.total, self.done, self.failed, self.unit = total, 0, 0, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self._lock = threading.Lock()  # windows are counted from the request threads

    def update(self, failed: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += failed
            self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        width = 30
        total = max(self.total, self.done)  # windows are estimated from the header until a file is read through
        filled = width * self.done // max(total, 1)
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (total - self.done) if self.done else 0.0
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{total} {self.unit}, "
            f"{self.failed} failed, {elapsed:.0f}s elapsed, ~{eta:.0f}s left "
        )
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def write_csv(path: str, rows: list[dict], columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """Write to a temporary file next to `path`, then rename: a reader never sees half a CSV."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def summary_line(outcomes: list[Outcome], wall_s: float) -> str:
    failed = sum(outcome.response is None for outcome in outcomes)
    audio_s = sum(outcome.response.get("audio", {}).get("duration_s", 0.0) for outcome in outcomes if outcome.response)
    return (
        f"summary: {len(outcomes)} files, {len(outcomes) - failed} captioned, {failed} failed, "
        f"{audio_s / 3600:.4f} audio hours, {wall_s:.1f} s wall time"
    )


# ---------------------------------------------------------------------------------------------- main


def add_decoding_options(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per decoding option the server accepts, from DecodingOptions' field metadata; their names."""
    # Imported here: conette_engine imports torch, which only this command (not the light management
    # helper) pays for, and only once it parses its arguments.
    from conette_engine.decoding import DecodingOptions, describe_option

    names = []
    for spec in fields(DecodingOptions):
        if spec.name in PER_FILE_OPTIONS:
            continue
        meta = spec.metadata
        parser.add_argument(
            f"--{spec.name}",
            *([CLIENT_SIDE_OPTIONS[spec.name]] if spec.name in CLIENT_SIDE_OPTIONS else []),
            type=meta["kind"],
            choices=meta["choices"],
            help=f"{meta['help']}: {describe_option(spec.name)} (default: the checkpoint's, on the server)",
        )
        names.append(spec.name)
    return names


def check_decoding_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ranges checked before anything is sent: a value out of range would fail every file the same way."""
    from conette_engine.decoding import DecodingOptions, describe_option
    from conette_engine.errors import OptionError

    for spec in fields(DecodingOptions):
        value = getattr(args, spec.name, None)
        if spec.name in PER_FILE_OPTIONS or value is None or spec.metadata["low"] is None:
            continue
        if not spec.metadata["low"] <= value <= spec.metadata["high"]:
            parser.error(f"--{spec.name} must be {describe_option(spec.name)}, got {value}")
    try:
        DecodingOptions(segment_s=args.segment_s, hop_s=args.hop_s).check_segmentation()
    except OptionError as error:
        parser.error(f"--segment / --hop: {error}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="conette-caption", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--audio", nargs="+", required=True, help="audio files, directories (walked) and glob patterns")
    parser.add_argument(
        "--task", nargs="+", default=None, help="task for all files, or one per file (default: the server's, clotho)"
    )
    decoding_options = add_decoding_options(parser)
    parser.add_argument("--csv_export", help="write a CSV (audio,task,candidate,score,tags,duration_s,error)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file on stdout")
    parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        help="what goes on stdout: text (default), json (as --json), csv, or with --segment srt / vtt subtitles",
    )
    parser.add_argument(
        "--tags", type=int, default=0, help="with --segment: the top N tags of each window in text, srt and vtt"
    )
    parser.add_argument(
        "--out-dir", help="with --format srt/vtt: write DIR/<input name>.srt (or .vtt) per input instead of stdout"
    )
    parser.add_argument(
        "--url", default=DEFAULT_ADDRESSES["inference"], help="inference API base URL (default: %(default)s)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name on the server (default: %(default)s)")
    parser.add_argument("--token", help="inference token (default: from TorchServe's key_file.json when found)")
    parser.add_argument(
        "--key-file",
        help=f"TorchServe key file with the inference token (default: ./{KEY_FILE_NAME}, then the checkout root)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: %(default)s)")
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries per file on 502/503/504/507, a 500 'Worker died.', and connection errors (default: %(default)s)",
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        help="first retry delay in seconds, doubled each time (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for one answer (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        parser.error("--concurrency must be >= 1, --retries and --backoff >= 0, --timeout > 0")
    check_decoding_options(parser, args)
    args.decoding_options = decoding_options
    args.format = args.format or ("json" if args.json else "text")
    if args.json and args.format != "json":
        parser.error(f"--json is --format json, not --format {args.format}")
    if args.segment_s is None and (args.format in (*SUBTITLE_FORMATS, "csv") or args.tags or args.out_dir):
        parser.error("--format csv/srt/vtt, --tags and --out-dir need --segment (captions on a timeline)")
    if args.tags < 0 or (args.out_dir and args.format not in SUBTITLE_FORMATS):
        parser.error("--tags must be >= 0; --out-dir goes with --format srt or vtt")
    return args


def report(outcome: Outcome, as_json: bool) -> None:
    if as_json:
        print(outcome.json_line(), flush=True)
    elif outcome.response is not None:
        print(f"{outcome.path} [{outcome.response.get('task', '')}] {outcome.response.get('caption', '')}", flush=True)
    report_error(outcome)


def report_error(outcome: Outcome) -> None:
    if outcome.response is None:
        status = f"HTTP {outcome.status}, " if outcome.status else ""
        tries = f", after {outcome.attempts} attempts" if outcome.attempts > 1 else ""
        print(
            f"error: {outcome.path}: {status}{outcome.error['type']}: {outcome.error['message']}{tries}",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    paths = expand_audio_args(args.audio)
    tasks = tasks_per_file(args.task, len(paths))
    options = {
        name: str(getattr(args, name))
        for name in args.decoding_options
        if getattr(args, name) is not None and name not in CLIENT_SIDE_OPTIONS
    }
    client = Client(
        # Not /predictions/{model}: TorchServe 0.12 drops the query string there, and with it the
        # options. /invocations (its SageMaker-style route) hands the query string to the handler.
        endpoint=f"{args.url.rstrip('/')}/invocations",
        token=resolve_token("inference", args.token, args.key_file),
        params={"model_name": args.model, **options},
        retries=args.retries,
        backoff_s=args.backoff,
        timeout_s=args.timeout,
    )
    if args.segment_s is not None:
        return run_segmented(args, client, paths, tasks)
    started = time.monotonic()
    outcomes: list[Outcome | None] = [None] * len(paths)
    progress = ProgressBar(len(paths), enabled=not args.no_progress)
    progress.draw()
    refused: AuthorizationError | None = None
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = {
            pool.submit(client.caption, path, task): index for index, (path, task) in enumerate(zip(paths, tasks))
        }
        try:
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except AuthorizationError as error:
                    refused = refused or error
                    continue
                if outcome is None:
                    continue
                outcomes[futures[future]] = outcome
                progress.clear()
                report(outcome, args.json)
                progress.update(failed=outcome.response is None)
        except KeyboardInterrupt:
            # Leaving the `with` waits for every queued file: make those return at once.
            client.stopping.set()
            raise
    progress.clear()
    if refused is not None:
        return report_refusal(refused)
    finished = [outcome for outcome in outcomes if outcome is not None]
    if args.csv_export:
        write_csv(args.csv_export, [outcome.csv_row() for outcome in finished])
    print(summary_line(finished, time.monotonic() - started), file=sys.stderr)
    return EXIT_SOME_FAILED if any(outcome.response is None for outcome in finished) else EXIT_OK


def report_refusal(refused: AuthorizationError) -> int:
    print(
        f"error: the server refused the inference token ({refused}). Pass --token, or --key-file pointing at the "
        f"{KEY_FILE_NAME} that TorchServe wrote in the directory it was started from (its inference key expires "
        "after token_expiration_min, 60 by default).",
        file=sys.stderr,
    )
    return EXIT_CANNOT_RUN


# ---------------------------------------------------------------------------------------------- --segment


def subtitle_paths(args: argparse.Namespace, paths: list[str]) -> list[Path | None]:
    """Where each input's subtitles go: DIR/<name>.srt with --out-dir, else stdout (None), for one input only."""
    if args.format not in SUBTITLE_FORMATS:
        return [None] * len(paths)
    if not args.out_dir:
        if len(paths) > 1:
            raise UsageError(f"--format {args.format} with several inputs needs --out-dir (one subtitle file each)")
        return [None]
    targets = [Path(args.out_dir) / f"{Path(path).stem}.{args.format}" for path in paths]
    clashes = sorted({str(t) for t in targets if targets.count(t) > 1})
    if clashes:
        raise UsageError(f"inputs with the same name would share a subtitle file: {', '.join(clashes)}")
    return targets


def estimated_windows(path: str, segment_s: float, hop_s: float | None) -> int:
    """The windows of a file from its header's duration, for the progress bar (0 when the header has none)."""
    from conette_engine.segments import segment_bounds
    from torchcodec.decoders import AudioDecoder

    try:
        metadata = AudioDecoder(path).metadata
        duration_s = metadata.duration_seconds_from_header or metadata.duration_seconds  # Matroska: no header one
    except Exception:  # noqa: BLE001 - only an estimate: the file's own error comes when it is read
        return 0
    return len(segment_bounds(round(duration_s * SAMPLE_RATE), segment_s, hop_s)) if duration_s else 0


def caption_recording(pool: ThreadPoolExecutor, client: Client, path: str, task: str | None,
                      args: argparse.Namespace, progress: ProgressBar) -> Outcome:
    """Stream one recording's windows, send each as a request (several in flight), and assemble the answers."""
    from conette_engine.audio import AudioStream
    from conette_engine.errors import InputError
    from conette_engine.segments import stream_windows

    outcome = Outcome(path=path, task=task)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        outcome.error = {"type": "file_unreadable", "message": "no such readable file"}
        return outcome
    estimate = estimated_windows(path, args.segment_s, args.hop_s)
    progress.total += estimate
    # Windows waiting for an answer hold their samples: bound them, so memory does not grow with the recording.
    slots = threading.BoundedSemaphore(2 * args.concurrency)
    failed = threading.Event()
    sent: list[tuple[int, int, Future]] = []

    def send_window(body: bytes) -> Outcome:
        # Counted before the answer is handed back, so the bar has every window once the answers are collected.
        try:
            answer = client.send(body, Outcome(path=path, task=task))
        except BaseException:
            failed.set()
            raise
        finally:
            slots.release()
        if answer.response is None:
            failed.set()
        progress.update(failed=answer.response is None)
        return answer

    try:
        stream = AudioStream(path)
        for window in stream_windows(stream, args.segment_s, args.hop_s):
            if failed.is_set() or client.stopping.is_set():
                break
            body = float_wav_bytes(window.waveform.numpy().tobytes())
            slots.acquire()
            sent.append((window.start, window.stop, pool.submit(send_window, body)))
    except InputError as error:
        outcome.error = {"type": error.type, "message": str(error)}
    answers = [(start, stop, future.result()) for start, stop, future in sent]  # raises AuthorizationError
    if outcome.error is None and not failed.is_set():
        progress.total += len(answers) - estimate
    for start, stop, answer in answers:
        if answer.response is None and outcome.error is None:
            outcome.status, outcome.attempts = answer.status, answer.attempts
            outcome.error = {
                "type": answer.error["type"],
                "message": f"window {timestamp(start / SAMPLE_RATE)} --> {timestamp(stop / SAMPLE_RATE)}: "
                f"{answer.error['message']}",
            }
    if outcome.error is None:
        audio = {"duration_s": stream.duration_s, "sample_rate": stream.sample_rate, "channels": stream.channels}
        outcome.response = assemble([(start, stop, answer.response) for start, stop, answer in answers], audio)
    return outcome


def report_segmented(outcome: Outcome, args: argparse.Namespace, subtitle_path: Path | None) -> None:
    report_error(outcome)
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=SEGMENT_CSV_COLUMNS, lineterminator="\n")
        writer.writerows(outcome.segment_csv_rows())
    elif args.format == "json":
        print(outcome.json_line())
    elif outcome.response is None:
        pass
    elif args.format == "text":
        print("\n".join([f"{outcome.path} [{outcome.response['task']}]", *text_lines(outcome.response, args.tags)]))
    elif subtitle_path is None:
        sys.stdout.write(SUBTITLE_FORMATS[args.format](outcome.response, args.tags))
    else:
        subtitle_path.parent.mkdir(parents=True, exist_ok=True)
        subtitle_path.write_text(SUBTITLE_FORMATS[args.format](outcome.response, args.tags), encoding="utf-8")
        print(f"{outcome.path}: {len(outcome.response['segments'])} cues in {subtitle_path}", file=sys.stderr)
    sys.stdout.flush()


def run_segmented(args: argparse.Namespace, client: Client, paths: list[str], tasks: list[str | None]) -> int:
    """--segment: the files one after another, each file's windows several at a time (--concurrency)."""
    targets = subtitle_paths(args, paths)
    started = time.monotonic()
    progress = ProgressBar(0, enabled=not args.no_progress, unit="windows")
    if args.format == "csv":
        print(",".join(SEGMENT_CSV_COLUMNS))
    outcomes = []
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        try:
            for path, task, target in zip(paths, tasks, targets):
                outcome = caption_recording(pool, client, path, task, args, progress)
                outcomes.append(outcome)
                progress.clear()
                report_segmented(outcome, args, target)
                progress.draw()
        except AuthorizationError as refused:
            progress.clear()
            return report_refusal(refused)
        except KeyboardInterrupt:
            client.stopping.set()
            raise
    progress.clear()
    if args.csv_export:
        write_csv(args.csv_export, [row for o in outcomes for row in o.segment_csv_rows()], SEGMENT_CSV_COLUMNS)
    print(summary_line(outcomes, time.monotonic() - started), file=sys.stderr)
    return EXIT_SOME_FAILED if any(outcome.response is None for outcome in outcomes) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, KeyFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
